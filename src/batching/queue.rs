//! The per-model queue and the rule that cuts it into batches.
//!
//! Inputs from many connections arrive here already tokenized. A batch is cut by a token
//! budget (`max_batch_tokens`, the sum of the inputs' tokens: the dense layers run
//! padding-free) and a count (`max_batch_requests`). The oldest waiting input is always
//! in the next batch, so nothing starves; when more is waiting than one batch holds, the
//! rest of the batch is filled with the inputs closest to it in length, so the padded
//! attention of the batch wastes little. Inputs whose client went away are dropped here,
//! before they cost any compute.
//!
//! A batch is cut at the moment the worker is free, not before: a batch cut while the
//! previous one still runs holds only what had arrived by then, and under concurrent load
//! the worker would run many small batches instead of few large ones.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, Notify};

use crate::error::Error;

/// What the model worker returns for one input.
#[derive(Debug, Clone)]
pub struct JobOutput {
    /// The pooled (and, if asked, normalized) vector, or the class logits; for
    /// `Output::Tokens`, every token's hidden state, one after another.
    pub values: Vec<f32>,
    /// Time the input waited in the queue, in seconds.
    pub queue_s: f64,
    /// Time its batch spent in the model, in seconds.
    pub compute_s: f64,
    /// Inputs in its batch.
    pub batch_size: usize,
    /// Tokens in its batch.
    pub batch_tokens: usize,
}

/// What an input wants back from the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The pooled vector (a classifier's logits), L2-normalized when `normalize`.
    Pooled { normalize: bool },
    /// Every token's final hidden state, unpooled (TEI's `/embed_all`).
    Tokens,
}

/// One tokenized input waiting for the model.
pub struct Job {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub output: Output,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<JobOutput, Error>>,
    /// The request's span, so the batch's work shows up in the request's trace.
    pub span: tracing::Span,
    /// Open while the input waits; the worker closes it when the input's batch starts.
    pub queue_span: tracing::Span,
}

impl Job {
    /// Tokens in this input.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// True when nobody waits for the answer any more (the client disconnected).
    pub fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// Limits on one batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_batch_tokens: usize,
    pub max_batch_requests: usize,
}

/// Removes abandoned jobs and cuts the next batch from `queue`, sorted by length.
/// Returns an empty vector when nothing is waiting.
pub fn next_batch(queue: &mut VecDeque<Job>, policy: BatchPolicy) -> Vec<Job> {
    queue.retain(|j| !j.abandoned());
    if queue.is_empty() {
        return Vec::new();
    }
    // Look a bounded distance ahead: enough to find similar lengths, not a full sort of a long queue.
    let window = queue.len().min(policy.max_batch_requests.saturating_mul(4).max(1));
    let fits_all = queue.iter().take(window).map(Job::tokens).sum::<usize>() <= policy.max_batch_tokens && window <= policy.max_batch_requests;
    let chosen: Vec<usize> = if fits_all {
        (0..window).collect()
    } else {
        let anchor = queue[0].tokens();
        let mut candidates: Vec<usize> = (1..window).collect();
        candidates.sort_by_key(|&i| (queue[i].tokens().abs_diff(anchor), i));
        let mut chosen = vec![0];
        // The oldest input always goes, even alone over the budget (it was admitted, so it
        // is within the model's token limit).
        let mut tokens = anchor;
        for i in candidates {
            if chosen.len() >= policy.max_batch_requests {
                break;
            }
            let t = queue[i].tokens();
            if tokens + t <= policy.max_batch_tokens {
                tokens += t;
                chosen.push(i);
            }
        }
        chosen.sort_unstable();
        chosen
    };
    let mut batch = Vec::with_capacity(chosen.len());
    for &i in chosen.iter().rev() {
        if let Some(job) = queue.remove(i) {
            batch.push(job);
        }
    }
    batch.sort_by_key(Job::tokens);
    batch
}

/// Runs the queue as an actor: takes jobs from `jobs`, and whenever the worker says it is
/// free (`idle`, notified by the worker before each wait for a batch) cuts the next batch
/// from everything that has arrived by then. Ends when every job sender is gone and the
/// queue is empty, or when the worker is gone.
pub async fn run_queue(
    model: String,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    batches: mpsc::Sender<Vec<Job>>,
    idle: Arc<Notify>,
    policy: BatchPolicy,
) {
    let depth = crate::telemetry::metrics::METRICS.queue_depth.with_label_values(&[model.as_str()]);
    let mut queue: VecDeque<Job> = VecDeque::new();
    loop {
        depth.set(queue.len() as i64);
        if queue.is_empty() {
            match jobs.recv().await {
                Some(j) => queue.push_back(j),
                None => return,
            }
        }
        // Wait until the worker is free, taking new jobs meanwhile.
        tokio::select! {
            biased;
            () = idle.notified() => {}
            job = jobs.recv() => {
                match job {
                    Some(j) => queue.push_back(j),
                    None if queue.is_empty() => return,
                    None => {}
                }
                continue;
            }
        }
        while let Ok(j) = jobs.try_recv() {
            queue.push_back(j);
        }
        let batch = next_batch(&mut queue, policy);
        if batch.is_empty() {
            // Nothing to run after all: the worker is still free.
            idle.notify_one();
        } else if batches.send(batch).await.is_err() {
            return; // the worker is gone; its supervisor restarts the model
        }
    }
}

/// A job of these token ids and the receiver of its answer (for tests of the queue and worker).
#[cfg(test)]
pub(crate) fn test_job(ids: Vec<u32>) -> (Job, oneshot::Receiver<Result<JobOutput, Error>>) {
    let (tx, rx) = oneshot::channel();
    let j = Job {
        type_ids: vec![0; ids.len()],
        ids,
        output: Output::Pooled { normalize: true },
        enqueued: Instant::now(),
        reply: tx,
        span: tracing::Span::none(),
        queue_span: tracing::Span::none(),
    };
    (j, rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(tokens: usize) -> (Job, oneshot::Receiver<Result<JobOutput, Error>>) {
        test_job(vec![1; tokens])
    }

    async fn next_len(rx: &mut mpsc::Receiver<Vec<Job>>) -> usize {
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await.expect("a batch").expect("open").len()
    }

    #[tokio::test]
    async fn a_batch_is_cut_when_the_worker_is_free_from_everything_queued_by_then() {
        use std::time::Duration;
        let (job_tx, job_rx) = mpsc::unbounded_channel();
        let (batch_tx, mut batch_rx) = mpsc::channel(1);
        let idle = Arc::new(Notify::new());
        let policy = BatchPolicy { max_batch_tokens: 1000, max_batch_requests: 64 };
        tokio::spawn(run_queue("test".into(), job_rx, batch_tx, idle.clone(), policy));
        let mut replies = Vec::new();
        let mut send = |n: usize| {
            for _ in 0..n {
                let (j, rx) = job(3);
                replies.push(rx);
                job_tx.send(j).unwrap();
            }
        };
        // The worker is free: the first input goes at once, alone.
        idle.notify_one();
        send(1);
        assert_eq!(next_len(&mut batch_rx).await, 1);
        // Five arrive while it runs: nothing is cut before the worker is free again ...
        send(5);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(batch_rx.try_recv().is_err(), "a batch was cut while the worker was busy");
        // ... and then they go together.
        idle.notify_one();
        assert_eq!(next_len(&mut batch_rx).await, 5);
    }

    #[test]
    fn token_budget_and_oldest_first() {
        let mut keep = Vec::new();
        let mut q = VecDeque::new();
        for t in [10, 50, 12, 11, 48, 9] {
            let (j, rx) = job(t);
            keep.push(rx);
            q.push_back(j);
        }
        let policy = BatchPolicy { max_batch_tokens: 40, max_batch_requests: 8 };
        let b = next_batch(&mut q, policy);
        let lens: Vec<usize> = b.iter().map(Job::tokens).collect();
        assert_eq!(lens, vec![9, 10, 11], "oldest (10) plus its nearest lengths within 40 tokens");
        let b = next_batch(&mut q, policy);
        assert_eq!(b.iter().map(Job::tokens).collect::<Vec<_>>(), vec![50], "the oldest runs alone, even over budget");
        let b = next_batch(&mut q, policy);
        assert_eq!(b.iter().map(Job::tokens).collect::<Vec<_>>(), vec![12], "48 does not fit beside 12");
    }

    #[test]
    fn abandoned_inputs_are_skipped() {
        let mut q = VecDeque::new();
        let (a, rx_a) = job(5);
        let (b, _rx_b) = job(6);
        q.push_back(a);
        q.push_back(b);
        drop(rx_a);
        let batch = next_batch(&mut q, BatchPolicy { max_batch_tokens: 100, max_batch_requests: 8 });
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].tokens(), 6);
    }
}
