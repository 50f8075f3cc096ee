//! The Llama forward pass on the CPU, for a step that mixes sequences.
//!
//! One step takes rows from several sequences at once — a chunk of one sequence's prompt,
//! the last token of each decoding sequence — so prefill and decode share the step and every
//! weight block is read once for all of them (`cpu::quant::qmatmul`). Each row carries its
//! sequence and position; attention reads that sequence's own KV cache, causally.

use std::cell::RefCell;

use crate::cpu::attention::{attend_cached, push_key, KEY_BLOCK};
use crate::cpu::gemm::{Epilogue, PackedLinear};
use crate::cpu::math::swiglu;
use crate::cpu::norm::{rms_norm, rms_norm_into};
use crate::cpu::quant::{qmatmul, qmatmul_columns, Kernel, QActs, QMatrix};
use crate::cpu::{Disjoint, Parallel};

thread_local! {
    /// Attention scores of one query row, per thread, reused.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The shape of a Llama model.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub context: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
}

/// A projection's weights: quantized (activations quantized to 8 bits per block, the
/// serving path) or exact (f32 weights and activations: the reference the engine is checked
/// against, on the same weights dequantized).
pub enum Linear {
    /// Output rows in consecutive parts, one per weight format: fused projections (q, k and
    /// v; gate and up) are one matrix when their parts share a format, and side-by-side
    /// matrices over the same quantized activations when a mixed file (Q4_K_M) stores them
    /// differently.
    Quant(Vec<QMatrix>),
    Exact(PackedLinear),
}

impl Linear {
    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Linear::Quant(parts) => parts.iter().map(|m| m.rows).sum(),
            Linear::Exact(p) => p.n,
        }
    }

    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::Quant(parts) => parts.iter().map(QMatrix::bytes).sum(),
            Linear::Exact(p) => 4 * p.n * p.k,
        }
    }

    /// `out[n × rows] = x[n × cols] · wᵀ`.
    fn apply(&self, x: &[f32], n: usize, out: &mut [f32], acts: &mut QActs, par: &dyn Parallel) {
        match self {
            Linear::Quant(parts) => {
                acts.quantize_par(x, n, parts[0].cols, par);
                if let [m] = &parts[..] {
                    return qmatmul(m, acts, out, par);
                }
                let (ld, kernel) = (self.rows(), Kernel::detect());
                let mut col = 0;
                for m in parts {
                    qmatmul_columns(kernel, m, acts, out, ld, col, par);
                    col += m.rows;
                }
            }
            Linear::Exact(p) => p.forward(x, n, out, Epilogue::None, par),
        }
    }
}

/// One decoder block's weights.
pub struct Block {
    pub attn_norm: Vec<f32>,
    /// q, k and v stacked: `(heads + 2·kv_heads)·head_dim` rows.
    pub qkv: Linear,
    pub attn_out: Linear,
    pub ffn_norm: Vec<f32>,
    /// gate and up stacked: `2·intermediate` rows.
    pub gate_up: Linear,
    pub down: Linear,
}

/// All weights.
pub struct LlamaWeights {
    pub config: LlamaConfig,
    /// Token embeddings (rows are dequantized on lookup, exactly).
    pub embed: QMatrix,
    pub blocks: Vec<Block>,
    pub norm: Vec<f32>,
    pub output: Linear,
}

/// A sequence's keys and values, per layer. Keys are transposed in blocks of 16 positions
/// (`cpu::attention::push_key`), values are `[position][kv_head][head_dim]`.
#[derive(Default)]
pub struct KvCache {
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// Positions filled.
    pub len: usize,
}

impl KvCache {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        KvCache { k: vec![Vec::new(); layers], v: vec![Vec::new(); layers], len: 0 }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * self.k.iter().chain(&self.v).map(Vec::capacity).sum::<usize>()
    }
}

/// One row of a step: a token of a sequence at a position.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// Index into the step's caches.
    pub seq: usize,
    pub pos: usize,
    pub token: u32,
    /// Compute logits for this row (the last row of each sequence in the step).
    pub logits: bool,
}

/// Buffers reused across steps.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    acts: QActs,
    last: Vec<f32>,
    /// Per row: its position's RoPE table, computed once for every head and layer.
    rope: Vec<Vec<(f32, f32)>>,
    /// Logits of the rows that asked for them, in row order (`vocab` each).
    pub logits: Vec<f32>,
}

fn grow(buf: &mut Vec<f32>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
}

/// The RoPE angles' cosines and sines for one position: `[cos_i, sin_i]` for each pair,
/// with `θ_i = pos / base^(2i/d)` computed as candle computes it (f32 inverse frequencies).
fn rope_table(pos: usize, d: usize, base: f32, out: &mut Vec<(f32, f32)>) {
    out.clear();
    for i in 0..d / 2 {
        let inv_freq = 1f32 / base.powf((2 * i) as f32 / d as f32);
        let (s, c) = (pos as f32 * inv_freq).sin_cos();
        out.push((c, s));
    }
}

/// Rotates pairs `(x[2i], x[2i+1])`: the rotation GGUF Llama weights are laid out for
/// (llama.cpp's "normal" RoPE; candle's `rope_i`).
fn rope(x: &mut [f32], table: &[(f32, f32)]) {
    for (i, &(c, s)) in table.iter().enumerate() {
        let (a, b) = (x[2 * i], x[2 * i + 1]);
        x[2 * i] = a * c - b * s;
        x[2 * i + 1] = a * s + b * c;
    }
}

impl LlamaWeights {
    /// Runs one step. `caches[row.seq]` must hold exactly `row.pos` positions before the
    /// sequence's first row of the step; rows of one sequence are consecutive positions.
    /// Logits of the rows with `logits: true` land in `scratch.logits`, in row order.
    pub fn step(&self, rows: &[Row], caches: &mut [&mut KvCache], scratch: &mut Scratch, par: &dyn Parallel) {
        let c = &self.config;
        let (n, h, hd) = (rows.len(), c.hidden, c.head_dim);
        let (q_w, kv_w) = (c.heads * hd, c.kv_heads * hd);
        let qkv_w = q_w + 2 * kv_w;
        let s = scratch;
        grow(&mut s.x, n * h);
        grow(&mut s.h, n * h);
        grow(&mut s.qkv, n * qkv_w);
        grow(&mut s.attn, n * q_w);
        grow(&mut s.proj, n * h);
        grow(&mut s.gate_up, n * 2 * c.intermediate);
        grow(&mut s.act, n * c.intermediate);

        s.rope.resize_with(n, Vec::new);
        for (r, row) in rows.iter().enumerate() {
            self.embed.dequantize_row(row.token as usize, &mut s.x[r * h..(r + 1) * h]);
            rope_table(row.pos, hd, c.rope_base, &mut s.rope[r]);
        }
        for (layer, block) in self.blocks.iter().enumerate() {
            // Attention.
            rms_norm_into(&s.x[..n * h], &mut s.h[..n * h], &block.attn_norm, c.rms_eps);
            block.qkv.apply(&s.h[..n * h], n, &mut s.qkv, &mut s.acts, par);
            for (r, row) in rows.iter().enumerate() {
                let qkv = &mut s.qkv[r * qkv_w..(r + 1) * qkv_w];
                for head in qkv[..q_w + kv_w].chunks_exact_mut(hd) {
                    rope(head, &s.rope[r]);
                }
                let cache = &mut caches[row.seq];
                debug_assert_eq!(cache.v[layer].len(), row.pos * kv_w);
                push_key(&mut cache.k[layer], row.pos, &qkv[q_w..q_w + kv_w]);
                cache.v[layer].extend_from_slice(&qkv[q_w + kv_w..]);
            }
            self.attend(rows, caches, layer, s, par);
            block.attn_out.apply(&s.attn[..n * q_w], n, &mut s.proj, &mut s.acts, par);
            for (x, p) in s.x[..n * h].iter_mut().zip(&s.proj[..n * h]) {
                *x += *p;
            }
            // Feed-forward (SwiGLU).
            rms_norm_into(&s.x[..n * h], &mut s.h[..n * h], &block.ffn_norm, c.rms_eps);
            block.gate_up.apply(&s.h[..n * h], n, &mut s.gate_up, &mut s.acts, par);
            swiglu(&s.gate_up[..n * 2 * c.intermediate], &mut s.act[..n * c.intermediate], c.intermediate);
            block.down.apply(&s.act[..n * c.intermediate], n, &mut s.proj, &mut s.acts, par);
            for (x, p) in s.x[..n * h].iter_mut().zip(&s.proj[..n * h]) {
                *x += *p;
            }
        }
        for row in rows {
            let cache = &mut caches[row.seq];
            cache.len = cache.len.max(row.pos + 1);
        }
        // Logits only where a token will be sampled: the vocabulary matrix is the largest.
        let wanted: Vec<usize> = rows.iter().enumerate().filter(|(_, r)| r.logits).map(|(i, _)| i).collect();
        grow(&mut s.last, wanted.len() * h);
        for (j, &r) in wanted.iter().enumerate() {
            s.last[j * h..(j + 1) * h].copy_from_slice(&s.x[r * h..(r + 1) * h]);
        }
        rms_norm(&mut s.last[..wanted.len() * h], &self.norm, c.rms_eps);
        s.logits.resize(wanted.len() * c.vocab, 0.0);
        self.output.apply(&s.last[..wanted.len() * h], wanted.len(), &mut s.logits, &mut s.acts, par);
    }

    /// The logits for the token after `tokens` (one fresh sequence, one step).
    pub fn next_token_logits(&self, tokens: &[u32], par: &dyn Parallel) -> Vec<f32> {
        let rows: Vec<Row> = tokens.iter().enumerate().map(|(i, &t)| Row { seq: 0, pos: i, token: t, logits: i + 1 == tokens.len() }).collect();
        let mut cache = KvCache::new(self.config.layers);
        let mut scratch = Scratch::default();
        self.step(&rows, &mut [&mut cache], &mut scratch, par);
        scratch.logits[..self.config.vocab].to_vec()
    }

    /// Causal grouped-query attention of every row against its sequence's cache.
    fn attend(&self, rows: &[Row], caches: &[&mut KvCache], layer: usize, s: &mut Scratch, par: &dyn Parallel) {
        let c = &self.config;
        let hd = c.head_dim;
        let (q_w, kv_w) = (c.heads * hd, c.kv_heads * hd);
        let qkv_w = q_w + 2 * kv_w;
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let qkv = &s.qkv;
        // Rows of the attention output, written by one task each.
        let out_ptr = Disjoint::new(s.attn.as_mut_ptr());
        let work = |r: usize| {
            // SAFETY: row r's output is its own q_w-wide slice of `attn` (sized by `step`).
            let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(r * q_w), q_w) };
            let row = rows[r];
            let cache = &caches[row.seq];
            let len = row.pos + 1;
            SCORES.with(|scores| {
                let mut scores = scores.borrow_mut();
                let padded = len.div_ceil(KEY_BLOCK) * KEY_BLOCK;
                if scores.len() < padded {
                    scores.resize(padded, 0.0);
                }
                for head in 0..c.heads {
                    let q = &qkv[r * qkv_w + head * hd..r * qkv_w + (head + 1) * hd];
                    let o = &mut out[head * hd..(head + 1) * hd];
                    attend_cached(q, &cache.k[layer], &cache.v[layer], kv_w, head / group, len, scale, &mut scores, o);
                }
            });
        };
        par.for_each(rows.len(), &work);
    }
}
