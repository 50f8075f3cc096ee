//! The model worker: one OS thread per resident encoder model that runs batches.
//!
//! The thread owns the model (weights, scratch buffers), so nothing else ever touches it.
//! A batch that fails — an error or a panic inside the model — is answered with a 500
//! for its inputs only, and the worker goes on with the next batch. If the thread itself
//! ends, `on_exit` tells the model's supervisor, which reloads it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use tokio::sync::mpsc;

use super::queue::{Job, JobOutput};
use crate::encoder::bert::PackedBatch;
use crate::error::Error;
use crate::telemetry::metrics::METRICS;

/// A model that runs packed batches (implemented by the encoders).
pub trait BatchModel: Send + 'static {
    /// One vector per input, in batch order: pooled embeddings (normalized where
    /// `normalize[i]`) or class logits.
    fn run(&mut self, batch: &PackedBatch, normalize: &[bool]) -> Result<Vec<Vec<f32>>, String>;
}

/// Starts the worker thread. It runs until `batches` closes.
pub fn spawn_worker(
    name: String,
    mut model: Box<dyn BatchModel>,
    mut batches: mpsc::Receiver<Vec<Job>>,
    on_exit: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("model-{name}")).spawn(move || {
        while let Some(jobs) = batches.blocking_recv() {
            run_batch(&name, model.as_mut(), jobs);
        }
        on_exit();
    })
}

fn run_batch(name: &str, model: &mut dyn BatchModel, jobs: Vec<Job>) {
    // Clients may have gone while the batch waited for this thread.
    let mut jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.abandoned()).collect();
    if jobs.is_empty() {
        return;
    }
    let started = Instant::now();
    let packed = PackedBatch::new(jobs.iter().map(|j| (j.ids.as_slice(), j.type_ids.as_slice())));
    let normalize: Vec<bool> = jobs.iter().map(|j| j.normalize).collect();
    // Each input's trace shows its wait and its batch; the model's own stages (inference,
    // pool) hang under the first input's batch span, which this thread enters.
    let metrics = &*METRICS;
    let batch_spans: Vec<tracing::Span> = jobs
        .iter_mut()
        .map(|j| {
            j.queue_span = tracing::Span::none();
            metrics.queue_seconds.with_label_values(&[name]).observe(started.duration_since(j.enqueued).as_secs_f64());
            tracing::info_span!(parent: &j.span, "batch", model = name, batch.size = packed.len(), batch.tokens = packed.tokens())
        })
        .collect();
    let result = batch_spans[0].in_scope(|| catch_unwind(AssertUnwindSafe(|| model.run(&packed, &normalize))));
    drop(batch_spans);
    let compute_s = started.elapsed().as_secs_f64();
    metrics.inference_seconds.with_label_values(&[name]).observe(compute_s);
    metrics.batch_size.with_label_values(&[name]).observe(packed.len() as f64);
    metrics.batch_tokens.with_label_values(&[name]).observe(packed.tokens() as f64);
    let outcome = match result {
        Ok(Ok(rows)) if rows.len() == jobs.len() => Ok(rows),
        Ok(Ok(rows)) => Err(format!("model returned {} rows for {} inputs", rows.len(), jobs.len())),
        Ok(Err(e)) => Err(e),
        Err(panic) => Err(format!("model panicked: {}", panic_message(&panic))),
    };
    match outcome {
        Ok(rows) => {
            for (job, values) in jobs.into_iter().zip(rows) {
                let out = JobOutput {
                    values,
                    queue_s: started.duration_since(job.enqueued).as_secs_f64(),
                    compute_s,
                    batch_size: packed.len(),
                    batch_tokens: packed.tokens(),
                };
                let _ = job.reply.send(Ok(out));
            }
        }
        Err(message) => {
            tracing::error!(model = name, inputs = jobs.len(), "batch failed: {message}");
            for job in jobs {
                let _ = job.reply.send(Err(Error::Internal(format!("model {name} failed on this batch: {message}"))));
            }
        }
    }
}

/// The text of a panic payload, when it has one.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
