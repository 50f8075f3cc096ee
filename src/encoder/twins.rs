//! Our CUDA kernels (`gpu`) against their Rust twins (`encoder::pooling`), on this machine's
//! GPU. It lives in the encoder, above both, so the kernel layer never imports the encoder.
//!
//! The comparison lives in the binary, not only in a test, because the machine that has a
//! GPU may have no Rust toolchain: `edgenode kernels verify` runs it there (scripts/gpu-check.sh),
//! and tests/kernels.rs runs the same function under `cargo test --features cuda`.

use std::fmt;

/// Largest relative error (|gpu − cpu| / max(|cpu|, 1e-3)) a kernel may show against its twin.
pub const TOLERANCE: f32 = 1e-5;

/// One compared configuration: which kernel path, on what shape, and how far it was off.
#[derive(Debug, Clone)]
pub struct TwinCase {
    pub name: String,
    pub max_rel_err: f32,
}

impl TwinCase {
    pub fn passed(&self) -> bool {
        self.max_rel_err < TOLERANCE
    }
}

/// Why the comparison did not run (as opposed to running and finding a disagreement).
#[derive(Debug)]
pub enum TwinError {
    /// No CUDA in this build, or no usable device: nothing was compared.
    Unavailable(String),
    /// A kernel failed to compile, load or launch.
    Failed(String),
}

impl fmt::Display for TwinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TwinError::Unavailable(m) => write!(f, "no CUDA device to compare on: {m}"),
            TwinError::Failed(m) => write!(f, "kernel failed: {m}"),
        }
    }
}

/// Runs every kernel on `cuda:{ordinal}` over seeded random inputs (single and mixed-length
/// batches; CLS, mean and last-token pooling; with and without normalization; f32 and f16
/// inputs) and returns how far each configuration was from the Rust twin in
/// `encoder::pooling`. f16 inputs are compared with the twin on the same f16-rounded values.
#[cfg(feature = "cuda")]
pub fn verify(ordinal: usize) -> Result<Vec<TwinCase>, TwinError> {
    use candle_core::{DType, Device, Tensor};
    use rand::{Rng, SeedableRng};

    use super::pooling::pool_normalize;
    use crate::config::Pooling;

    // candle's errors may carry a backtrace after the first line; the message is the first line.
    let first_line = |e: candle_core::Error| e.to_string().lines().next().unwrap_or_default().to_string();
    let device = Device::new_cuda(ordinal).map_err(|e| TwinError::Unavailable(first_line(e)))?;
    let failed = |e: candle_core::Error| TwinError::Failed(first_line(e));
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut cases = Vec::new();
    for (lengths, dim) in [(vec![1usize], 384usize), (vec![3, 17, 1, 64], 384), (vec![5; 32], 768), (vec![200, 7], 1024)] {
        let mut cu = vec![0u32];
        for l in &lengths {
            cu.push(cu[cu.len() - 1] + *l as u32);
        }
        let total = cu[cu.len() - 1] as usize;
        let hidden: Vec<f32> = (0..total * dim).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let rounded: Vec<f32> = hidden.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect();
        for mode in [Pooling::Cls, Pooling::Mean, Pooling::LastToken] {
            for normalize in [false, true] {
                for dtype in [DType::F32, DType::F16] {
                    let source = if dtype == DType::F16 { &rounded } else { &hidden };
                    let want = pool_normalize(source, &cu, dim, mode, normalize);
                    let t = Tensor::from_slice(&hidden, (total, dim), &device).and_then(|t| t.to_dtype(dtype)).map_err(failed)?;
                    let got: Vec<f32> = crate::gpu::pool_normalize(&t, &cu, mode, normalize)
                        .and_then(|g| g.flatten_all())
                        .and_then(|g| g.to_vec1())
                        .map_err(failed)?;
                    if got.len() != want.len() {
                        return Err(TwinError::Failed(format!("pooling returned {} values, the twin {}", got.len(), want.len())));
                    }
                    let max_rel_err = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / w.abs().max(1e-3)).fold(0.0f32, f32::max);
                    let norm = if normalize { "+normalize" } else { "" };
                    cases.push(TwinCase {
                        name: format!("pool {mode:?}{norm} {dtype:?}, {} inputs of {total} tokens, dim {dim}", lengths.len()),
                        max_rel_err,
                    });
                }
            }
        }
    }
    Ok(cases)
}

/// Without the `cuda` feature there is nothing to compare.
#[cfg(not(feature = "cuda"))]
pub fn verify(_ordinal: usize) -> Result<Vec<TwinCase>, TwinError> {
    Err(TwinError::Unavailable("this binary was built without CUDA (cargo feature `cuda`)".into()))
}
