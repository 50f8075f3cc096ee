//! The GPU check's dry run: `DRY_RUN=1 scripts/gpu-check.sh OUT_DIR`, as the README says,
//! on this machine's CPU. It packs the CPU binary into a bundle the way
//! `scripts/gpu-bundle.sh` packs the CUDA one, unpacks it, makes two-layer stand-ins, computes
//! sentence-transformers' vectors and PyTorch/transformers' decode baseline with the test
//! environment's CPU PyTorch, starts the unpacked daemon and runs every step the GPU run
//! runs, so that only the CUDA parts are new when a GPU machine is reached.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn the_gpu_check_runs_end_to_end_on_the_cpu() {
    ensure_models();
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("scripts/gpu-check.sh")
        .arg(out.path())
        .current_dir(root())
        .env("DRY_RUN", "1")
        .env("EDGENODE_BIN", binary())
        .env("EDGENODE_GPU_CHECK_PYTHON", test_python())
        .env_remove("EDGENODE_CONFIG")
        .status()
        .expect("run scripts/gpu-check.sh");
    let table = std::fs::read_to_string(out.path().join("check.md")).unwrap_or_default();
    assert!(status.success(), "the dry run failed:\n{table}");

    let check: Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("check.json")).unwrap()).unwrap();
    assert_eq!(check["dry_run"], true);
    let steps: Vec<(&str, &str)> =
        check["steps"].as_array().unwrap().iter().map(|s| (s["step"].as_str().unwrap(), s["result"].as_str().unwrap())).collect();
    let want = [
        ("kernels", "SKIPPED"),
        ("standins-bge", "PASS"),
        ("golden", "PASS"),
        ("baseline-embed", "PASS"),
        ("baseline-decode", "PASS"),
        ("standins-tinyllama", "PASS"),
        ("daemon", "PASS"),
        ("device", "PASS"),
        ("embed", "PASS"),
        ("decode", "PASS"),
        ("throughput", "PASS"),
    ];
    assert_eq!(steps, want, "\n{table}");
    // The kernels step was skipped because a CPU build refuses cleanly, not for lack of time.
    assert!(check["steps"][0]["detail"].as_str().unwrap().contains("without CUDA"), "{table}");
    // Every benchmark row has both sides and a ratio.
    let bench = check["benchmarks"].as_array().unwrap();
    assert_eq!(bench.len(), 3 * 3 + 2, "{table}"); // 3 TinyLlama files × (ttft, 1 stream, 8 streams) + 2 batch sizes
    for row in bench {
        assert!(row["edgenode"].as_f64().unwrap() > 0.0 && row["baseline_value"].as_f64().unwrap() > 0.0, "{row}\n{table}");
        assert!(row["ratio"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert!(table.contains("| workload | edgenode | baseline | ratio |"), "{table}");
}
