//! Layer normalization, fused with the residual add that precedes it in every BERT block.

use crate::multiversion;

#[inline(always)]
fn normalize_row(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
        *v = ((*v - mean) * inv).mul_add(*g, *b);
    }
}

multiversion! {
    /// `x[r] = LayerNorm(x[r] + residual[r]) · gamma + beta` for every row `r`.
    pub fn add_layer_norm(x: &mut [f32], residual: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let width = gamma.len();
        for (row, res) in x.chunks_exact_mut(width).zip(residual.chunks_exact(width)) {
            for (v, r) in row.iter_mut().zip(res) {
                *v += *r;
            }
            normalize_row(row, gamma, beta, eps);
        }
    }
}

multiversion! {
    /// `x[r] = LayerNorm(x[r]) · gamma + beta` for every row `r`.
    pub fn layer_norm(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        for row in x.chunks_exact_mut(gamma.len()) {
            normalize_row(row, gamma, beta, eps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition_in_f64() {
        let w = 384;
        let x: Vec<f32> = (0..w * 3).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0).collect();
        let res: Vec<f32> = (0..w * 3).map(|i| ((i * 104729) % 997) as f32 / 300.0).collect();
        let gamma: Vec<f32> = (0..w).map(|i| 1.0 + (i as f32 * 0.01).sin()).collect();
        let beta: Vec<f32> = (0..w).map(|i| (i as f32 * 0.02).cos()).collect();
        let mut got = x.clone();
        add_layer_norm(&mut got, &res, &gamma, &beta, 1e-12);
        for r in 0..3 {
            let row: Vec<f64> = (0..w).map(|j| x[r * w + j] as f64 + res[r * w + j] as f64).collect();
            let mean = row.iter().sum::<f64>() / w as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / w as f64;
            for j in 0..w {
                let want = (row[j] - mean) / (var + 1e-12).sqrt() * gamma[j] as f64 + beta[j] as f64;
                assert!((got[r * w + j] as f64 - want).abs() < 1e-5, "row {r} col {j}");
            }
        }
    }
}

multiversion! {
    /// `x[r] = x[r] / rms(x[r]) · weight` for every row (RMSNorm, as Llama uses).
    pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
        for row in x.chunks_exact_mut(weight.len()) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for (v, w) in row.iter_mut().zip(weight) {
                *v = *v * inv * *w;
            }
        }
    }
}

multiversion! {
    /// `out[r] = rms_norm(x[r]) · weight` into a separate buffer (the residual stays intact).
    pub fn rms_norm_into(x: &[f32], out: &mut [f32], weight: &[f32], eps: f32) {
        let w = weight.len();
        for (row, o) in x.chunks_exact(w).zip(out.chunks_exact_mut(w)) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / w as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for ((o, v), g) in o.iter_mut().zip(row).zip(weight) {
                *o = *v * inv * *g;
            }
        }
    }
}

#[cfg(test)]
mod rms_tests {
    use super::*;

    #[test]
    fn rms_norm_matches_the_definition() {
        let w: Vec<f32> = (0..64).map(|i| 0.5 + i as f32 / 64.0).collect();
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let mut a = x.clone();
        rms_norm(&mut a, &w, 1e-5);
        let mut b = vec![0f32; 128];
        rms_norm_into(&x, &mut b, &w, 1e-5);
        for r in 0..2 {
            let row = &x[r * 64..(r + 1) * 64];
            let rms = (row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 64.0 + 1e-5).sqrt();
            for j in 0..64 {
                let want = row[j] as f64 / rms * w[j] as f64;
                assert!((a[r * 64 + j] as f64 - want).abs() < 1e-5);
                assert!((b[r * 64 + j] as f64 - want).abs() < 1e-5);
            }
        }
    }
}
