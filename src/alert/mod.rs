//! Stage 6, telling people and systems: deploy outcomes go to Slack, Microsoft Teams, Google
//! Chat, Discord, a JSON webhook and NATS, asynchronously.
//! A slow or failing receiver never delays a deploy: messages are queued without waiting, sent
//! by a background task with retry and backoff, and dropped (counted, logged) only when the
//! queue is full.

pub mod chat;
pub mod nats;
pub mod slack;

pub use slack::{Notice, Notifier, Report};
