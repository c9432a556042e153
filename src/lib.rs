//! depwatch turns a directory of small dependency files into healthy Kubernetes deployments.
//!
//! # Layout
//! - [`cli`]: command-line arguments, every flag also an environment variable.
//! - [`domain`]: the shared vocabulary (statuses, outcomes, triggers, images, who asked).
//! - [`watch`] → [`debounce`] → [`ingest`]: files to desired state.
//! - [`queue`]: latest wins, one deploy per service at a time.
//! - [`deploy`]: [`deploy::lifecycle`] decides, [`deploy::attempt`] does,
//!   [`deploy::recorder`] writes it down everywhere.
//! - [`store`]: the record (SQLite or PostgreSQL), changed one field-owned statement at a
//!   time, with an outbox that keeps writes through the record's own outages.
//! - [`fence`]: with leader election, nothing is written without a valid Lease.
//! - [`sim`]: the simulated Kubernetes cluster (`depwatch sim`) that tests, benchmarks and the
//!   demo run against; the daemon reaches it only through a kubeconfig.

pub mod advice;
pub mod alert;
pub mod bounds;
pub mod check;
pub mod checks;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod demo;
pub mod depedit;
pub mod depfile;
pub mod domain;
pub mod fence;
pub mod http;
pub mod leader;
pub mod lease;
pub mod lock;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod operator;
pub mod pipeline;
pub mod policy;
pub mod registry;
pub mod safefs;
pub mod sdnotify;
pub mod sim;
pub mod store;
