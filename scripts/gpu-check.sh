#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, no network and no Rust toolchain: what it
# needs travels as the bundle scripts/gpu-bundle.sh makes (.gpu-bundle/, ≤ 60 MiB) plus this
# checkout. One command, inside ten minutes:
#
#   scripts/gpu-check.sh OUT_DIR              # on the GPU machine, after scripts/gpu-bundle.sh here
#   DRY_RUN=1 scripts/gpu-check.sh OUT_DIR    # here, without a GPU (tests/gpu_check.rs runs this)
#
# It unpacks the bundle, installs the bundle's wheels (gguf) for the stand-in generator, points
# LD_LIBRARY_PATH at the CUDA 13 libraries of the local PyTorch's `nvidia` wheels (cuBLAS,
# cuRAND, NVRTC, the runtime), then hands over to scripts/gpu_check.py, which makes the
# stand-ins, starts the daemon on `cuda` and runs the checks and benchmarks in order of value,
# skipping cleanly what the budget no longer allows. OUT_DIR receives check.json, check.md
# (the table) and daemon.log.
#
# DRY_RUN=1: the same steps on the CPU, with two-layer stand-ins. The bundle is made on the
# spot from a CPU binary (EDGENODE_BIN, default $CARGO_TARGET_DIR/release/edgenode) by
# `scripts/gpu-bundle.sh --binary`, so packing and unpacking are proven too; only the CUDA parts
# are not.
#
# Knobs: EDGENODE_GPU_CHECK_BUDGET_S (default 540: the checks' share of the ten minutes; the
# machine's start and this unpacking come on top), EDGENODE_GPU_CHECK_PYTHON (default python3,
# the one that has PyTorch), EDGENODE_GPU_BUNDLE (default .gpu-bundle/edgenode-gpu.tar.xz).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:?usage: scripts/gpu-check.sh OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
started=$SECONDS
budget="${EDGENODE_GPU_CHECK_BUDGET_S:-540}"
python="${EDGENODE_GPU_CHECK_PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/edgenode-gpu-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT

bundle="${EDGENODE_GPU_BUNDLE:-.gpu-bundle/edgenode-gpu.tar.xz}"
dry=()
if [ "${DRY_RUN:-0}" = 1 ]; then
    dry=(--dry-run)
    bin="${EDGENODE_BIN:-${CARGO_TARGET_DIR:-target}/release/edgenode}"
    scripts/gpu-bundle.sh --binary "$bin" --out "$work/bundle" --xz-level 0
    bundle="$work/bundle/edgenode-gpu.tar.xz"
fi
[ -f "$bundle" ] || { echo "gpu-check: no bundle at $bundle (make it with scripts/gpu-bundle.sh)" >&2; exit 2; }

# Unpack with xz if the machine has it, else with Python's tarfile (lzma is in its stdlib).
if command -v xz >/dev/null 2>&1; then
    xz -dc "$bundle" | tar -C "$work" -xf -
else
    "$python" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2], filter="data")' "$bundle" "$work"
fi
unpacked="$work/edgenode-gpu"
echo "gpu-check: unpacked $(du -sh "$bundle" | cut -f1) bundle in $((SECONDS - started))s"
sed 's/^/  /' "$unpacked/BUILD"

# The stand-in generator's wheels, without a network.
"$python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --target "$work/site" "$unpacked"/wheels/*.whl
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"

# The CUDA 13 libraries the binary links, from the PyTorch environment's NVIDIA wheels (and the
# driver's folder, where libcuda.so.1 lives when ld.so does not already know it).
if [ "${DRY_RUN:-0}" != 1 ]; then
    libs="$("$python" - <<'PY'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
dirs = []
for root in roots:
    for pattern in ("libcudart.so.1*", "libcublas.so.1*", "libcublasLt.so.1*", "libcurand.so.1*", "libnvrtc.so.1*"):
        for hit in glob.glob(os.path.join(root, "**", pattern), recursive=True):
            d = os.path.dirname(hit)
            if d not in dirs:
                dirs.append(d)
print(":".join(dirs))
PY
)"
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64; do
        [ -d "$d" ] && libs="${libs:+$libs:}$d"
    done
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "gpu-check: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    if ldd "$unpacked/bin/edgenode" | grep 'not found'; then
        echo "gpu-check: the binary cannot find the libraries above; the daemon steps will fail" >&2
    fi
fi

left=$((budget - (SECONDS - started)))
set +e
PYTHONUNBUFFERED=1 "$python" scripts/gpu_check.py "$out" --bin "$unpacked/bin/edgenode" --bundle "$unpacked" \
    --work "$work" --budget "$left" "${dry[@]}"
rc=$?
echo "gpu-check: finished in $((SECONDS - started))s (exit $rc); table in $out/check.md"
exit "$rc"
