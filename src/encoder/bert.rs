//! The BERT encoder forward pass on candle, for any device.
//!
//! Batches are padding-free: every input's tokens sit back to back (`[total_tokens, H]`),
//! so the dense layers — nearly all of the FLOPs — never compute on padding. Only
//! attention needs per-input structure: with the `flash-attn` feature on CUDA it runs
//! FlashAttention's variable-length kernel directly on the packed tokens (as TEI does);
//! otherwise the packed states are scattered into a length-sorted padded block for one
//! batched matmul with a key mask, and gathered back.
//!
//! Covers BERT-family sentence encoders (all-MiniLM, bge-small/base) and, with `head`,
//! `BertForSequenceClassification`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};

use super::files::BertConfig;
use crate::batching::packed::PackedBatch;

struct Attention {
    qkv: Linear,
    out: Linear,
    norm: LayerNorm,
    heads: usize,
    head_dim: usize,
}

struct Layer {
    attention: Attention,
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
    approximate_gelu: bool,
}

/// The classifier on top of `BertForSequenceClassification`: pooler (dense + tanh over the
/// CLS state) and a linear layer to one logit per label.
pub struct ClassifierHead {
    pooler: Linear,
    classifier: Linear,
}

/// A loaded BERT encoder.
pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    pub head: Option<ClassifierHead>,
    pub hidden: usize,
    device: Device,
    dtype: DType,
}

/// q, k and v as one `[3H, H]` projection: one matmul instead of three.
fn fused_qkv(vb: &VarBuilder, h: usize) -> candle_core::Result<Linear> {
    let load = |name: &str| -> candle_core::Result<(Tensor, Tensor)> {
        let p = vb.pp(name);
        Ok((p.get((h, h), "weight")?, p.get(h, "bias")?))
    };
    let (qw, qb) = load("query")?;
    let (kw, kb) = load("key")?;
    let (vw, vbias) = load("value")?;
    Ok(Linear::new(Tensor::cat(&[qw, kw, vw], 0)?, Some(Tensor::cat(&[qb, kb, vbias], 0)?)))
}

impl Bert {
    /// Builds the model from safetensors weights; `with_head` loads a sequence-classification head.
    pub fn load(vb: VarBuilder, cfg: &BertConfig, with_head: bool, labels: usize) -> candle_core::Result<Self> {
        let root = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") { vb.pp("bert") } else { vb.clone() };
        let h = cfg.hidden_size;
        let emb = root.pp("embeddings");
        let embedding = |name: &str, n: usize| -> candle_core::Result<Embedding> { Ok(Embedding::new(emb.pp(name).get((n, h), "weight")?, h)) };
        let word = embedding("word_embeddings", cfg.vocab_size)?;
        let position = embedding("position_embeddings", cfg.max_position_embeddings)?;
        let token_type = embedding("token_type_embeddings", cfg.type_vocab_size)?;
        let embed_norm = layer_norm(h, cfg.layer_norm_eps, emb.pp("LayerNorm"))?;
        let heads = cfg.num_attention_heads;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = root.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            layers.push(Layer {
                attention: Attention {
                    qkv: fused_qkv(&a.pp("self"), h)?,
                    out: linear(h, h, a.pp("output.dense"))?,
                    norm: layer_norm(h, cfg.layer_norm_eps, a.pp("output.LayerNorm"))?,
                    heads,
                    head_dim: h / heads,
                },
                intermediate: linear(h, cfg.intermediate_size, l.pp("intermediate.dense"))?,
                output: linear(cfg.intermediate_size, h, l.pp("output.dense"))?,
                norm: layer_norm(h, cfg.layer_norm_eps, l.pp("output.LayerNorm"))?,
                approximate_gelu: cfg.hidden_act != "gelu",
            });
        }
        let head = if with_head {
            Some(ClassifierHead { pooler: linear(h, h, root.pp("pooler.dense"))?, classifier: linear(h, labels, vb.pp("classifier"))? })
        } else {
            None
        };
        Ok(Bert { word, position, token_type, embed_norm, layers, head, hidden: h, device: vb.device().clone(), dtype: vb.dtype() })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The final hidden states of every token, packed: `[total_tokens, H]` in the model dtype.
    pub fn forward(&self, batch: &PackedBatch) -> candle_core::Result<Tensor> {
        let t = batch.tokens();
        let dev = &self.device;
        let ids = Tensor::from_slice(&batch.ids, t, dev)?;
        let types = Tensor::from_slice(&batch.type_ids, t, dev)?;
        let pos = Tensor::from_slice(&batch.positions, t, dev)?;
        let x = (self.word.forward(&ids)? + self.position.forward(&pos)?)?;
        let x = (x + self.token_type.forward(&types)?)?;
        let mut x = self.embed_norm.forward(&x)?;
        let attn = AttentionPlan::new(batch, dev, self.dtype)?;
        for layer in &self.layers {
            x = layer.forward(&x, &attn)?;
        }
        Ok(x)
    }

    /// Class logits `[inputs, labels]` (f32) from packed hidden states, via the CLS token.
    pub fn classify(&self, hidden: &Tensor, batch: &PackedBatch) -> candle_core::Result<Option<Tensor>> {
        let Some(head) = &self.head else { return Ok(None) };
        let cls_idx: Vec<u32> = batch.cu_seqlens[..batch.len()].to_vec();
        let cls = hidden.index_select(&Tensor::from_slice(&cls_idx, cls_idx.len(), &self.device)?, 0)?;
        let pooled = head.pooler.forward(&cls)?.tanh()?;
        Ok(Some(head.classifier.forward(&pooled)?.to_dtype(DType::F32)?))
    }
}

/// How attention sees the packed batch: the gather/scatter indices and key mask of the
/// padded path, computed once per batch and shared by every layer.
struct AttentionPlan {
    batch: usize,
    max_len: usize,
    /// For each padded slot `b * L + i`, the packed row (or the zero row `total_tokens`).
    pad_index: Tensor,
    /// For each packed token, its padded slot.
    unpad_index: Tensor,
    /// `[B, 1, 1, L]`: 0 for real keys, a large negative number for padding.
    mask: Tensor,
    #[cfg(feature = "flash-attn")]
    cu_seqlens: Tensor,
}

impl AttentionPlan {
    fn new(batch: &PackedBatch, dev: &Device, dtype: DType) -> candle_core::Result<Self> {
        let (b, l, t) = (batch.len(), batch.max_len, batch.tokens());
        let mut pad = vec![t as u32; b * l];
        let mut unpad = Vec::with_capacity(t);
        let mut mask = vec![0f32; b * l];
        for i in 0..b {
            let (s, e) = (batch.cu_seqlens[i] as usize, batch.cu_seqlens[i + 1] as usize);
            for j in 0..l {
                if s + j < e {
                    pad[i * l + j] = (s + j) as u32;
                    unpad.push((i * l + j) as u32);
                } else {
                    mask[i * l + j] = -1e4;
                }
            }
        }
        Ok(AttentionPlan {
            batch: b,
            max_len: l,
            pad_index: Tensor::from_vec(pad, b * l, dev)?,
            unpad_index: Tensor::from_vec(unpad, t, dev)?,
            mask: Tensor::from_vec(mask, (b, 1, 1, l), dev)?.to_dtype(dtype)?,
            #[cfg(feature = "flash-attn")]
            cu_seqlens: Tensor::from_slice(&batch.cu_seqlens, batch.cu_seqlens.len(), dev)?,
        })
    }
}

impl Attention {
    fn forward(&self, x: &Tensor, plan: &AttentionPlan) -> candle_core::Result<Tensor> {
        let qkv = self.qkv.forward(x)?; // [T, 3H]
        let ctx = self.attend(&qkv, plan)?; // [T, H]
        let out = self.out.forward(&ctx)?;
        self.norm.forward(&(out + x)?)
    }

    #[cfg(feature = "flash-attn")]
    fn attend(&self, qkv: &Tensor, plan: &AttentionPlan) -> candle_core::Result<Tensor> {
        if qkv.device().is_cuda() && matches!(qkv.dtype(), DType::F16 | DType::BF16) {
            let t = qkv.dim(0)?;
            let qkv = qkv.reshape((t, 3, self.heads, self.head_dim))?;
            let q = qkv.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
            let k = qkv.narrow(1, 1, 1)?.squeeze(1)?.contiguous()?;
            let v = qkv.narrow(1, 2, 1)?.squeeze(1)?.contiguous()?;
            let scale = (self.head_dim as f32).powf(-0.5);
            let ctx = candle_flash_attn::flash_attn_varlen(&q, &k, &v, &plan.cu_seqlens, &plan.cu_seqlens, plan.max_len, plan.max_len, scale, false)?;
            return ctx.reshape((t, self.heads * self.head_dim));
        }
        self.attend_padded(qkv, plan)
    }

    #[cfg(not(feature = "flash-attn"))]
    fn attend(&self, qkv: &Tensor, plan: &AttentionPlan) -> candle_core::Result<Tensor> {
        self.attend_padded(qkv, plan)
    }

    /// Scatter to `[B, L, ...]`, one batched attention with a key mask, gather back.
    fn attend_padded(&self, qkv: &Tensor, plan: &AttentionPlan) -> candle_core::Result<Tensor> {
        let (t, w) = qkv.dims2()?;
        let (b, l, nh, hd) = (plan.batch, plan.max_len, self.heads, self.head_dim);
        let with_zero = Tensor::cat(&[qkv, &Tensor::zeros((1, w), qkv.dtype(), qkv.device())?], 0)?;
        let padded = with_zero.index_select(&plan.pad_index, 0)?.reshape((b, l, 3, nh, hd))?;
        let q = padded.narrow(2, 0, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?; // [B, nh, L, hd]
        let k = padded.narrow(2, 1, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?;
        let v = padded.narrow(2, 2, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?;
        let scale = (hd as f64).powf(-0.5);
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&plan.mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b * l, nh * hd))?; // [B*L, H]
        ctx.index_select(&plan.unpad_index, 0)?.reshape((t, nh * hd))
    }
}

impl Layer {
    fn forward(&self, x: &Tensor, plan: &AttentionPlan) -> candle_core::Result<Tensor> {
        let x = self.attention.forward(x, plan)?;
        let h = self.intermediate.forward(&x)?;
        let h = if self.approximate_gelu { h.gelu()? } else { h.gelu_erf()? };
        let out = self.output.forward(&h)?;
        self.norm.forward(&(out + x)?)
    }
}

/// Softmax (or sigmoid for single-logit / multi-label heads) over class logits, row by row.
pub fn class_scores(logits: &[f32], labels: usize, multi_label: bool, raw: bool) -> Vec<Vec<f32>> {
    logits
        .chunks_exact(labels.max(1))
        .map(|row| {
            if raw {
                row.to_vec()
            } else if multi_label || labels == 1 {
                row.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect()
            } else {
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = row.iter().map(|x| (x - m).exp()).collect();
                let s: f32 = e.iter().sum();
                e.into_iter().map(|x| x / s).collect()
            }
        })
        .collect()
}
