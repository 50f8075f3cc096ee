//! Dense layers: `out = x · wᵀ + bias`, with `w` in PyTorch's `Linear` layout (`[out, in]`).
//!
//! The multiply is the `gemm` crate (the one candle uses) with its AVX-512 kernels enabled;
//! what this adds is calling it without tensors: no allocation, the bias written into the
//! output first and accumulated into (one pass, no separate broadcast add), and the weight
//! read in place as the transposed right-hand side (no copy).

use gemm::Parallelism;

/// Below this many multiply-adds a second thread costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// `out[m×n] = x[m×k] · w[n×k]ᵀ + bias[n]`.
#[allow(clippy::too_many_arguments)]
pub fn linear(x: &[f32], w: &[f32], bias: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, threads: usize) {
    assert!(bias.len() == n && out.len() >= m * n, "linear: shape mismatch");
    for row in out[..m * n].chunks_exact_mut(n) {
        row.copy_from_slice(bias);
    }
    multiply(x, w, out, m, k, n, threads, true);
}

/// `out[m×n] = x[m×k] · w[n×k]ᵀ` (the bias is applied by a fused kernel after).
pub fn linear_no_bias(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, threads: usize) {
    multiply(x, w, out, m, k, n, threads, false);
}

#[allow(clippy::too_many_arguments)]
fn multiply(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, threads: usize, accumulate: bool) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n, "linear: shape mismatch");
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if threads > 1 && m * n * k >= PARALLEL_MIN_MACS { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: the asserts above bound every index the strides below can reach:
    // out is m×n row-major, x is m×k row-major, and wᵀ is read as k×n with w row-major n×k.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_naive_product() {
        let (m, k, n) = (13, 70, 33);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 53) % 97) as f32 / 40.0 - 1.2).collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
        for threads in [1, 2] {
            let mut out = vec![f32::NAN; m * n];
            linear(&x, &w, &b, &mut out, m, k, n, threads);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = b[j] as f64 + (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum::<f64>();
                    assert!((out[i * n + j] as f64 - want).abs() < 1e-4, "({i},{j})");
                }
            }
        }
    }
}
