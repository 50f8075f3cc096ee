//! Multi-head self-attention over padding-free batches: each input attends only to its own
//! tokens, so no padding is ever computed and no mask is needed.
//!
//! Per input and head: scores = q·kᵀ/√d, softmax, then the weighted sum of v, on keys laid
//! out in transposed blocks of 16 positions — the layout of the decode KV cache, so the
//! encoder and the generator share `attend_blocked`. Inputs run in parallel; the scratch
//! (the blocked keys and one score row) is per thread and reused, never allocated per call.

use std::cell::RefCell;

use super::{Disjoint, Parallel};

use crate::multiversion;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

multiversion! {
    /// Attention for one input: `qkv` holds its rows (`[len, 3·heads·d]`: q, k, v side by
    /// side), `ctx` receives `[len, heads·d]`; `scratch` is at least `scratch_len(len, d)`
    /// long. Per head the keys are laid out as the decode cache lays them out (blocks of 16
    /// positions, transposed) and every query runs `attend_blocked`.
    fn attend_one(qkv: &[f32], ctx: &mut [f32], heads: usize, d: usize, scratch: &mut [f32]) {
        let h_all = heads * d;
        let len = ctx.len() / h_all;
        let padded = len.div_ceil(KEY_BLOCK) * KEY_BLOCK;
        let scale = 1.0 / (d as f32).sqrt();
        let (kt, rest) = scratch.split_at_mut(d * padded);
        let scores = &mut rest[..padded];
        for h in 0..heads {
            let (q_off, k_off, v_off) = (h * d, h_all + h * d, 2 * h_all + h * d);
            for j in 0..len {
                put_key(kt, j, &qkv[j * 3 * h_all + k_off..j * 3 * h_all + k_off + d]);
            }
            let layout = HeadLayout { k_width: d, k_head: 0, v_stride: 3 * h_all, v_offset: v_off };
            for i in 0..len {
                let q = &qkv[i * 3 * h_all + q_off..i * 3 * h_all + q_off + d];
                let out = &mut ctx[i * h_all + h * d..i * h_all + (h + 1) * d];
                attend_blocked(q, kt, qkv, layout, len, scale, scores, out);
            }
        }
    }
}

/// Scratch floats `attend_one` needs for an input of `len` tokens and heads of `d`.
fn scratch_len(len: usize, d: usize) -> usize {
    let padded = len.div_ceil(KEY_BLOCK) * KEY_BLOCK;
    d * padded + padded
}

/// Attention for a packed batch: input `i` owns rows `cu_seqlens[i]..cu_seqlens[i+1]` of
/// `qkv` (`[T, 3·heads·d]`) and of `ctx` (`[T, heads·d]`). Inputs are split over `par`.
pub fn attention(qkv: &[f32], ctx: &mut [f32], cu_seqlens: &[u32], heads: usize, d: usize, par: &dyn Parallel) {
    let h_all = heads * d;
    let inputs = cu_seqlens.len().saturating_sub(1);
    let total = cu_seqlens.last().map_or(0, |&t| t as usize);
    assert!(qkv.len() >= total * 3 * h_all && ctx.len() >= total * h_all, "attention: buffers shorter than the batch");
    assert!(cu_seqlens.windows(2).all(|w| w[0] <= w[1]), "attention: offsets out of order");
    let out = Disjoint::new(ctx.as_mut_ptr()); // each input writes its own rows
    let run = |i: usize| {
        let (a, b) = (cu_seqlens[i] as usize, cu_seqlens[i + 1] as usize);
        // SAFETY: input i's rows a..b of ctx are its own (offsets ordered, asserted) and
        // within ctx (asserted); no other task touches them.
        let c = unsafe { std::slice::from_raw_parts_mut(out.get().add(a * h_all), (b - a) * h_all) };
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < scratch_len(b - a, d) {
                s.resize(scratch_len(b - a, d), 0.0);
            }
            attend_one(&qkv[a * 3 * h_all..b * 3 * h_all], c, heads, d, &mut s);
        });
    };
    if inputs > 1 {
        par.for_each(inputs, &run);
    } else {
        (0..inputs).for_each(run);
    }
}

/// Positions per block of the transposed key cache (one 512-bit register of scores).
pub const KEY_BLOCK: usize = 16;

/// Appends one position's keys (`kv_w = kv_heads·d` floats) to a key cache laid out in
/// blocks of 16 positions, `[block][kv_head·d + c][position in block]`: the scores of a
/// block are then `d` vector multiply-adds with no horizontal sums (a row-major cache needs
/// a 16-lane reduction per position and head, which dominated decode attention).
pub fn push_key(kt: &mut Vec<f32>, pos: usize, key: &[f32]) {
    let end = (pos / KEY_BLOCK + 1) * key.len() * KEY_BLOCK;
    if kt.len() < end {
        kt.resize(end, 0.0);
    }
    put_key(kt, pos, key);
}

/// Writes position `pos`'s keys into a blocked key buffer already long enough for it.
fn put_key(kt: &mut [f32], pos: usize, key: &[f32]) {
    let (block, lane) = (pos / KEY_BLOCK, pos % KEY_BLOCK);
    let base = block * key.len() * KEY_BLOCK;
    for (c, &k) in key.iter().enumerate() {
        kt[base + c * KEY_BLOCK + lane] = k;
    }
}

/// The scores of one block of 16 positions for a head of `D` dimensions: `D` vector
/// multiply-adds in four independent chains.
#[inline(always)]
fn block_scores<const D: usize>(q: &[f32], keys: &[f32], scale: f32, s: &mut [f32]) {
    let (q, keys) = (&q[..D], &keys[..D * KEY_BLOCK]);
    let mut acc = [[0f32; KEY_BLOCK]; 4];
    for c in 0..D {
        let kk = &keys[c * KEY_BLOCK..(c + 1) * KEY_BLOCK];
        for l in 0..KEY_BLOCK {
            acc[c % 4][l] = q[c].mul_add(kk[l], acc[c % 4][l]);
        }
    }
    for l in 0..KEY_BLOCK {
        s[l] = ((acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l])) * scale;
    }
}

/// `out = inv · Σ_t p[t] · v[t]` for a head of `D` dimensions: the sums live in registers
/// across positions (a runtime width keeps them in memory, a load and store per product),
/// in two chains over even and odd positions so the multiply-adds overlap.
#[inline(always)]
fn weighted_sum<const D: usize>(p: &[f32], v: &[f32], stride: usize, offset: usize, inv: f32, out: &mut [f32]) {
    let (mut a, mut b) = ([0f32; D], [0f32; D]);
    let row = |t: usize| &v[t * stride + offset..t * stride + offset + D];
    let mut t = 0;
    while t + 1 < p.len() {
        let (v0, v1) = (row(t), row(t + 1));
        for i in 0..D {
            a[i] = p[t].mul_add(v0[i], a[i]);
            b[i] = p[t + 1].mul_add(v1[i], b[i]);
        }
        t += 2;
    }
    if t < p.len() {
        let v0 = row(t);
        for i in 0..D {
            a[i] = p[t].mul_add(v0[i], a[i]);
        }
    }
    for (i, o) in out[..D].iter_mut().enumerate() {
        *o = (a[i] + b[i]) * inv;
    }
}

/// One query head against `len` cached positions. `kt` is the layer's key cache as
/// `push_key` lays it out, `v` its values (`len` rows of `kv_w` floats); this head reads
/// kv head `kv_head`. Writes the attention output to `out`; `scores` is scratch of at
/// least `len` rounded up to 16.
#[allow(clippy::too_many_arguments)]
pub fn attend_cached(q: &[f32], kt: &[f32], v: &[f32], kv_w: usize, kv_head: usize, len: usize, scale: f32, scores: &mut [f32], out: &mut [f32]) {
    let layout = HeadLayout { k_width: kv_w, k_head: kv_head, v_stride: kv_w, v_offset: kv_head * q.len() };
    attend_blocked(q, kt, v, layout, len, scale, scores, out)
}

/// Where one head's keys and values sit.
#[derive(Debug, Clone, Copy)]
pub struct HeadLayout {
    /// Floats per position in the blocked keys (`push_key`'s `kv_w`), and this head's index
    /// among them in units of the head size.
    pub k_width: usize,
    pub k_head: usize,
    /// Floats from one position's values to the next, and where this head's start.
    pub v_stride: usize,
    pub v_offset: usize,
}

multiversion! {
    /// Softmax attention of one query against `len` positions of blocked keys `kt` and
    /// values `v`, as `layout` places them.
    pub fn attend_blocked(q: &[f32], kt: &[f32], v: &[f32], layout: HeadLayout, len: usize, scale: f32, scores: &mut [f32], out: &mut [f32]) {
        let d = q.len();
        let blocks = len.div_ceil(KEY_BLOCK);
        let scores = &mut scores[..blocks * KEY_BLOCK];
        for (blk, s) in scores.chunks_exact_mut(KEY_BLOCK).enumerate() {
            let base = blk * layout.k_width * KEY_BLOCK + layout.k_head * d * KEY_BLOCK;
            let keys = &kt[base..base + d * KEY_BLOCK];
            match d {
                32 => block_scores::<32>(q, keys, scale, s),
                64 => block_scores::<64>(q, keys, scale, s),
                128 => block_scores::<128>(q, keys, scale, s),
                _ => {
                    s.fill(0.0);
                    for (c, kk) in keys.chunks_exact(KEY_BLOCK).enumerate() {
                        for l in 0..KEY_BLOCK {
                            s[l] = q[c].mul_add(kk[l], s[l]);
                        }
                    }
                    s.iter_mut().for_each(|x| *x *= scale);
                }
            }
        }
        let scores = &mut scores[..len];
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
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
        let (stride, offset) = (layout.v_stride, layout.v_offset);
        match d {
            32 => weighted_sum::<32>(scores, v, stride, offset, inv, out),
            64 => weighted_sum::<64>(scores, v, stride, offset, inv, out),
            128 => weighted_sum::<128>(scores, v, stride, offset, inv, out),
            _ => {
                out.fill(0.0);
                for (t, p) in scores.iter().enumerate() {
                    for (o, vv) in out.iter_mut().zip(&v[t * stride + offset..t * stride + offset + d]) {
                        *o = p.mul_add(*vv, *o);
                    }
                }
                out.iter_mut().for_each(|o| *o *= inv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_attention_per_input() {
        // A generic head size and MiniLM's (32, the specialized path); inputs shorter than,
        // equal to and longer than a key block.
        for (heads, d) in [(3usize, 8usize), (2, 32)] {
            check_against_naive(heads, d);
        }
    }

    fn check_against_naive(heads: usize, d: usize) {
        let h_all = heads * d;
        let cu = [0u32, 5, 6, 13, 29, 45];
        let t = 45;
        let qkv: Vec<f32> = (0..t * 3 * h_all).map(|i| ((i * 7919) % 1009) as f32 / 500.0 - 1.0).collect();
        let mut ctx = vec![f32::NAN; t * h_all];
        attention(&qkv, &mut ctx, &cu, heads, d, &crate::cpu::Rayon(2));
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
                        let want: f64 = (a..b).map(|j| (scores[j - a] - m).exp() / z * qkv[j * 3 * h_all + 2 * h_all + h * d + c] as f64).sum();
                        let got = ctx[i * h_all + h * d + c] as f64;
                        assert!((got - want).abs() < 1e-5, "input at {a}, head {h}, token {i}, dim {c}: {got} vs {want}");
                    }
                }
            }
        }
    }

    /// The blocked key cache against a row-major one and a naive softmax, for head sizes
    /// that are and are not even, lengths inside, at and past a block boundary.
    #[test]
    fn cached_attention_matches_naive() {
        for (kv_heads, d) in [(3usize, 64usize), (2, 5)] {
            let kv_w = kv_heads * d;
            for len in [1usize, 15, 16, 17, 37] {
                let keys = crate::cpu::random_f32(len * kv_w, 11);
                let values = crate::cpu::random_f32(len * kv_w, 12);
                let q = crate::cpu::random_f32(d, 13 + len as u64);
                let mut kt = Vec::new();
                for t in 0..len {
                    push_key(&mut kt, t, &keys[t * kv_w..(t + 1) * kv_w]);
                }
                let scale = 1.0 / (d as f32).sqrt();
                for kv_head in 0..kv_heads {
                    let mut scores = vec![0f32; len.div_ceil(KEY_BLOCK) * KEY_BLOCK];
                    let mut out = vec![f32::NAN; d];
                    attend_cached(&q, &kt, &values, kv_w, kv_head, len, scale, &mut scores, &mut out);
                    let s: Vec<f64> =
                        (0..len).map(|t| (0..d).map(|c| q[c] as f64 * keys[t * kv_w + kv_head * d + c] as f64).sum::<f64>() * scale as f64).collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for c in 0..d {
                        let want: f64 = (0..len).map(|t| (s[t] - m).exp() / z * values[t * kv_w + kv_head * d + c] as f64).sum();
                        assert!((out[c] as f64 - want).abs() < 1e-5, "d {d} len {len} head {kv_head} dim {c}: {} vs {want}", out[c]);
                    }
                }
            }
        }
    }
}
