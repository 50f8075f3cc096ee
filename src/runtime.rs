//! Where model work runs: the device, and how many compute threads it may use.

use candle_core::Device;

use crate::config::Config;

/// Compute threads for model work: `runtime.threads`, or one per available core.
pub fn compute_threads(config: &Config) -> usize {
    match config.runtime.threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    }
}

/// Applies the thread count to the libraries that read it from the environment (candle's
/// gemm via rayon). Must run before any thread pool starts, i.e. first thing in `main`.
pub fn apply_threads(config: &Config) {
    let n = compute_threads(config).to_string();
    // Set before any other thread exists (called from main before the runtime starts).
    std::env::set_var("RAYON_NUM_THREADS", &n);
    crate::cpu::Isa::limit(config.runtime.isa);
}

/// The device models run on, and its name for `/info`.
///
/// `auto` picks the first CUDA GPU when the binary was built with CUDA and one is present,
/// the CPU otherwise. `cuda` or `cuda:N` insists on a GPU and fails without one.
pub fn select_device(spec: &str) -> Result<(Device, String), String> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok((Device::Cpu, "cpu".into())),
        "auto" => {
            if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok((d, "cuda:0".into()));
                }
            }
            Ok((Device::Cpu, "cpu".into()))
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize =
                s.strip_prefix("cuda:").map(str::parse).unwrap_or(Ok(0)).map_err(|_| format!("runtime.device {s:?}: expected cuda or cuda:N"))?;
            if !cfg!(feature = "cuda") {
                return Err(format!("runtime.device is {s:?} but this binary was built without CUDA (cargo feature `cuda`)"));
            }
            Device::new_cuda(ordinal).map(|d| (d, format!("cuda:{ordinal}"))).map_err(|e| format!("runtime.device {s:?}: no usable CUDA device: {e}"))
        }
        other => Err(format!("runtime.device {other:?}: expected auto, cpu, cuda or cuda:N")),
    }
}

/// Calls its function when dropped: when a long-lived thread returns and while it unwinds
/// from a panic. Model threads hold one so their supervisor learns that they ended.
pub struct OnExit<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnExit<F> {
    pub fn new(f: F) -> Self {
        OnExit(Some(f))
    }
}

impl<F: FnOnce()> Drop for OnExit<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}
