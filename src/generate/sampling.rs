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
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = if self.params.top_k == 0 { self.scratch.len() } else { self.params.top_k.min(self.scratch.len()) };
        if k < self.scratch.len() {
            self.scratch.select_nth_unstable_by(k - 1, order);
            self.scratch.truncate(k);
        }
        if self.params.top_p < 1.0 {
            // The nucleus is almost always a few dozen tokens of a 50k vocabulary: find it
            // by sorting a growing head (selected in linear time) instead of the whole list.
            let total: f32 = self.scratch.iter().map(|p| p.1).sum();
            let mut head = 64.min(self.scratch.len());
            let keep = loop {
                if head < self.scratch.len() {
                    self.scratch.select_nth_unstable_by(head - 1, order);
                }
                self.scratch[..head].sort_unstable_by(order);
                let mut cumulative = 0.0;
                let found = self.scratch[..head].iter().position(|p| {
                    cumulative += p.1 / total;
                    cumulative >= self.params.top_p
                });
                match found {
                    Some(i) => break i + 1,
                    None if head == self.scratch.len() => break head,
                    None => head = (head * 8).min(self.scratch.len()),
                }
            };
            self.scratch.truncate(keep.max(1));
        }
        // Without a nucleus cut no order is needed: walk the distribution in index order.
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
    fn top_p_keeps_exactly_the_nucleus_and_sampling_follows_the_distribution() {
        // Probabilities 0.5, 0.25, 0.125, ... over 200 tokens: top_p 0.8 keeps the first three.
        let logits: Vec<f32> = (0..200).map(|i| -(i as f32) * std::f32::consts::LN_2).collect();
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.8, top_k: 0, seed: 3, ignore_eos: false });
        let mut counts = [0usize; 200];
        for _ in 0..20_000 {
            counts[s.sample(&logits) as usize] += 1;
        }
        assert!(counts[3..].iter().all(|&c| c == 0), "only the nucleus: {:?}", &counts[..6]);
        let share = counts[0] as f64 / 20_000.0;
        assert!((share - 0.5 / 0.875).abs() < 0.02, "{share}");
        // A flat distribution over many tokens needs the head to grow past its first 64.
        let flat = vec![0.0f32; 5000];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.5, top_k: 0, seed: 4, ignore_eos: false });
        let picks: Vec<u32> = (0..2000).map(|_| s.sample(&flat)).collect();
        assert!(picks.iter().all(|&t| t < 2500), "ties keep the lowest indices");
        assert!(picks.iter().any(|&t| t > 64));
        // Without top_p or top_k every token can be drawn, in proportion.
        let two = [0.0f32, (3.0f32).ln()];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 5, ignore_eos: false });
        let ones = (0..20_000).filter(|_| s.sample(&two) == 1).count() as f64 / 20_000.0;
        assert!((ones - 0.75).abs() < 0.02, "{ones}");
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
