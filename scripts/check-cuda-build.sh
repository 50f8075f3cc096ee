#!/usr/bin/env bash
# Checks that edgenode's CUDA build compiles, on a machine without a GPU and without NVIDIA's
# installer: `cargo build --release --features cuda` against a CUDA 13.0 toolkit made of pip
# wheels (scripts/cuda-wheels.sh says which and why).
#
#   scripts/check-cuda-build.sh               # build; prints the elapsed time at the end
#   scripts/check-cuda-build.sh --env-only    # only install the toolkit and show nvcc --version
#   scripts/check-cuda-build.sh --features flash-attn   # extra arguments go to cargo build
#
# It builds in a target folder of its own, EDGENODE_CUDA_TARGET_DIR (default
# ~/.cache/edgenode-target-cuda); CARGO_TARGET_DIR is ignored on purpose so this never takes
# the lock on (or invalidates) the CPU build's target folder. The first run compiles candle's
# and mistral.rs's CUDA kernels with nvcc for CUDA_COMPUTE_CAP (default 90: H100/H200) and
# takes hours on two cores; later runs are incremental. The binary it links cannot start a
# GPU here (there is no driver), which is not what this checks.
#
# Other knobs: EDGENODE_CUDA_VENV (the wheels' venv, default ~/.cache/edgenode/cuda-venv),
# CARGO_BUILD_JOBS, CUDAFORGE_THREADS (parallel nvcc jobs per crate; default 1 to bound memory).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/cuda-wheels.sh
source scripts/cuda-wheels.sh
cuda_wheels_timed check-cuda-build
cuda_wheels_env
nvcc --version
echo "CUDA_ROOT=$CUDA_ROOT CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
if [ "${1:-}" = "--env-only" ]; then
    exit 0
fi

cuda_wheels_build "$@"

bin="$CARGO_TARGET_DIR/release/edgenode"
ls -l "$bin"
# What the binary will load on a GPU machine (libcuda.so.1 comes from the NVIDIA driver
# there; "not found" for it is expected here).
ldd "$bin" | grep -E 'cuda|cublas|curand|nvrtc' || true
