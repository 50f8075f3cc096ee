//! The latency profile `/stats` reports: per workload and model, over a sliding window,
//! how many requests, how long they took (p50/p95/p99/mean) and how that splits into
//! queue and compute, tokens per second, and the design's arithmetic made visible: what
//! share of the observed mean latency a given network saving would be ("is saving 50 ms
//! worth it?").

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

/// One answered request.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    /// End to end, seconds.
    pub total_s: f64,
    /// Waiting for a batch or a sequence slot, seconds.
    pub queue_s: f64,
    /// In the model, seconds.
    pub compute_s: f64,
    /// Tokenizing (encoders; a generation's prompt is tokenized before it queues), seconds.
    pub tokenize_s: f64,
    /// From arrival to the first token (generation only), seconds.
    pub first_token_s: Option<f64>,
    /// Tokens read (inputs, or the prompt).
    pub input_tokens: usize,
    /// Tokens produced (generation).
    pub output_tokens: usize,
}

/// Most samples kept per workload and model; older ones go first.
const MAX_SAMPLES: usize = 100_000;

/// Samples per (workload, model), trimmed to the window as they are read and written.
pub struct Stats {
    window: Duration,
    series: Mutex<BTreeMap<(String, String), VecDeque<Sample>>>,
}

/// The summary of one series.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub workload: String,
    pub model: String,
    pub count: usize,
    pub requests_per_s: f64,
    pub latency_ms: Percentiles,
    /// Mean milliseconds waiting for a batch or a slot.
    pub queue_ms_mean: f64,
    /// Mean milliseconds in the model.
    pub compute_ms_mean: f64,
    /// Mean milliseconds tokenizing (encoders).
    pub tokenize_ms_mean: f64,
    /// Time to first token (generation), over the requests that had one.
    pub first_token_ms: Option<Percentiles>,
    /// Mean milliseconds elsewhere: parsing, serializing, streaming (and a prompt's tokenizing).
    pub other_ms_mean: f64,
    /// Tokens (read + produced) per second of model compute.
    pub tokens_per_s: f64,
    /// Generated tokens per second of a request's own time (generation only).
    pub output_tokens_per_s: Option<f64>,
    pub input_tokens: usize,
    pub output_tokens: usize,
    /// The network saving weighed, in milliseconds.
    pub saving_ms: f64,
    /// `saving_ms` as a percentage of the observed mean latency.
    pub saving_pct_of_mean: f64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub mean: f64,
    pub max: f64,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Rounds to 0.01 for people.
fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

impl Stats {
    /// Keeps `window` of history.
    pub fn new(window: Duration) -> Self {
        Stats { window, series: Mutex::new(BTreeMap::new()) }
    }

    /// The window summarized.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Records one answered request of `workload` (`embed`, `classify`, `generate`) on `model`.
    pub fn record(&self, workload: &str, model: &str, sample: Sample) {
        let mut series = self.series.lock();
        let q = series.entry((workload.to_string(), model.to_string())).or_default();
        q.push_back(sample);
        while q.len() > MAX_SAMPLES {
            q.pop_front();
        }
    }

    /// Summaries of every series with samples in the window.
    pub fn summaries(&self, saving_ms: f64) -> Vec<Summary> {
        let now = Instant::now();
        let mut series = self.series.lock();
        let mut out = Vec::new();
        for ((workload, model), q) in series.iter_mut() {
            while q.front().is_some_and(|s| now.duration_since(s.at) > self.window) {
                q.pop_front();
            }
            if q.is_empty() {
                continue;
            }
            out.push(summarize(workload, model, q, saving_ms, self.window));
        }
        out
    }
}

fn summarize(workload: &str, model: &str, q: &VecDeque<Sample>, saving_ms: f64, window: Duration) -> Summary {
    let n = q.len() as f64;
    let mut totals: Vec<f64> = q.iter().map(|s| s.total_s * 1000.0).collect();
    totals.sort_by(|a, b| a.total_cmp(b));
    let mean = totals.iter().sum::<f64>() / n;
    let queue = q.iter().map(|s| s.queue_s).sum::<f64>() * 1000.0 / n;
    let compute = q.iter().map(|s| s.compute_s).sum::<f64>() * 1000.0 / n;
    let tokenize = q.iter().map(|s| s.tokenize_s).sum::<f64>() * 1000.0 / n;
    let mut firsts: Vec<f64> = q.iter().filter_map(|s| s.first_token_s).map(|s| s * 1000.0).collect();
    firsts.sort_by(|a, b| a.total_cmp(b));
    let first_token_ms = (!firsts.is_empty()).then(|| Percentiles {
        p50: r2(percentile(&firsts, 0.50)),
        p95: r2(percentile(&firsts, 0.95)),
        p99: r2(percentile(&firsts, 0.99)),
        mean: r2(firsts.iter().sum::<f64>() / firsts.len() as f64),
        max: r2(*firsts.last().unwrap_or(&0.0)),
    });
    let input_tokens: usize = q.iter().map(|s| s.input_tokens).sum();
    let output_tokens: usize = q.iter().map(|s| s.output_tokens).sum();
    let compute_s: f64 = q.iter().map(|s| s.compute_s).sum();
    let total_s: f64 = q.iter().map(|s| s.total_s).sum();
    let span = q.back().zip(q.front()).map(|(b, f)| b.at.duration_since(f.at).as_secs_f64()).unwrap_or(0.0);
    let seconds = span.max(1.0).min(window.as_secs_f64());
    Summary {
        workload: workload.into(),
        model: model.into(),
        count: q.len(),
        requests_per_s: r2(n / seconds),
        latency_ms: Percentiles {
            p50: r2(percentile(&totals, 0.50)),
            p95: r2(percentile(&totals, 0.95)),
            p99: r2(percentile(&totals, 0.99)),
            mean: r2(mean),
            max: r2(*totals.last().unwrap_or(&0.0)),
        },
        queue_ms_mean: r2(queue),
        compute_ms_mean: r2(compute),
        tokenize_ms_mean: r2(tokenize),
        first_token_ms,
        other_ms_mean: r2((mean - queue - compute - tokenize).max(0.0)),
        tokens_per_s: if compute_s > 0.0 { r2((input_tokens + output_tokens) as f64 / compute_s) } else { 0.0 },
        output_tokens_per_s: (workload == "generate" && total_s > 0.0).then(|| r2(output_tokens as f64 / total_s)),
        input_tokens,
        output_tokens,
        saving_ms,
        saving_pct_of_mean: if mean > 0.0 { r2(saving_ms / mean * 100.0) } else { 0.0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_and_ordered() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn the_design_arithmetic() {
        // "50 ms on a 4,500 ms chatbot answer is 1.1%."
        let stats = Stats::new(Duration::from_secs(60));
        let s = Sample {
            at: Instant::now(),
            total_s: 4.5,
            queue_s: 0.5,
            compute_s: 3.9,
            tokenize_s: 0.0,
            first_token_s: Some(0.6),
            input_tokens: 10,
            output_tokens: 100,
        };
        stats.record("generate", "m", s);
        let sum = &stats.summaries(50.0)[0];
        assert_eq!(sum.saving_pct_of_mean, 1.11);
        assert_eq!(sum.other_ms_mean, 100.0);
    }
}
