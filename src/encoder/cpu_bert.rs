//! The BERT forward pass on the CPU with our own kernels: what runs on a machine without a GPU.
//!
//! Same math as `bert.rs` (candle, any device), shaped for a CPU: activations live in
//! buffers owned by the model and reused across batches (no allocation per op), the dense
//! layers run on weights packed once at load with the bias and GELU fused into the multiply
//! (`cpu::gemm`), residual+LayerNorm is one pass, and attention runs per input on its own
//! tokens (no padding at all). With `precision = "int8"` the dense layers of the encoder
//! blocks run on 8-bit weights and activations (`cpu::qlinear`); the embeddings, layer norms,
//! attention and the classifier head stay f32. With `precision = "bf16"` they run on bf16
//! weights and activations with f32 accumulation (`cpu::bf16`: AVX-512 BF16).

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::files::BertConfig;
use crate::batching::packed::PackedBatch;
use crate::config::Precision;
use crate::cpu::attention::attention;
use crate::cpu::bf16::Bf16Linear;
use crate::cpu::gemm::{Epilogue, PackedLinear};
use crate::cpu::norm::{add_layer_norm, layer_norm};
use crate::cpu::qlinear::QuantLinear;
use crate::cpu::quant::QActs;
use crate::cpu::team::Team;
use crate::cpu::{Parallel, Rayon};

/// A dense layer's weights, packed for the arithmetic it runs in.
enum Weights {
    F32(PackedLinear),
    Int8(QuantLinear),
    Bf16(Bf16Linear),
}

struct Dense {
    weights: Weights,
    output: usize,
}

impl Dense {
    fn new(w: &[f32], b: &[f32], input: usize, output: usize, precision: Precision) -> candle_core::Result<Dense> {
        let weights = match precision {
            Precision::Fp32 => Weights::F32(PackedLinear::new(w, b, output, input)),
            Precision::Int8 => Weights::Int8(QuantLinear::new(w, b, output, input).map_err(candle_core::Error::Msg)?),
            Precision::Bf16 => Weights::Bf16(Bf16Linear::new(w, b, output, input).map_err(candle_core::Error::Msg)?),
        };
        Ok(Dense { weights, output })
    }

    /// `out = epilogue(x · wᵀ + b)` for `rows` rows; `acts` holds the int8 and bf16 paths'
    /// converted activations between calls.
    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32], epilogue: Epilogue, par: &dyn Parallel, acts: &mut Acts) {
        match &self.weights {
            Weights::F32(packed) => packed.forward(x, rows, out, epilogue, par),
            Weights::Int8(q) => q.forward(x, rows, out, epilogue, &mut acts.int8, par),
            Weights::Bf16(l) => l.forward(x, rows, out, epilogue, &mut acts.bf16, par),
        }
    }
}

/// A layer's input converted for the int8 or bf16 kernel, reused across layers and batches.
#[derive(Default)]
struct Acts {
    int8: QActs,
    bf16: Vec<u16>,
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
    /// The int8 and bf16 paths' converted activations.
    acts: Acts,
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
    /// The threads of every parallel step of a forward pass. Its helpers spin briefly between
    /// steps instead of sleeping: a forward pass is dozens of short steps, and waking a
    /// sleeping thread for each cost a fifth of a single sentence's time (docs/performance.md).
    team: Team,
    scratch: Scratch,
}

fn read(vb: &VarBuilder, shape: &[usize], name: &str) -> candle_core::Result<Vec<f32>> {
    vb.get(shape, name)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

fn dense(vb: &VarBuilder, input: usize, output: usize, precision: Precision) -> candle_core::Result<Dense> {
    Dense::new(&read(vb, &[output, input], "weight")?, &read(vb, &[output], "bias")?, input, output, precision)
}

fn norm(vb: &VarBuilder, width: usize) -> candle_core::Result<Norm> {
    Ok(Norm { gamma: read(vb, &[width], "weight")?, beta: read(vb, &[width], "bias")? })
}

impl CpuBert {
    /// Loads the weights of `dir/model.safetensors` into our own buffers, the encoder
    /// blocks' dense layers in `precision`.
    pub fn load(dir: &Path, cfg: &BertConfig, head_labels: Option<usize>, threads: usize, precision: Precision) -> Result<Self, String> {
        let weights = dir.join("model.safetensors");
        // SAFETY: the file was verified against its digest just before and is not modified
        // while mapped; every tensor is copied out before the map is dropped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &Device::Cpu) }
            .map_err(|e| format!("cannot read {}: {e}", weights.display()))?;
        Self::from_vb(&vb, cfg, head_labels, threads, precision).map_err(|e| format!("cannot build the model: {e}"))
    }

    fn from_vb(vb: &VarBuilder, cfg: &BertConfig, head_labels: Option<usize>, threads: usize, precision: Precision) -> candle_core::Result<Self> {
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
                qkv: Dense::new(&w, &b, h, 3 * h, precision)?,
                attn_out: dense(&a.pp("output.dense"), h, h, precision)?,
                attn_norm: norm(&a.pp("output.LayerNorm"), h)?,
                up: dense(&l.pp("intermediate.dense"), h, cfg.intermediate_size, precision)?,
                down: dense(&l.pp("output.dense"), cfg.intermediate_size, h, precision)?,
                out_norm: norm(&l.pp("output.LayerNorm"), h)?,
            });
        }
        let head = match head_labels {
            // The head is one row per input: f32 costs nothing there.
            Some(labels) => Some(Head {
                pooler: dense(&root.pp("pooler.dense"), h, h, Precision::Fp32)?,
                classifier: dense(&vb.pp("classifier"), h, labels, Precision::Fp32)?,
            }),
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
            team: Team::new(threads.max(1), "encoder").map_err(|e| candle_core::Error::Msg(format!("cannot start the encoder's threads: {e}")))?,
            scratch: Scratch::default(),
        })
    }

    /// Hidden width.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// The arithmetic of the dense layers.
    pub fn precision(&self) -> Precision {
        match self.layers.first().map(|l| &l.qkv.weights) {
            Some(Weights::Int8(_)) => Precision::Int8,
            Some(Weights::Bf16(_)) => Precision::Bf16,
            _ => Precision::Fp32,
        }
    }

    /// The kernel the dense layers run on, for `/info` and the startup log: `avx512_bf16`,
    /// `avx512_vnni` (int8), `avx512`, `avx2` or `portable`, and what a fallback gave up.
    pub fn cpu_path(&self) -> String {
        #[cfg(target_arch = "x86_64")]
        use crate::cpu::quant::Kernel;
        let isa = crate::cpu::Isa::detect().name();
        match self.layers.first().map(|l| &l.qkv.weights) {
            Some(Weights::Bf16(l)) if l.native() => "avx512_bf16".to_string(),
            Some(Weights::Bf16(_)) => format!("{isa} (bf16 weights on the f32 kernel: no AVX-512 BF16 within runtime.isa)"),
            #[cfg(target_arch = "x86_64")]
            Some(Weights::Int8(_)) if Kernel::detect() == Kernel::Avx512Vnni => "avx512_vnni".to_string(),
            _ => isa.to_string(),
        }
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
            layer.qkv.forward(&s.x, t, &mut s.qkv, Epilogue::None, &self.team, &mut s.acts);
            attention(&s.qkv[..3 * t * h], &mut s.ctx[..t * h], &batch.cu_seqlens, self.heads, d, &self.team);
            layer.attn_out.forward(&s.ctx, t, &mut s.tmp, Epilogue::None, &self.team, &mut s.acts);
            add_layer_norm(&mut s.tmp[..t * h], &s.x[..t * h], &layer.attn_norm.gamma, &layer.attn_norm.beta, self.eps);
            std::mem::swap(&mut s.x, &mut s.tmp);
            // GELU is applied as the up-projection's outputs are stored (fused epilogue).
            layer.up.forward(&s.x, t, &mut s.inter, self.gelu, &self.team, &mut s.acts);
            layer.down.forward(&s.inter[..t * i], t, &mut s.tmp, Epilogue::None, &self.team, &mut s.acts);
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
        let mut acts = Acts::default(); // unused: the head is f32
        head.pooler.forward(&cls, n, &mut pooled, Epilogue::None, &Rayon(1), &mut acts);
        pooled.iter_mut().for_each(|v| *v = v.tanh());
        let labels = head.classifier.output;
        let mut logits = vec![0f32; n * labels];
        head.classifier.forward(&pooled, n, &mut logits, Epilogue::None, &Rayon(1), &mut acts);
        Some(logits.chunks_exact(labels).map(<[f32]>::to_vec).collect())
    }
}
