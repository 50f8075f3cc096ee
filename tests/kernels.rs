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

#[test]
fn gpu_kernels_match_their_cpu_twins() {
    // The same comparison `edgenode kernels verify` runs on a GPU machine without cargo.
    use edgenode::encoder::twins::{verify, TwinError};
    match verify(0) {
        Ok(cases) => {
            assert!(!cases.is_empty());
            for case in cases {
                assert!(case.passed(), "{}: relative error {:.2e}", case.name, case.max_rel_err);
            }
        }
        Err(TwinError::Unavailable(why)) => eprintln!("\n*** skipped: {why}; scripts/gpu-check.sh runs this on a GPU ***\n"),
        Err(e) => panic!("{e}"),
    }
}
