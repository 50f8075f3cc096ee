//! Dense layers in 8-bit integers: `out = epilogue(x · wᵀ + bias)` with 8-bit weights and
//! activations, multiplied by the generation engine's integer kernel (`quant::qmatmul`:
//! `vpdpbusd` on AVX-512 VNNI, 64 multiply-adds an instruction where f32 gets 16).
//!
//! This is the encoder's `precision = "int8"`. Weights are quantized once at load and
//! activations as each layer runs, both with one scale per 128 values of a row (four blocks
//! of 32: `SPAN_BLOCKS`). Spans that small keep BERT's outlier dimensions from crushing
//! their neighbours, which is why the vectors stay within cosine 0.995 of fp32 where ONNX
//! Runtime's dynamic quantization (per-channel weights, one scale per activation tensor)
//! reaches 0.968 on MiniLM; spans of 128 rather than Q8_0's 32 let the kernel sum four
//! blocks in integers before converting (measured: 1.56× our fp32 at spans of 128, 1.43× at
//! 32; docs/performance.md). The bias and GELU, which the f32 kernel fuses into its stores,
//! follow inside each of the kernel's tasks, on the outputs it has just written.

use super::gemm::Epilogue;
use super::math::{add_bias, bias_gelu};
use super::quant::{qmatmul_finish, QActs, QMatrix};
use super::Parallel;

/// A weight matrix `[n × k]` (PyTorch `Linear` layout) in Q8_0, and its bias.
pub struct QuantLinear {
    pub k: usize,
    pub n: usize,
    weights: QMatrix,
    bias: Vec<f32>,
    /// Blocks of 32 that share one scale, in the weights and in the activations.
    span: usize,
}

/// Values that share one scale: 128 where the width allows (`SPAN_BLOCKS` blocks of 32).
/// One scale per 32 costs the AVX-512 kernel as many float instructions as integer ones;
/// per 128 the integer dots of four blocks add up before one conversion.
pub const SPAN_BLOCKS: usize = 4;

/// The span for an input width: `SPAN_BLOCKS` blocks, or fewer where they do not divide it.
fn span_for(k: usize) -> usize {
    (1..=SPAN_BLOCKS).rev().find(|s| (k / super::quant::QK).is_multiple_of(*s)).unwrap_or(1)
}

/// Multiply-adds below which a layer runs on the calling thread. Waking the second thread
/// and waiting for it costs tens of microseconds, which the integer kernel spends on several
/// million multiply-adds: a single sentence's layers stay on one thread, a batch's go
/// parallel. Measured with rayon's pool, before the encoder had a spinning team of its own
/// (docs/performance.md): int8 single-sentence p50 3.4–3.7 ms → 2.4–3.0 ms, batch throughput
/// unchanged. The f32 kernel, four times slower per multiply-add, keeps
/// its lower threshold: the same change made its single sentence 50% slower.
pub const MIN_PARALLEL_MACS: usize = 1 << 23;

impl QuantLinear {
    /// Quantizes `w` (`n × k`, row-major; `k` a multiple of 32) and keeps `bias` (`n`).
    pub fn new(w: &[f32], bias: &[f32], n: usize, k: usize) -> Result<QuantLinear, String> {
        if !k.is_multiple_of(super::quant::QK) || w.len() < n * k || bias.len() != n {
            return Err(format!("an int8 layer needs an input width that is a multiple of 32 (this one is {k} → {n})"));
        }
        let span = span_for(k);
        Ok(QuantLinear { k, n, weights: QMatrix::q8_from_f32_spans(w, n, k, span), bias: bias.to_vec(), span })
    }

    /// `out[m × n] = epilogue(x[m × k] · wᵀ + bias)`. `acts` is the caller's buffer for the
    /// quantized activations, reused across calls.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32], epilogue: Epilogue, acts: &mut QActs, par: &dyn Parallel) {
        assert!(x.len() >= m * self.k && out.len() >= m * self.n, "int8 linear: shape mismatch");
        if m == 0 {
            return;
        }
        let one = super::Rayon(1);
        let par = if m * self.n * self.k >= MIN_PARALLEL_MACS { par } else { &one };
        acts.quantize_spans(&x[..m * self.k], m, self.k, self.span, par);
        let bias = &self.bias[..];
        // Bias and GELU inside the kernel's tasks, on outputs still in cache.
        let finish = |outputs: &mut [f32], n0: usize| {
            let bias = &bias[n0..n0 + outputs.len()];
            match epilogue {
                Epilogue::None => add_bias(outputs, bias),
                Epilogue::Gelu => bias_gelu(outputs, bias, false),
                Epilogue::GeluTanh => bias_gelu(outputs, bias, true),
            }
        };
        qmatmul_finish(&self.weights, acts, &mut out[..m * self.n], par, &finish);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gemm::PackedLinear;
    use crate::cpu::{random_f32, Rayon};

    /// The int8 layer agrees with the f32 one to within what 8-bit blocks of 32 lose. On
    /// uniform random data each product's rounding error is about 0.3% of its size, so over
    /// `k` terms the outputs' RMS error is about 0.6% of their RMS, and the worst of some
    /// 50,000 outputs (4–5 standard deviations) about 3%.
    #[test]
    fn matches_the_f32_layer_to_int8_accuracy() {
        for (m, k, n, e, threads) in [
            (1, 384, 1152, Epilogue::None, 1),
            (37, 384, 1536, Epilogue::Gelu, 2),
            (300, 1536, 384, Epilogue::None, 2),
            (5, 64, 20, Epilogue::GeluTanh, 1),
        ] {
            let w = random_f32(n * k, 1 + k as u64);
            let bias = random_f32(n, 2);
            let x = random_f32(m * k, 3 + m as u64);
            let mut want = vec![0f32; m * n];
            PackedLinear::new(&w, &bias, n, k).forward(&x, m, &mut want, e, &Rayon(1));
            let mut got = vec![f32::NAN; m * n];
            QuantLinear::new(&w, &bias, n, k).unwrap().forward(&x, m, &mut got, e, &mut QActs::default(), &Rayon(threads));
            let rms = |v: &mut dyn Iterator<Item = f32>| {
                let (sum, count) = v.fold((0f64, 0usize), |(s, c), x| (s + (x as f64).powi(2), c + 1));
                (sum / count as f64).sqrt()
            };
            let scale = rms(&mut want.iter().copied());
            let error = rms(&mut got.iter().zip(&want).map(|(g, w)| g - w));
            let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max) as f64;
            let at = format!("{m}×{k}→{n} {e:?}: outputs of RMS {scale:.3}");
            assert!(error < 0.01 * scale, "{at}: RMS error {error:.4}");
            assert!(worst < 0.05 * scale, "{at}: worst error {worst:.4}");
        }
    }

    #[test]
    fn refuses_a_width_the_blocks_do_not_divide() {
        assert!(QuantLinear::new(&[0.0; 40 * 2], &[0.0; 2], 2, 40).is_err());
    }
}
