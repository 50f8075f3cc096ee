//! Our CUDA kernels compile (NVRTC runs without a GPU), and, where a GPU is present, agree
//! with their Rust twins.

use edgenode::gpu::{compile, nvrtc_available, KERNELS};

#[test]
fn every_kernel_compiles_to_ptx_with_its_entry_points() {
    assert!(nvrtc_available(), "libnvrtc cannot be loaded: scripts/test.sh installs the nvidia-cuda-nvrtc-cu12 wheel and puts it on LD_LIBRARY_PATH");
    for kernel in KERNELS {
        for arch in ["compute_70", "compute_80", "compute_90"] {
            let ptx = compile(kernel, arch).unwrap_or_else(|e| panic!("{}: {e}", kernel.file));
            for entry in kernel.entries {
                assert!(ptx.contains(&format!(".entry {entry}(")), "{} for {arch}: no {entry}", kernel.file);
            }
        }
    }
}

#[test]
fn the_kernel_folder_is_what_the_binary_compiles() {
    // Every .cu file in kernels/ is compiled into the binary (and so by the test above).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut on_disk: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = KERNELS.iter().map(|k| k.file.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
    for k in KERNELS {
        let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels").join(k.file)).unwrap();
        assert_eq!(text, k.source, "{} changed on disk but the binary embeds an older copy", k.file);
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_kernels_match_their_cpu_twins() {
    eprintln!("\n*** skipped: no CUDA device (this build has no `cuda` feature); scripts/gpu-check.sh runs this on a GPU ***\n");
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_kernels_match_their_cpu_twins() {
    use candle_core::{DType, Device, Tensor};
    use edgenode::config::Pooling;
    use edgenode::encoder::pooling::pool_normalize;
    use rand::{Rng, SeedableRng};

    let device = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("\n*** skipped: no CUDA device ({e}) ***\n");
            return;
        }
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for (lengths, dim) in [(vec![1usize], 384usize), (vec![3, 17, 1, 64], 384), (vec![5; 32], 768), (vec![200, 7], 1024)] {
        let mut cu = vec![0u32];
        for l in &lengths {
            cu.push(cu.last().unwrap() + *l as u32);
        }
        let total = *cu.last().unwrap() as usize;
        let hidden: Vec<f32> = (0..total * dim).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        for mode in [Pooling::Cls, Pooling::Mean, Pooling::LastToken] {
            for normalize in [false, true] {
                let want = pool_normalize(&hidden, &cu, dim, mode, normalize);
                for dtype in [DType::F32, DType::F16] {
                    let t = Tensor::from_slice(&hidden, (total, dim), &device).unwrap().to_dtype(dtype).unwrap();
                    let got = edgenode::gpu::pool_normalize(&t, &cu, mode, normalize).unwrap();
                    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                    // f16 inputs are rounded before pooling: compare with the twin on the same rounding.
                    let reference = if dtype == DType::F16 {
                        let rounded: Vec<f32> = hidden.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect();
                        pool_normalize(&rounded, &cu, dim, mode, normalize)
                    } else {
                        want.clone()
                    };
                    for (i, (g, w)) in got.iter().zip(&reference).enumerate() {
                        let err = (g - w).abs() / w.abs().max(1e-3);
                        assert!(err < 1e-5, "{mode:?} normalize={normalize} {dtype:?} lengths={lengths:?} [{i}]: gpu {g} cpu {w}");
                    }
                }
            }
        }
    }
}
