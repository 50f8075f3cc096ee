//! Launching our kernels on candle's CUDA stream (built with `--features cuda` only).

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, op::BackpropOp, CudaDevice, CudaStorage, DType, Storage, Tensor};

use super::{arch_for, compile, KERNELS};
use crate::config::Pooling;

/// Pooling mode numbers, as `kernels/pooling.cu` reads them.
fn mode_id(p: Pooling) -> i32 {
    match p {
        Pooling::Cls => 0,
        Pooling::Mean => 1,
        Pooling::LastToken => 2,
    }
}

/// The module name our pooling kernels are cached under in candle's device.
const MODULE: &str = "edgenode_pooling";

static PTX: OnceLock<Result<String, String>> = OnceLock::new();

/// Compiles `kernels/pooling.cu` for this device's architecture (once per process) and
/// loads it into candle's context. Called at warm-up so the first request pays nothing.
pub fn compile_for_device(dev: &CudaDevice) -> candle_core::Result<String> {
    let ptx = PTX
        .get_or_init(|| {
            let (major, minor) = dev.cuda_stream().context().compute_capability().map_err(|e| e.to_string())?;
            compile(&KERNELS[0], arch_for(major, minor)).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(candle_core::Error::Msg)?;
    for entry in KERNELS[0].entries {
        dev.get_or_load_custom_func(entry, MODULE, &ptx)?;
    }
    Ok(ptx)
}

/// Pools packed hidden states `[total_tokens, dim]` (f32 or f16) into `[inputs, dim]` f32,
/// L2-normalized when asked: our fused kernel, one block per input.
pub fn pool_normalize(hidden: &Tensor, cu_seqlens: &[u32], mode: Pooling, normalize: bool) -> candle_core::Result<Tensor> {
    let dev = hidden.device().as_cuda_device()?.clone();
    let hidden = hidden.contiguous()?;
    let (_, dim) = hidden.dims2()?;
    let inputs = cu_seqlens.len().saturating_sub(1);
    let ptx = compile_for_device(&dev)?;
    let entry = match hidden.dtype() {
        DType::F32 => "pool_normalize_f32",
        DType::F16 => "pool_normalize_f16",
        other => bail!("pooling kernel has no {other:?} variant"),
    };
    let func = dev.get_or_load_custom_func(entry, MODULE, &ptx)?;
    let stream = dev.cuda_stream();
    let cu: CudaSlice<u32> = stream.clone_htod(cu_seqlens).w()?;
    // SAFETY: every element of `out` is written by the kernel (each block writes its row).
    let mut out: CudaSlice<f32> = unsafe { stream.alloc::<f32>(inputs * dim) }.w()?;
    {
        let (guard, layout) = hidden.storage_and_layout();
        let Storage::Cuda(storage) = &*guard else { bail!("hidden states are not on the GPU") };
        let cfg = LaunchConfig { grid_dim: (inputs as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (dim_arg, mode_arg, norm_arg) = (dim as i32, mode_id(mode), normalize as i32);
        let Some((start, end)) = layout.contiguous_offsets() else { bail!("hidden states must be contiguous") };
        // candle does not export its function handle type, so the launch is written out per
        // element type instead of in a generic helper.
        macro_rules! launch {
            ($t:ty) => {{
                let slice = storage.as_cuda_slice::<$t>()?;
                let view = slice.slice(start..end);
                let mut b = func.builder();
                b.arg(&view).arg(&cu).arg(&mut out).arg(&dim_arg).arg(&mode_arg).arg(&norm_arg);
                // SAFETY: argument types and order match `pool_normalize_*` in
                // kernels/pooling.cu; the grid has one block per input and `cu` has inputs + 1 entries.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match hidden.dtype() {
            DType::F32 => launch!(f32),
            _ => launch!(half::f16),
        }
    }
    let storage = CudaStorage::wrap_cuda_slice(out, dev);
    Ok(Tensor::from_storage(Storage::Cuda(storage), (inputs, dim), BackpropOp::none(), false))
}
