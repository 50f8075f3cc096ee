//! Choosing the next token from logits, with a per-request seeded random generator.
//!
//! Every generation engine behind the `Generator` seam samples through this, so a request's
//! `seed` means the same thing on every engine, and two requests running side by side never
//! share (and race for) one random stream.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; 0 means no limit.
    pub top_k: usize,
    /// Seed of this request's random stream.
    pub seed: u64,
    /// Never pick an end-of-sequence token (benchmarks generate a fixed length this way).
    pub ignore_eos: bool,
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0, ignore_eos: false }
    }
}

/// A request's sampler: its parameters and its own random stream.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch for (index, probability) pairs, reused across tokens.
    scratch: Vec<(u32, f32)>,
    /// Tokens never to pick.
    banned: Vec<u32>,
}

impl Sampler {
    /// A sampler whose random stream starts at `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        Sampler { params, rng: StdRng::seed_from_u64(params.seed), scratch: Vec::new(), banned: Vec::new() }
    }

    /// Never picks these tokens (used with `ignore_eos` for the end-of-sequence tokens).
    pub fn ban(&mut self, tokens: &[u32]) {
        self.banned.extend_from_slice(tokens);
    }

    /// The parameters it samples with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from raw logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if !self.banned.is_empty() {
            let mut masked = logits.to_vec();
            for &t in &self.banned {
                if let Some(l) = masked.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            return self.pick(&masked);
        }
        self.pick(logits)
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 || self.params.top_k == 1 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        self.scratch.clear();
        self.scratch.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp())));
        // Most likely first; ties broken by index so the order never depends on the sort.
        let k = if self.params.top_k == 0 { self.scratch.len() } else { self.params.top_k.min(self.scratch.len()) };
        if k < self.scratch.len() {
            self.scratch.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            self.scratch.truncate(k);
        }
        self.scratch.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f32 = self.scratch.iter().map(|p| p.1).sum();
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = self.scratch.len();
            for (i, p) in self.scratch.iter().enumerate() {
                cumulative += p.1 / total;
                if cumulative >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.scratch.truncate(keep.max(1));
        }
        let mass: f32 = self.scratch.iter().map(|p| p.1).sum();
        let mut u = self.rng.random::<f32>() * mass;
        for &(i, p) in &self.scratch {
            if u < p {
                return i;
            }
            u -= p;
        }
        self.scratch.last().map(|p| p.0).unwrap_or(0)
    }
}

/// Index of the largest logit (the first, on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]), 1);
        s.ban(&[1]);
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]), 2);
    }

    #[test]
    fn same_seed_same_choices_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams { temperature: 1.0, top_p: 0.95, top_k: 40, seed: 7, ignore_eos: false };
        let run = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..32).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(p), run(p));
        assert_ne!(run(p), run(SamplingParams { seed: 8, ..p }));
    }

    #[test]
    fn top_k_limits_choices() {
        let logits = [5.0, 4.9, -10.0, -10.0];
        let mut s = Sampler::new(SamplingParams { temperature: 5.0, top_p: 1.0, top_k: 2, seed: 1, ignore_eos: false });
        for _ in 0..100 {
            assert!(s.sample(&logits) < 2);
        }
    }
}
