//! edgenode: an inference daemon for one machine in an edge region.
//!
//! It keeps an embedding model and a small chat model resident, serves `embed`,
//! `classify` and `generate` over HTTP with dynamic batching, is warm before it says it is
//! ready, and proves which model versions it serves. See `docs/architecture.md` for how
//! the pieces fit; each module's doc says what it owns.

pub mod accounts;
pub mod auth;
pub mod batching;
pub mod boot;
pub mod cache;
pub mod cli;
pub mod commands;
pub mod config;
pub mod cpu;
pub mod encoder;
pub mod error;
pub mod fleet;
pub mod generate;
pub mod gpu;
pub mod http;
pub mod models;
pub mod node;
pub mod quota;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod service;
pub mod state;
pub mod telemetry;
pub mod upgrade;
