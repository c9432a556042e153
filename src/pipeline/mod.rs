//! The main path, one stage per module, in the order a save walks through them:
//! [`watch`] (a path may have changed) → [`debounce`] (coalesce, and wait for the writer to
//! finish) → [`ingest`] (read, parse, check, compare with the record) → [`queue`] (the newest
//! version per service) → [`deploy`] (plan, pre-flight, patch, judge, roll back, record).
//! See ARCHITECTURE.md for the walk of one save.

pub mod debounce;
pub mod deploy;
pub mod ingest;
pub mod queue;
pub mod watch;
