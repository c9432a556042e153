//! Registries: whether an image exists before the cluster is touched (the pre-flight), with
//! the credentials the kubelet would use.

pub mod challenge;
pub mod client;
pub mod preflight;
pub mod reference;

pub use client::{Answer, Registries};
pub use preflight::{Mode, Preflight, Verdict};
pub use reference::{Credentials, ImageRef};
