//! The BERT forward pass on the CPU with our own kernels: what runs on a machine without a GPU.
//!
//! Same math as `bert.rs` (candle, any device), shaped for a CPU: activations live in
//! buffers owned by the model and reused across batches (no allocation per op), the dense
//! layers run on weights packed once at load with the bias and GELU fused into the multiply
//! (`cpu::gemm`), residual+LayerNorm is one pass, and attention runs per input on its own
//! tokens (no padding at all).

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::files::BertConfig;
use crate::batching::packed::PackedBatch;
use crate::cpu::attention::attention;
use crate::cpu::gemm::{Epilogue, PackedLinear};
use crate::cpu::norm::{add_layer_norm, layer_norm};

struct Dense {
    packed: PackedLinear,
    output: usize,
}

impl Dense {
    fn new(w: &[f32], b: &[f32], input: usize, output: usize) -> Dense {
        Dense { packed: PackedLinear::new(w, b, output, input), output }
    }
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

struct Layer {
    qkv: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    up: Dense,
    down: Dense,
    out_norm: Norm,
}

/// A sequence-classification head: pooler (dense + tanh on CLS) and classifier.
struct Head {
    pooler: Dense,
    classifier: Dense,
}

/// Activation buffers, grown to the largest batch seen and then reused.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    tmp: Vec<f32>,
    inter: Vec<f32>,
}

/// A BERT encoder on the CPU.
pub struct CpuBert {
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    head: Option<Head>,
    hidden: usize,
    heads: usize,
    eps: f32,
    gelu: Epilogue,
    max_positions: usize,
    type_vocab: usize,
    vocab: usize,
    threads: usize,
    scratch: Scratch,
}

fn read(vb: &VarBuilder, shape: &[usize], name: &str) -> candle_core::Result<Vec<f32>> {
    vb.get(shape, name)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

fn dense(vb: &VarBuilder, input: usize, output: usize) -> candle_core::Result<Dense> {
    Ok(Dense::new(&read(vb, &[output, input], "weight")?, &read(vb, &[output], "bias")?, input, output))
}

fn norm(vb: &VarBuilder, width: usize) -> candle_core::Result<Norm> {
    Ok(Norm { gamma: read(vb, &[width], "weight")?, beta: read(vb, &[width], "bias")? })
}

impl CpuBert {
    /// Loads the weights of `dir/model.safetensors` into our own buffers (f32).
    pub fn load(dir: &Path, cfg: &BertConfig, head_labels: Option<usize>, threads: usize) -> Result<Self, String> {
        let weights = dir.join("model.safetensors");
        // SAFETY: the file was verified against its digest just before and is not modified
        // while mapped; every tensor is copied out before the map is dropped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &Device::Cpu) }
            .map_err(|e| format!("cannot read {}: {e}", weights.display()))?;
        Self::from_vb(&vb, cfg, head_labels, threads).map_err(|e| format!("cannot build the model: {e}"))
    }

    fn from_vb(vb: &VarBuilder, cfg: &BertConfig, head_labels: Option<usize>, threads: usize) -> candle_core::Result<Self> {
        let root = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") { vb.pp("bert") } else { vb.clone() };
        let h = cfg.hidden_size;
        let emb = root.pp("embeddings");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = root.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            let s = a.pp("self");
            // q, k and v as one [3H, H] projection: one matmul instead of three.
            let mut w = Vec::with_capacity(3 * h * h);
            let mut b = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                w.extend(read(&s.pp(part), &[h, h], "weight")?);
                b.extend(read(&s.pp(part), &[h], "bias")?);
            }
            layers.push(Layer {
                qkv: Dense::new(&w, &b, h, 3 * h),
                attn_out: dense(&a.pp("output.dense"), h, h)?,
                attn_norm: norm(&a.pp("output.LayerNorm"), h)?,
                up: dense(&l.pp("intermediate.dense"), h, cfg.intermediate_size)?,
                down: dense(&l.pp("output.dense"), cfg.intermediate_size, h)?,
                out_norm: norm(&l.pp("output.LayerNorm"), h)?,
            });
        }
        let head = match head_labels {
            Some(labels) => Some(Head { pooler: dense(&root.pp("pooler.dense"), h, h)?, classifier: dense(&vb.pp("classifier"), h, labels)? }),
            None => None,
        };
        Ok(CpuBert {
            word: read(&emb.pp("word_embeddings"), &[cfg.vocab_size, h], "weight")?,
            position: read(&emb.pp("position_embeddings"), &[cfg.max_position_embeddings, h], "weight")?,
            token_type: read(&emb.pp("token_type_embeddings"), &[cfg.type_vocab_size, h], "weight")?,
            embed_norm: norm(&emb.pp("LayerNorm"), h)?,
            layers,
            head,
            hidden: h,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps as f32,
            gelu: if cfg.hidden_act == "gelu" { Epilogue::Gelu } else { Epilogue::GeluTanh },
            max_positions: cfg.max_position_embeddings,
            type_vocab: cfg.type_vocab_size,
            vocab: cfg.vocab_size,
            threads: threads.max(1),
            scratch: Scratch::default(),
        })
    }

    /// Hidden width.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    fn run_dense(&self, d: &Dense, x: &[f32], out: &mut [f32], rows: usize, epilogue: Epilogue) {
        d.packed.forward(x, rows, out, epilogue, self.threads);
    }

    /// Final hidden states of every token, packed `[total_tokens, H]` (borrowed from the
    /// model's buffers until the next call).
    pub fn forward(&mut self, batch: &PackedBatch) -> Result<&[f32], String> {
        let (t, h) = (batch.tokens(), self.hidden);
        let inter = self.layers.first().map_or(0, |l| l.up.output);
        let mut s = std::mem::take(&mut self.scratch);
        for (buf, len) in [(&mut s.x, t * h), (&mut s.qkv, 3 * t * h), (&mut s.ctx, t * h), (&mut s.tmp, t * h), (&mut s.inter, t * inter)] {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
        }
        let result = self.forward_into(batch, &mut s);
        self.scratch = s;
        result?;
        Ok(&self.scratch.x[..t * h])
    }

    fn forward_into(&self, batch: &PackedBatch, s: &mut Scratch) -> Result<(), String> {
        let (t, h) = (batch.tokens(), self.hidden);
        for (i, row) in s.x[..t * h].chunks_exact_mut(h).enumerate() {
            let (id, pos, ty) = (batch.ids[i] as usize, batch.positions[i] as usize, batch.type_ids[i] as usize);
            if id >= self.vocab || pos >= self.max_positions || ty >= self.type_vocab {
                return Err(format!("token {i} is out of range (id {id}, position {pos}, type {ty})"));
            }
            let (w, p, y) = (&self.word[id * h..(id + 1) * h], &self.position[pos * h..(pos + 1) * h], &self.token_type[ty * h..(ty + 1) * h]);
            for (j, v) in row.iter_mut().enumerate() {
                *v = w[j] + p[j] + y[j];
            }
        }
        layer_norm(&mut s.x[..t * h], &self.embed_norm.gamma, &self.embed_norm.beta, self.eps);
        let d = h / self.heads;
        for layer in &self.layers {
            let i = layer.up.output;
            self.run_dense(&layer.qkv, &s.x, &mut s.qkv, t, Epilogue::None);
            attention(&s.qkv[..3 * t * h], &mut s.ctx[..t * h], &batch.cu_seqlens, self.heads, d);
            self.run_dense(&layer.attn_out, &s.ctx, &mut s.tmp, t, Epilogue::None);
            add_layer_norm(&mut s.tmp[..t * h], &s.x[..t * h], &layer.attn_norm.gamma, &layer.attn_norm.beta, self.eps);
            std::mem::swap(&mut s.x, &mut s.tmp);
            // GELU is applied as the up-projection's outputs are stored (fused epilogue).
            self.run_dense(&layer.up, &s.x, &mut s.inter, t, self.gelu);
            self.run_dense(&layer.down, &s.inter[..t * i], &mut s.tmp, t, Epilogue::None);
            add_layer_norm(&mut s.tmp[..t * h], &s.x[..t * h], &layer.out_norm.gamma, &layer.out_norm.beta, self.eps);
            std::mem::swap(&mut s.x, &mut s.tmp);
        }
        Ok(())
    }

    /// Class logits `[inputs, labels]` from the hidden states `forward` just returned.
    pub fn classify(&self, batch: &PackedBatch) -> Option<Vec<Vec<f32>>> {
        let head = self.head.as_ref()?;
        let h = self.hidden;
        let n = batch.len();
        let mut cls = Vec::with_capacity(n * h);
        for &start in &batch.cu_seqlens[..n] {
            let start = start as usize;
            cls.extend_from_slice(&self.scratch.x[start * h..(start + 1) * h]);
        }
        let mut pooled = vec![0f32; n * h];
        head.pooler.packed.forward(&cls, n, &mut pooled, Epilogue::None, 1);
        pooled.iter_mut().for_each(|v| *v = v.tanh());
        let labels = head.classifier.output;
        let mut logits = vec![0f32; n * labels];
        head.classifier.packed.forward(&pooled, n, &mut logits, Epilogue::None, 1);
        Some(logits.chunks_exact(labels).map(<[f32]>::to_vec).collect())
    }
}
