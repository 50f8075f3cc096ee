//! Choosing the next token from logits, with a per-request seeded random generator.
//!
//! Every generation engine behind the `Generator` seam samples through this, so a request's
//! `seed`, penalties, `logit_bias`, grammar and log-probabilities mean the same thing on
//! every engine, and two requests running side by side never share (and race for) one
//! random stream.
//!
//! The order is OpenAI's and llama.cpp's: raw logits → `logit_bias` → repetition,
//! frequency and presence penalties → the grammar's mask → (log-probabilities are taken
//! here) → temperature → top-k → top-p → typical-p (text-generation-inference's) → draw.

use std::collections::HashMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::constrain::{Constraint, TokenTable};

/// How to pick tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; 0 means no limit.
    pub top_k: usize,
    /// Locally typical sampling (Meister et al. 2022, TGI's `typical_p`): keep the tokens
    /// whose surprise is closest to the distribution's entropy, up to this much probability.
    /// 1 is off.
    pub typical_p: f32,
    /// Seed of this request's random stream.
    pub seed: u64,
    /// Never pick an end-of-sequence token (benchmarks generate a fixed length this way).
    pub ignore_eos: bool,
    /// OpenAI's: minus `count × frequency_penalty` for each time a token was generated.
    pub frequency_penalty: f32,
    /// OpenAI's: minus `presence_penalty` once a token has been generated at all.
    pub presence_penalty: f32,
    /// llama.cpp's and transformers': logits of tokens already in the prompt or the output
    /// are divided by it (multiplied, when negative). 1 is off.
    pub repetition_penalty: f32,
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            typical_p: 1.0,
            seed: 0,
            ignore_eos: false,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repetition_penalty: 1.0,
        }
    }

    fn penalizes(&self) -> bool {
        self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 || self.repetition_penalty != 1.0
    }
}

/// A picked token's log-probability, and the most likely alternatives at that step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    /// The token's bytes (a special token's name).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// The `top` most likely tokens, most likely first.
    pub top: Vec<(u32, Vec<u8>, f32)>,
}

/// Log-probabilities a request asked for.
struct LogprobRequest {
    top: usize,
    table: Arc<TokenTable>,
    /// Picked tokens not yet handed to the engine's event stream.
    pending: Vec<TokenLogprob>,
}

/// A request's sampler: its parameters, its own random stream, and what shapes its choices.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch for (index, probability) pairs, reused across tokens.
    scratch: Vec<(u32, f32)>,
    /// Adjusted logits, reused across tokens.
    work: Vec<f32>,
    /// Tokens never to pick.
    banned: Vec<u32>,
    /// `logit_bias`: added to the raw logits.
    bias: Vec<(u32, f32)>,
    /// Times each token was generated (frequency and presence penalties).
    counts: HashMap<u32, u32>,
    /// Tokens of the prompt (repetition penalty only).
    prompt: Vec<u32>,
    constraint: Option<Constraint>,
    logprobs: Option<LogprobRequest>,
    /// Report the prompt's own log-probabilities (TGI's `decoder_input_details`).
    prompt_logprobs: bool,
    /// The grammar is complete, or failed (with why).
    grammar_done: bool,
    grammar_error: Option<String>,
}

impl Sampler {
    /// A sampler whose random stream starts at `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            rng: StdRng::seed_from_u64(params.seed),
            scratch: Vec::new(),
            work: Vec::new(),
            banned: Vec::new(),
            bias: Vec::new(),
            counts: HashMap::new(),
            prompt: Vec::new(),
            constraint: None,
            logprobs: None,
            prompt_logprobs: false,
            grammar_done: false,
            grammar_error: None,
        }
    }

    /// Adds `logit_bias` (token, bias) pairs.
    pub fn bias(&mut self, bias: Vec<(u32, f32)>) {
        self.bias = bias;
    }

    /// Lets only what `constraint` allows be picked.
    pub fn constrain(&mut self, constraint: Constraint) {
        self.constraint = Some(constraint);
    }

    /// Records each picked token's log-probability and the `top` most likely alternatives.
    pub fn report_logprobs(&mut self, top: usize, table: Arc<TokenTable>) {
        self.logprobs = Some(LogprobRequest { top, table, pending: Vec::new() });
    }

    /// The prompt, for the repetition penalty (which counts prompt tokens too).
    pub fn set_prompt(&mut self, prompt: &[u32]) {
        if self.params.repetition_penalty != 1.0 {
            self.prompt = prompt.to_vec();
            self.prompt.sort_unstable();
            self.prompt.dedup();
        }
    }

    /// Log-probabilities of the tokens picked since the last call.
    pub fn take_logprobs(&mut self) -> Vec<TokenLogprob> {
        self.logprobs.as_mut().map(|l| std::mem::take(&mut l.pending)).unwrap_or_default()
    }

    /// Takes the last picked token's log-probability out of the pending ones: an
    /// end-of-sequence token's, which is not part of the text but is reported on its own.
    pub fn take_last_logprob(&mut self) -> Option<TokenLogprob> {
        self.logprobs.as_mut().and_then(|l| l.pending.pop())
    }

    /// Asks the engine for the prompt's own log-probabilities (`GenEvent::Prefill`).
    pub fn report_prompt_logprobs(&mut self) {
        self.prompt_logprobs = true;
    }

    /// Whether the engine should report the prompt's log-probabilities.
    pub fn wants_prompt_logprobs(&self) -> bool {
        self.prompt_logprobs
    }

    /// The grammar is complete: the sequence must end after the token just picked.
    pub fn grammar_done(&self) -> bool {
        self.grammar_done
    }

    /// The grammar engine failed (a bug, or a limit it hit): why.
    pub fn grammar_error(&self) -> Option<&str> {
        self.grammar_error.as_deref()
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
        let plain =
            self.banned.is_empty() && self.bias.is_empty() && !self.params.penalizes() && self.constraint.is_none() && self.logprobs.is_none();
        if plain {
            let token = self.pick(logits);
            self.observe(token);
            return token;
        }
        let mut work = std::mem::take(&mut self.work);
        work.clear();
        work.extend_from_slice(logits);
        self.adjust(&mut work);
        for &t in &self.banned {
            if let Some(l) = work.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let token = self.pick_constrained(&mut work);
        if self.logprobs.is_some() {
            self.record_logprob(&work, token);
        }
        self.work = work;
        self.observe(token);
        token
    }

    /// Picks from adjusted logits under the grammar, if any. Computing the grammar's mask over
    /// the whole vocabulary is the costly part of a constrained step, so where it cannot
    /// change the outcome it is skipped: the token is drawn from the unmasked distribution
    /// and kept if the grammar allows it, else drawn again from the masked one. For greedy
    /// decoding that is the masked argmax; for plain temperature sampling it is rejection
    /// sampling, whose result is distributed exactly as a draw from the masked distribution
    /// (p(x) + (1 - p(A)) p(x)/p(A) = p(x)/p(A) for x in the allowed set A). With top-k or
    /// top-p truncation, or log-probabilities to report, the mask comes first.
    fn pick_constrained(&mut self, work: &mut [f32]) -> u32 {
        if self.constraint.is_none() {
            return self.pick(work);
        }
        let p = &self.params;
        let greedy = p.temperature <= 0.0 || p.top_k == 1;
        if self.logprobs.is_none() && (greedy || (p.top_k == 0 && p.top_p >= 1.0)) {
            let token = self.pick(work);
            if self.constraint.as_mut().is_some_and(|c| c.allows(token)) {
                return token;
            }
        }
        let Some(c) = &mut self.constraint else { return self.pick(work) };
        match c.mask(work) {
            Ok(true) => self.pick(work),
            // Every token the grammar allows has -inf: take the first it allows.
            Ok(false) => c.first_allowed().unwrap_or_else(|| argmax(work)),
            Err(e) => {
                self.grammar_error = Some(e);
                argmax(work)
            }
        }
    }

    /// `logit_bias`, then the penalties, in place.
    fn adjust(&self, logits: &mut [f32]) {
        for &(t, b) in &self.bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let r = p.repetition_penalty;
            let seen = self.prompt.iter().copied().chain(self.counts.keys().copied().filter(|t| self.prompt.binary_search(t).is_err()));
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
    }

    /// The picked token's log-probability under the adjusted distribution (before
    /// temperature and truncation, as OpenAI reports them), and the top alternatives.
    fn record_logprob(&mut self, logits: &[f32], token: u32) {
        let Some(req) = &mut self.logprobs else { return };
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let log_z = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
        let logprob = |t: u32| logits.get(t as usize).map_or(f32::NEG_INFINITY, |&l| l - log_z);
        let mut top = Vec::with_capacity(req.top);
        if req.top > 0 {
            self.scratch.clear();
            self.scratch.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
            let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
            let k = req.top.min(self.scratch.len());
            if k < self.scratch.len() {
                self.scratch.select_nth_unstable_by(k - 1, order);
            }
            self.scratch[..k].sort_unstable_by(order);
            top.extend(self.scratch[..k].iter().map(|&(t, _)| (t, req.table.bytes(t).to_vec(), logprob(t))));
        }
        req.pending.push(TokenLogprob { token, bytes: req.table.bytes(token).to_vec(), logprob: logprob(token), top });
    }

    /// Counts the picked token and moves the grammar past it.
    fn observe(&mut self, token: u32) {
        if self.params.penalizes() {
            *self.counts.entry(token).or_default() += 1;
        }
        if let Some(c) = &mut self.constraint {
            if self.grammar_error.is_none() {
                if let Err(e) = c.accept(token) {
                    self.grammar_error = Some(e);
                }
            }
            self.grammar_done = c.is_finished();
        }
    }

    /// Keeps the locally typical set of `scratch` (unnormalized probabilities): tokens
    /// ordered by how far their surprise `-ln p` is from the entropy, the smallest prefix
    /// whose probability reaches `typical_p` (at least one token).
    fn typical_cut(&mut self) {
        let total: f32 = self.scratch.iter().map(|p| p.1).sum();
        if total <= 0.0 || self.scratch.len() < 2 {
            return;
        }
        let surprise = |p: f32| -(p / total).ln();
        let entropy: f32 = self.scratch.iter().filter(|p| p.1 > 0.0).map(|p| (p.1 / total) * surprise(p.1)).sum();
        let distance = |p: &(u32, f32)| if p.1 > 0.0 { (surprise(p.1) - entropy).abs() } else { f32::INFINITY };
        self.scratch.sort_unstable_by(|a, b| distance(a).total_cmp(&distance(b)).then(a.0.cmp(&b.0)));
        let mut cumulative = 0.0;
        let keep = self
            .scratch
            .iter()
            .position(|p| {
                cumulative += p.1 / total;
                cumulative >= self.params.typical_p
            })
            .map_or(self.scratch.len(), |i| i + 1);
        self.scratch.truncate(keep.max(1));
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
        if self.params.typical_p < 1.0 {
            self.typical_cut();
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

/// `token`'s log-probability under raw `logits` (a log-softmax of one entry): what the
/// model itself gives a prompt token, before any request's adjustments.
pub fn logprob_of(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| l - log_z)
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
        let p = SamplingParams { temperature: 1.0, top_p: 0.95, top_k: 40, seed: 7, ..SamplingParams::greedy() };
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
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.8, top_k: 0, seed: 3, ..SamplingParams::greedy() });
        let mut counts = [0usize; 200];
        for _ in 0..20_000 {
            counts[s.sample(&logits) as usize] += 1;
        }
        assert!(counts[3..].iter().all(|&c| c == 0), "only the nucleus: {:?}", &counts[..6]);
        let share = counts[0] as f64 / 20_000.0;
        assert!((share - 0.5 / 0.875).abs() < 0.02, "{share}");
        // A flat distribution over many tokens needs the head to grow past its first 64.
        let flat = vec![0.0f32; 5000];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.5, top_k: 0, seed: 4, ..SamplingParams::greedy() });
        let picks: Vec<u32> = (0..2000).map(|_| s.sample(&flat)).collect();
        assert!(picks.iter().all(|&t| t < 2500), "ties keep the lowest indices");
        assert!(picks.iter().any(|&t| t > 64));
        // Without top_p or top_k every token can be drawn, in proportion.
        let two = [0.0f32, (3.0f32).ln()];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 5, ..SamplingParams::greedy() });
        let ones = (0..20_000).filter(|_| s.sample(&two) == 1).count() as f64 / 20_000.0;
        assert!((ones - 0.75).abs() < 0.02, "{ones}");
    }

    #[test]
    fn top_k_limits_choices() {
        let logits = [5.0, 4.9, -10.0, -10.0];
        let mut s = Sampler::new(SamplingParams { temperature: 5.0, top_p: 1.0, top_k: 2, seed: 1, ..SamplingParams::greedy() });
        for _ in 0..100 {
            assert!(s.sample(&logits) < 2);
        }
    }

    #[test]
    fn bias_and_penalties_shift_the_choice_as_openai_defines_them() {
        let logits = [2.0f32, 1.0, 0.5];
        let mut s = Sampler::new(SamplingParams::greedy());
        s.bias(vec![(2, 10.0)]);
        assert_eq!(s.sample(&logits), 2, "a +10 bias wins");
        // Frequency: token 0 drops by 1.5 per earlier pick; presence: once.
        let p = SamplingParams { frequency_penalty: 1.5, ..SamplingParams::greedy() };
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&logits), 0);
        assert_eq!(s.sample(&logits), 1, "2.0 - 1.5 < 1.0");
        let p = SamplingParams { presence_penalty: 0.9, ..SamplingParams::greedy() };
        let mut s = Sampler::new(p);
        assert_eq!((s.sample(&logits), s.sample(&logits)), (0, 0), "2.0 - 0.9 > 1.0");
        // Repetition: a prompt token's positive logit is divided, a negative one multiplied.
        let p = SamplingParams { repetition_penalty: 4.0, ..SamplingParams::greedy() };
        let mut s = Sampler::new(p);
        s.set_prompt(&[0]);
        assert_eq!(s.sample(&logits), 1, "2.0 / 4 < 1.0");
    }

    /// Typical sampling keeps the tokens nearest the entropy first: with one dominant token
    /// (low entropy) and a small typical mass, only the dominant token survives; a flat
    /// distribution keeps tokens from all over it.
    #[test]
    fn typical_p_keeps_the_locally_typical_set() {
        let logits = [8.0f32, 0.0, 0.0, 0.0];
        let p = SamplingParams { temperature: 1.0, typical_p: 0.5, seed: 9, ..SamplingParams::greedy() };
        let mut s = Sampler::new(p);
        assert!((0..200).all(|_| s.sample(&logits) == 0), "the dominant token is the typical one");
        let flat = [1.0f32; 8];
        let mut s = Sampler::new(SamplingParams { typical_p: 0.9, ..p });
        let seen: std::collections::HashSet<u32> = (0..400).map(|_| s.sample(&flat)).collect();
        assert!(seen.len() >= 7, "a flat distribution is all typical: {seen:?}");
        // The spec: log-softmax of one entry.
        assert!((logprob_of(&[0.0, 0.0], 1) - 0.5f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn logprobs_are_the_log_softmax_with_the_top_alternatives_in_order() {
        let pieces: Vec<Vec<u8>> = ["a", "b", "c", "</s>"].iter().map(|p| p.as_bytes().to_vec()).collect();
        let table = TokenTable::new(&pieces, &[3]).unwrap();
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let mut s = Sampler::new(SamplingParams::greedy());
        s.report_logprobs(2, table);
        assert_eq!(s.sample(&logits), 1);
        let got = s.take_logprobs();
        let z: f32 = logits.iter().map(|l| l.exp()).sum::<f32>().ln();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].bytes, b"b");
        assert!((got[0].logprob - (3.0 - z)).abs() < 1e-5);
        let top: Vec<(u32, f32)> = got[0].top.iter().map(|(t, _, lp)| (*t, *lp)).collect();
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((top[1].1 - (2.0 - z)).abs() < 1e-5);
        assert!(s.take_logprobs().is_empty(), "taken once");
    }
}
