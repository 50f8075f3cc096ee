//! Pooling token states into one vector per input, and L2 normalization.
//!
//! This is the specification: the CUDA kernels in `kernels/pooling.cu` compute exactly
//! this (the GPU tests compare them on random inputs), and it is what runs on a machine
//! without a GPU. Inputs are padding-free: `hidden` holds every input's tokens back to
//! back (`[total_tokens, dim]`), and `cu_seqlens[i]..cu_seqlens[i + 1]` are input i's rows.

use crate::config::Pooling;

/// Pools each input's rows of `hidden` into one `dim`-vector, optionally L2-normalized.
/// Returns `[inputs, dim]` row-major.
pub fn pool_normalize(hidden: &[f32], cu_seqlens: &[u32], dim: usize, mode: Pooling, normalize: bool) -> Vec<f32> {
    let n = cu_seqlens.len().saturating_sub(1);
    let mut out = vec![0f32; n * dim];
    for (i, row) in out.chunks_exact_mut(dim).enumerate() {
        let (start, end) = (cu_seqlens[i] as usize, cu_seqlens[i + 1] as usize);
        if end <= start {
            continue;
        }
        match mode {
            Pooling::Cls => row.copy_from_slice(&hidden[start * dim..(start + 1) * dim]),
            Pooling::LastToken => row.copy_from_slice(&hidden[(end - 1) * dim..end * dim]),
            Pooling::Mean => {
                for t in start..end {
                    for (acc, x) in row.iter_mut().zip(&hidden[t * dim..(t + 1) * dim]) {
                        *acc += *x;
                    }
                }
                let inv = 1.0 / (end - start) as f32;
                row.iter_mut().for_each(|x| *x *= inv);
            }
        }
        if normalize {
            l2_normalize(row);
        }
    }
    out
}

/// Scales `v` to unit L2 norm (a zero vector stays zero, as in PyTorch's `normalize` with eps).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    let inv = 1.0 / norm;
    v.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_variable_length_inputs() {
        // Two inputs: 2 tokens and 1 token, dim 2.
        let hidden = [1.0, 2.0, 3.0, 4.0, 10.0, 0.0];
        let cu = [0, 2, 3];
        assert_eq!(pool_normalize(&hidden, &cu, 2, Pooling::Mean, false), vec![2.0, 3.0, 10.0, 0.0]);
        assert_eq!(pool_normalize(&hidden, &cu, 2, Pooling::Cls, false), vec![1.0, 2.0, 10.0, 0.0]);
        assert_eq!(pool_normalize(&hidden, &cu, 2, Pooling::LastToken, false), vec![3.0, 4.0, 10.0, 0.0]);
        let n = pool_normalize(&hidden, &cu, 2, Pooling::LastToken, true);
        assert!((n[0] - 0.6).abs() < 1e-6 && (n[1] - 0.8).abs() < 1e-6 && n[2] == 1.0);
    }
}
