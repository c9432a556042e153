//! Registries: whether an image exists before the cluster is touched (the pre-flight), with
//! the credentials the kubelet would use; and the ECR pull secrets depwatch keeps fresh
//! (`--ecr-pull-secret`), whose token the pre-flight uses too.

pub mod challenge;
pub mod client;
pub mod ecr;
pub mod preflight;
pub mod reference;
pub mod trust;

pub use client::{Answer, Registries};
pub use preflight::{Mode, Preflight, Verdict};
pub use reference::{check_grammar, Credentials, ImageRef};
