//! Verification checks: the `verify:` block read and validated (`form.rs`, pure), and the
//! samples taken from the service (`probe.rs`: HTTP through the API server's service proxy or
//! directly, PromQL against `--prometheus-url`). The bake that judges them is
//! `domain::verify`, pure.

pub mod form;
pub mod probe;
