//! Dynamic batching for encoder models: a queue per model that cuts batches by a token
//! budget, and one worker thread per model that runs them.

pub mod packed;
pub mod queue;
pub mod worker;
