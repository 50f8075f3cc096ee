//! Our CUDA kernels (`kernels/*.cu`): compiled with NVRTC at warm-up, launched on candle's
//! CUDA stream so they are ordered with candle's own work and FlashAttention's.
//!
//! The sources are compiled into the binary, so a deployed node needs no kernel files and
//! no nvcc. Compilation needs only `libnvrtc`, which runs without a GPU: CI compiles every
//! kernel and checks its entry points on a machine that has none.

use std::fmt;

/// One kernel source file and the entry points it must export.
pub struct KernelSource {
    pub file: &'static str,
    pub source: &'static str,
    pub entries: &'static [&'static str],
}

/// Every kernel this binary launches.
pub const KERNELS: &[KernelSource] = &[KernelSource {
    file: "pooling.cu",
    source: include_str!("../../kernels/pooling.cu"),
    entries: &["pool_normalize_f32", "pool_normalize_f16", "l2_normalize_f32"],
}];

/// A kernel that failed to compile or lacks an entry point.
#[derive(Debug)]
pub struct KernelError(pub String);

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// True when `libnvrtc` can be loaded (always, in a CUDA build, which links it).
pub fn nvrtc_available() -> bool {
    #[cfg(not(feature = "cuda"))]
    {
        // SAFETY: only tries dlopen on the library's candidate names.
        unsafe { cudarc::nvrtc::sys::is_culib_present() }
    }
    #[cfg(feature = "cuda")]
    {
        true
    }
}

/// Compiles one kernel source to PTX for a virtual architecture (`compute_90`) and checks
/// that every expected entry point is in it. Returns the PTX text.
pub fn compile(kernel: &KernelSource, arch: &'static str) -> Result<String, KernelError> {
    use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
    let opts = CompileOptions { arch: Some(arch), name: Some(kernel.file.to_string()), ..Default::default() };
    let ptx = compile_ptx_with_opts(kernel.source, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => KernelError(format!("{}: {}", kernel.file, log.to_string_lossy())),
        other => KernelError(format!("{}: {other:?}", kernel.file)),
    })?;
    let text = ptx.to_src();
    for entry in kernel.entries {
        let declared = text.lines().any(|l| l.contains(".entry") && l.contains(&format!(" {entry}(")));
        if !declared {
            return Err(KernelError(format!("{}: the PTX has no entry point {entry}", kernel.file)));
        }
    }
    Ok(text)
}

/// The virtual architecture for a compute capability; PTX is JIT-compiled forward, so an
/// unknown newer card gets the newest we name.
pub fn arch_for(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (10.., _) => "compute_90",
        (9, _) => "compute_90",
        (8, 9) => "compute_89",
        (8, 6..) => "compute_86",
        (8, _) => "compute_80",
        (7, 5..) => "compute_75",
        _ => "compute_70",
    }
}

#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
pub use launch::{compile_for_device, pool_normalize};
