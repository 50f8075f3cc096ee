//! The model worker: one OS thread per resident encoder model that runs batches.
//!
//! The thread owns the model (weights, scratch buffers), so nothing else ever touches it.
//! A batch that fails — an error or a panic inside the model — is answered with a 500
//! for its inputs only, and the worker goes on with the next batch. If the thread itself
//! ends, `on_exit` tells the model's supervisor, which reloads it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, Notify};

use super::packed::PackedBatch;
use super::queue::{Job, JobOutput, Output};
use crate::error::Error;
use crate::runtime::OnExit;
use crate::telemetry::metrics::METRICS;

/// Why a batch got no answer. Every variant fails that batch's inputs only (500), and the
/// worker goes on with the next batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// The model reported an error (its forward pass, a missing head).
    #[error("{0}")]
    Model(String),
    /// The model panicked inside the batch.
    #[error("model panicked: {0}")]
    Panicked(String),
    /// The model answered for the wrong number of inputs.
    #[error("model returned {got} rows for {inputs} inputs")]
    RowCount { got: usize, inputs: usize },
}

/// A model that runs packed batches (implemented by the encoders).
pub trait BatchModel: Send + 'static {
    /// One vector per input, in batch order, as `outputs[i]` asks: a pooled embedding
    /// (normalized or not) or class logits, or the input's token states.
    fn run(&mut self, batch: &PackedBatch, outputs: &[Output]) -> Result<Vec<Vec<f32>>, BatchError>;
}

/// Starts the worker thread. It runs until `batches` closes. Before each wait for a batch it
/// notifies `idle`, which is when the queue cuts the next one.
pub fn spawn_worker(
    name: String,
    mut model: Box<dyn BatchModel>,
    mut batches: mpsc::Receiver<Vec<Job>>,
    idle: Arc<Notify>,
    on_exit: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("model-{name}")).spawn(move || {
        // Runs when the thread ends for any reason, a panic outside a batch included.
        let _exit = OnExit::new(on_exit);
        loop {
            idle.notify_one();
            let Some(jobs) = batches.blocking_recv() else { break };
            run_batch(&name, model.as_mut(), jobs);
        }
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
    let outputs: Vec<Output> = jobs.iter().map(|j| j.output).collect();
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
    let result = batch_spans[0].in_scope(|| catch_unwind(AssertUnwindSafe(|| model.run(&packed, &outputs))));
    drop(batch_spans);
    let compute_s = started.elapsed().as_secs_f64();
    metrics.inference_seconds.with_label_values(&[name]).observe(compute_s);
    metrics.batch_size.with_label_values(&[name]).observe(packed.len() as f64);
    metrics.batch_tokens.with_label_values(&[name]).observe(packed.tokens() as f64);
    let outcome = match result {
        Ok(Ok(rows)) if rows.len() == jobs.len() => Ok(rows),
        Ok(Ok(rows)) => Err(BatchError::RowCount { got: rows.len(), inputs: jobs.len() }),
        Ok(Err(e)) => Err(e),
        Err(panic) => Err(BatchError::Panicked(panic_message(&panic))),
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
    panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    /// Fails the batch whose first input is token 13 (an error), panics on token 66, and
    /// answers everything else with its length.
    struct Flaky;

    impl BatchModel for Flaky {
        fn run(&mut self, batch: &PackedBatch, _outputs: &[Output]) -> Result<Vec<Vec<f32>>, BatchError> {
            match batch.ids.first() {
                Some(13) => Err(BatchError::Model("unlucky input".into())),
                Some(66) => panic!("the model blew up"),
                _ => Ok((0..batch.len()).map(|i| vec![(batch.cu_seqlens[i + 1] - batch.cu_seqlens[i]) as f32]).collect()),
            }
        }
    }

    fn job(id: u32) -> (Job, oneshot::Receiver<Result<JobOutput, Error>>) {
        crate::batching::queue::test_job(vec![id, 1, 2])
    }

    #[test]
    fn a_failed_or_panicking_batch_answers_500_and_the_worker_goes_on() {
        let (tx, rx) = mpsc::channel(4);
        let (exited_tx, exited_rx) = std::sync::mpsc::channel();
        let handle = spawn_worker("flaky".into(), Box::new(Flaky), rx, Arc::default(), move || exited_tx.send(()).unwrap()).unwrap();
        for (id, ok) in [(13, false), (66, false), (5, true)] {
            let (j, reply) = job(id);
            tx.blocking_send(vec![j]).unwrap();
            let out = reply.blocking_recv().unwrap();
            match out {
                Ok(o) => {
                    assert!(ok);
                    assert_eq!(o.values, vec![3.0]);
                }
                Err(e) => {
                    assert!(!ok);
                    assert_eq!(e.code(), "internal_error");
                    assert!(!e.to_string().contains("blew up") || e.to_string().contains("panicked"), "{e}");
                }
            }
        }
        assert!(exited_rx.try_recv().is_err(), "still running after two bad batches");
        drop(tx);
        handle.join().unwrap();
        exited_rx.recv().unwrap();
    }

    #[test]
    fn the_exit_hook_runs_even_when_the_thread_unwinds() {
        // A panic outside any batch (here: a reply channel whose sender panics is not
        // possible, so the guard is exercised directly) must still report the exit.
        let (exited_tx, exited_rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _exit = OnExit::new(move || exited_tx.send(()).unwrap());
            panic!("outside a batch");
        });
        assert!(t.join().is_err());
        exited_rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn the_exit_hook_runs_when_the_batches_end() {
        struct Idle;
        impl BatchModel for Idle {
            fn run(&mut self, _: &PackedBatch, _: &[Output]) -> Result<Vec<Vec<f32>>, BatchError> {
                Ok(vec![])
            }
        }
        let (tx, rx) = mpsc::channel::<Vec<Job>>(1);
        let (exited_tx, exited_rx) = std::sync::mpsc::channel();
        let handle = spawn_worker("idle".into(), Box::new(Idle), rx, Arc::default(), move || exited_tx.send(()).unwrap()).unwrap();
        drop(tx);
        handle.join().unwrap();
        exited_rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
    }
}
