//! Multi-head self-attention over padding-free batches: each input attends only to its own
//! tokens, so no padding is ever computed and no mask is needed.
//!
//! Per input and head: scores = q·kᵀ/√d (k transposed once so the inner loop runs over
//! contiguous memory), softmax, then the weighted sum of v. Inputs run in parallel; the
//! scratch (kᵀ and one score row) is per thread and reused, never allocated per call.

use std::cell::RefCell;

use rayon::prelude::*;

use super::math::softmax_prefix;
use crate::multiversion;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

multiversion! {
    /// Attention for one input: `qkv` holds its rows (`[len, 3·heads·d]`: q, k, v side by
    /// side), `ctx` receives `[len, heads·d]`; `scratch` is at least `d·len + len` long.
    fn attend_one(qkv: &[f32], ctx: &mut [f32], heads: usize, d: usize, scratch: &mut [f32]) {
        let h_all = heads * d;
        let len = ctx.len() / h_all;
        let scale = 1.0 / (d as f32).sqrt();
        let (kt, rest) = scratch.split_at_mut(d * len);
        let scores = &mut rest[..len];
        for h in 0..heads {
            let (q_off, k_off, v_off) = (h * d, h_all + h * d, 2 * h_all + h * d);
            for j in 0..len {
                let k = &qkv[j * 3 * h_all + k_off..j * 3 * h_all + k_off + d];
                for c in 0..d {
                    kt[c * len + j] = k[c];
                }
            }
            for i in 0..len {
                let q = &qkv[i * 3 * h_all + q_off..i * 3 * h_all + q_off + d];
                scores.fill(0.0);
                for c in 0..d {
                    let qc = q[c] * scale;
                    for (s, kv) in scores.iter_mut().zip(&kt[c * len..(c + 1) * len]) {
                        *s = qc.mul_add(*kv, *s);
                    }
                }
                softmax_prefix(scores, len);
                let out = &mut ctx[i * h_all + h * d..i * h_all + (h + 1) * d];
                out.fill(0.0);
                for (j, p) in scores.iter().enumerate() {
                    let v = &qkv[j * 3 * h_all + v_off..j * 3 * h_all + v_off + d];
                    for (o, vv) in out.iter_mut().zip(v) {
                        *o = p.mul_add(*vv, *o);
                    }
                }
            }
        }
    }
}

/// Attention for a packed batch: input `i` owns rows `cu_seqlens[i]..cu_seqlens[i+1]` of
/// `qkv` (`[T, 3·heads·d]`) and of `ctx` (`[T, heads·d]`).
pub fn attention(qkv: &[f32], ctx: &mut [f32], cu_seqlens: &[u32], heads: usize, d: usize) {
    let h_all = heads * d;
    // Split ctx into one disjoint slice per input.
    let mut pieces: Vec<(&[f32], &mut [f32])> = Vec::with_capacity(cu_seqlens.len());
    let mut rest = &mut ctx[..];
    for w in cu_seqlens.windows(2) {
        let (a, b) = (w[0] as usize, w[1] as usize);
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut((b - a) * h_all);
        pieces.push((&qkv[a * 3 * h_all..b * 3 * h_all], mine));
        rest = tail;
    }
    let run = |(q, c): (&[f32], &mut [f32])| {
        let len = c.len() / h_all;
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < d * len + len {
                s.resize(d * len + len, 0.0);
            }
            attend_one(q, c, heads, d, &mut s);
        });
    };
    if pieces.len() > 1 {
        pieces.into_par_iter().for_each(run);
    } else {
        pieces.into_iter().for_each(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_attention_per_input() {
        let (heads, d) = (3, 8);
        let h_all = heads * d;
        let cu = [0u32, 5, 6, 13];
        let t = 13;
        let qkv: Vec<f32> = (0..t * 3 * h_all).map(|i| ((i * 7919) % 1009) as f32 / 500.0 - 1.0).collect();
        let mut ctx = vec![f32::NAN; t * h_all];
        attention(&qkv, &mut ctx, &cu, heads, d);
        for w in cu.windows(2) {
            let (a, b) = (w[0] as usize, w[1] as usize);
            for h in 0..heads {
                for i in a..b {
                    let q = |c: usize| qkv[i * 3 * h_all + h * d + c] as f64;
                    let scores: Vec<f64> = (a..b)
                        .map(|j| (0..d).map(|c| q(c) * qkv[j * 3 * h_all + h_all + h * d + c] as f64).sum::<f64>() / (d as f64).sqrt())
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                    for c in 0..d {
                        let want: f64 = (a..b)
                            .map(|j| (scores[j - a] - m).exp() / z * qkv[j * 3 * h_all + 2 * h_all + h * d + c] as f64)
                            .sum();
                        let got = ctx[i * h_all + h * d + c] as f64;
                        assert!((got - want).abs() < 1e-5, "input at {a}, head {h}, token {i}, dim {c}: {got} vs {want}");
                    }
                }
            }
        }
    }
}

/// Dot product with 16 independent partial sums, so the loop vectorizes (a single running
/// sum would force strict left-to-right order).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

multiversion! {
    /// One query head against `len` cached positions: `k` and `v` hold `len` rows of
    /// `stride` floats, this head's key/value at `offset..offset + q.len()`. Writes the
    /// attention output to `out`; `scores` is scratch of at least `len`.
    pub fn attend_cached(q: &[f32], k: &[f32], v: &[f32], stride: usize, offset: usize, len: usize, scale: f32, scores: &mut [f32], out: &mut [f32]) {
        let d = q.len();
        let scores = &mut scores[..len];
        let mut max = f32::NEG_INFINITY;
        for (t, s) in scores.iter_mut().enumerate() {
            *s = dot(q, &k[t * stride + offset..t * stride + offset + d]) * scale;
            max = max.max(*s);
        }
        for s in scores.iter_mut() {
            *s = super::math::exp(*s - max);
        }
        let mut acc = [0f32; 16];
        let chunks = scores.chunks_exact(16);
        let rest: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for i in 0..16 {
                acc[i] += c[i];
            }
        }
        let inv = 1.0 / (acc.iter().sum::<f32>() + rest);
        out.fill(0.0);
        for (t, p) in scores.iter().enumerate() {
            let p = p * inv;
            for (o, vv) in out.iter_mut().zip(&v[t * stride + offset..t * stride + offset + d]) {
                *o = p.mul_add(*vv, *o);
            }
        }
    }
}
