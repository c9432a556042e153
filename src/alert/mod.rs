//! Stage 6, telling people: deploy outcomes go to Slack (and later other sinks) asynchronously.
//! A slow or failing receiver never delays a deploy: messages are queued without waiting, sent
//! by a background task with retry and backoff, and dropped (counted, logged) only when the
//! queue is full.

pub mod slack;

pub use slack::{Notifier, Report};
