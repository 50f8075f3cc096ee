//! The pinned model store: the manifest, file digests, fetching, and the registry of the
//! models this node serves.

pub mod download;
pub mod fetch;
pub mod hf_cache;
pub mod hub;
pub mod manifest;
pub mod probe;
pub mod registry;
pub mod store;
pub mod sync;
pub mod verify;
