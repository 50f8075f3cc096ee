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
