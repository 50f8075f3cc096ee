//! Loading a Llama-family GGUF file into our weight structures.
//!
//! The header and metadata are read with candle's GGUF reader; tensor bytes are read one
//! tensor at a time. Q4_1, Q8_0, Q4_K, Q5_K and Q6_K blocks are repacked losslessly
//! (interleaved groups, scales apart from quants) for our kernels; any other GGML type (F16,
//! Q4_0, ...) is dequantized by candle and requantized to Q8_0, so every GGUF loads, at 8
//! bits for types we have no kernel for.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;

use super::llama::{Block, Linear, LlamaConfig, LlamaWeights};
use crate::cpu::gemm::PackedLinear;
use crate::cpu::quant::{QMatrix, QK};
use crate::generate::tokenizer::GgufTokenizer;

/// Everything a GGUF file gives the engine.
pub struct GgufModel {
    pub weights: LlamaWeights,
    pub tokenizer: GgufTokenizer,
    pub chat_template: String,
    pub bos_text: String,
    pub eos_text: String,
    /// How many tensors of each GGML type the file holds.
    pub formats: BTreeMap<String, usize>,
}

/// Reads tensors one at a time with positioned reads: the process holds our repacked weights
/// and one tensor's bytes, never the whole file (a memory map touched end to end would stay
/// in the process's resident memory until the load ends, doubling its peak).
struct Reader<'a> {
    content: &'a Content,
    file: File,
}

/// Rows converted through f32 at a time, so converting a 32,000-row output matrix holds
/// megabytes of f32, not the whole matrix.
const CONVERT_ROWS: usize = 512;

impl Reader<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo, String> {
        self.content.tensor_infos.get(name).ok_or_else(|| format!("the GGUF has no tensor {name}"))
    }

    /// The tensor's raw blocks.
    fn bytes(&self, info: &TensorInfo) -> Result<Vec<u8>, String> {
        use std::os::unix::fs::FileExt;
        let elems = info.shape.elem_count();
        let size = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let start = self.content.tensor_data_offset + info.offset;
        let mut buf = vec![0u8; size];
        self.file.read_exact_at(&mut buf, start).map_err(|e| format!("a tensor cannot be read (file truncated?): {e}"))?;
        Ok(buf)
    }

    /// `rows × cols` blocks of `dtype` as f32 values, through candle's dequantization.
    fn dequantize(raw: &[u8], dtype: GgmlDType, rows: usize, cols: usize) -> Result<Vec<f32>, String> {
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(raw), &Device::Cpu, dtype).map_err(|e| e.to_string())?;
        QTensor::new(storage, (rows, cols))
            .and_then(|t| t.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| e.to_string())
    }

    /// A tensor as f32 values, through candle's dequantization.
    fn f32s(&mut self, name: &str) -> Result<Vec<f32>, String> {
        let info = self.info(name)?;
        let raw = self.bytes(info)?;
        let cols = info.shape.dims().last().copied().unwrap_or(1);
        let rows = info.shape.elem_count() / cols.max(1);
        Self::dequantize(&raw, info.ggml_dtype, rows, cols).map_err(|e| format!("{name}: {e}"))
    }

    /// Several 2-D weights of one width stacked row-wise (fused projections), quantized or,
    /// with `exact`, dequantized to f32.
    fn linear(&mut self, names: &[&str], exact: bool) -> Result<Linear, String> {
        if exact {
            let mut values = Vec::new();
            let (mut rows, mut cols) = (0, 0);
            for name in names {
                let dims = self.info(name)?.shape.dims().to_vec();
                let [r, c] = dims[..] else { return Err(format!("{name}: expected 2 dimensions, got {dims:?}")) };
                values.extend(self.f32s(name)?);
                rows += r;
                cols = c;
            }
            return Ok(Linear::Exact(PackedLinear::new(&values, &vec![0.0; rows], rows, cols)));
        }
        // Consecutive parts in one format are fused into one matrix; a change of format
        // (Q4_K_M's Q6_K `v` after Q4_K `q` and `k`) starts another.
        let mut fused: Vec<Vec<QMatrix>> = Vec::new();
        for name in names {
            let m = self.matrix(name)?;
            match fused.last_mut() {
                Some(run) if run[0].packing == m.packing => run.push(m),
                _ => fused.push(vec![m]),
            }
        }
        let parts = fused.into_iter().map(QMatrix::concat).collect::<Result<Vec<_>, _>>()?;
        if parts.windows(2).any(|w| w[0].cols != w[1].cols) {
            return Err(format!("{}: parts of different widths cannot share an input", names.join(", ")));
        }
        Ok(Linear::Quant(parts))
    }

    /// A 2-D weight (`[rows, cols]`, one row per output) in a format our kernels run.
    fn matrix(&mut self, name: &str) -> Result<QMatrix, String> {
        let info = self.info(name)?;
        let dims = info.shape.dims().to_vec();
        let [rows, cols] = dims[..] else { return Err(format!("{name}: expected 2 dimensions, got {dims:?}")) };
        if cols % QK != 0 {
            return Err(format!("{name}: width {cols} is not a multiple of {QK}"));
        }
        let dtype = info.ggml_dtype;
        let raw = self.bytes(info)?;
        match dtype {
            GgmlDType::Q4_1 => Ok(QMatrix::from_q4_1(&raw, rows, cols)),
            GgmlDType::Q8_0 => Ok(QMatrix::from_q8_0(&raw, rows, cols)),
            GgmlDType::Q4K if cols % 256 == 0 => Ok(QMatrix::from_q4_k(&raw, rows, cols)),
            GgmlDType::Q5K if cols % 256 == 0 => Ok(QMatrix::from_q5_k(&raw, rows, cols)),
            GgmlDType::Q6K if cols % 256 == 0 => Ok(QMatrix::from_q6_k(&raw, rows, cols)),
            _ => {
                // No kernel for this type (F16, Q4_0, ...): to Q8_0 through f32, a few
                // hundred rows at a time.
                let row_bytes = raw.len() / rows;
                let mut parts = Vec::new();
                for (i, chunk) in raw.chunks(row_bytes * CONVERT_ROWS).enumerate() {
                    let n = chunk.len() / row_bytes;
                    let values = Self::dequantize(chunk, dtype, n, cols).map_err(|e| format!("{name} rows {}..: {e}", i * CONVERT_ROWS))?;
                    parts.push(QMatrix::q8_0_from_f32(&values, n, cols));
                }
                let mut m = QMatrix::concat(parts)?;
                m.source = "Q8_0 (converted)";
                Ok(m)
            }
        }
    }
}

/// A GGML type as llama.cpp names it (`Q4_K`, `Q6_K`; candle's debug names are `Q4K`).
fn ggml_name(t: GgmlDType) -> String {
    let name = format!("{t:?}");
    match name.strip_suffix('K') {
        Some(stem) if stem.starts_with('Q') => format!("{stem}_K"),
        _ => name,
    }
}

fn u32_key(c: &Content, key: &str) -> Result<usize, String> {
    c.metadata.get(key).ok_or_else(|| format!("the GGUF has no {key}"))?.to_u64().map(|v| v as usize).map_err(|e| format!("{key}: {e}"))
}

fn f32_key(c: &Content, key: &str, default: f32) -> f32 {
    c.metadata.get(key).and_then(|v| v.to_f32().ok()).unwrap_or(default)
}

/// Reads the file: configuration, tokenizer, chat template and every weight. `exact` keeps
/// projections in f32 (dequantized) instead of running them quantized: the reference mode.
pub fn load(path: &Path, exact: bool) -> Result<GgufModel, String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let content = Content::read(&mut file).map_err(|e| format!("{} is not a valid GGUF file: {e}", path.display()))?;
    let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    if arch != "llama" {
        return Err(format!("architecture {arch:?} is not supported by the native engine (llama only)"));
    }
    let hidden = u32_key(&content, "llama.embedding_length")?;
    let heads = u32_key(&content, "llama.attention.head_count")?;
    let kv_heads = u32_key(&content, "llama.attention.head_count_kv")?;
    let layers = u32_key(&content, "llama.block_count")?;
    let context = u32_key(&content, "llama.context_length").unwrap_or(4096);
    let head_dim = u32_key(&content, "llama.attention.key_length").unwrap_or(hidden / heads);
    if heads % kv_heads != 0 || !head_dim.is_multiple_of(2) {
        return Err("unsupported head layout".into());
    }
    let tokenizer = GgufTokenizer::from_gguf(&content)?;
    let tokens = content.metadata.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()).cloned().unwrap_or_default();
    let token_text = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let bos_text = token_text(tokenizer.bos);
    let eos_text = token_text(tokenizer.eos.first().copied());
    let chat_template =
        content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned().ok_or("the GGUF has no tokenizer.chat_template")?;
    let mut formats = BTreeMap::new();
    for info in content.tensor_infos.values() {
        *formats.entry(ggml_name(info.ggml_dtype)).or_insert(0) += 1;
    }

    let mut r = Reader { content: &content, file };
    let embed = r.matrix("token_embd.weight")?;
    let vocab = embed.rows;
    // Without output.weight the output projection is the embedding matrix (tied).
    let output_name = if content.tensor_infos.contains_key("output.weight") { "output.weight" } else { "token_embd.weight" };
    let output = r.linear(&[output_name], exact)?;
    let mut blocks = Vec::with_capacity(layers);
    let mut intermediate = 0;
    for i in 0..layers {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        let gate_up = r.linear(&[&p("ffn_gate"), &p("ffn_up")], exact)?;
        intermediate = gate_up.rows() / 2;
        blocks.push(Block {
            attn_norm: r.f32s(&p("attn_norm"))?,
            qkv: r.linear(&[&p("attn_q"), &p("attn_k"), &p("attn_v")], exact)?,
            attn_out: r.linear(&[&p("attn_output")], exact)?,
            ffn_norm: r.f32s(&p("ffn_norm"))?,
            gate_up,
            down: r.linear(&[&p("ffn_down")], exact)?,
        });
    }
    let norm = r.f32s("output_norm.weight")?;
    let config = LlamaConfig {
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
        head_dim,
        vocab,
        context,
        rope_base: f32_key(&content, "llama.rope.freq_base", 10000.0),
        rms_eps: f32_key(&content, "llama.attention.layer_norm_rms_epsilon", 1e-5),
    };
    Ok(GgufModel { weights: LlamaWeights { config, embed, blocks, norm, output }, tokenizer, chat_template, bos_text, eos_text, formats })
}
