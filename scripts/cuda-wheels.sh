# shellcheck shell=bash
# A CUDA 13.0 toolkit made of pip wheels: enough to build edgenode's `cuda` feature on a
# machine without NVIDIA's installer (and without a GPU). Sourced, not run:
#
#   source scripts/cuda-wheels.sh
#   cuda_wheels_env            # install (once) into its venv; export CUDA_ROOT, PATH, ...
#   cuda_wheels_stub_libcuda   # only where no NVIDIA driver is installed (link step only)
#   cuda_wheels_build [ARGS]   # the release build with --features cuda, in its own target folder
#   cuda_wheels_timed NAME     # print NAME's start now, and at exit whether it passed and how long it took
#
# Used by scripts/check-cuda-build.sh, and by scripts/gpu-check.sh when the GPU machine has
# no toolkit of its own.
#
# Why these exact versions:
# - nvcc 13.0: cudarc 0.19.10 (candle's and ours) accepts nvcc up to 13.4 and
#   mistralrs-quant 0.8.1 up to 13.2; both read the version from `nvcc --version`, so the
#   newest wheel (13.5) is refused at build time.
# - the `nvidia-cuda-nvcc` wheel of CUDA 13 carries the `nvcc` driver itself (the cu12 one has
#   only `ptxas`); `nvidia-cuda-crt` adds the crt/ headers nvcc includes, `nvidia-nvvm` adds
#   `cicc` and libdevice. All CUDA 13 wheels unpack into one tree, `nvidia/cu13/`
#   (bin, include, lib, nvvm), laid out as nvcc.profile expects.
# - the libraries the binary links against (cudart, cublas/cublasLt, curand, nvrtc) are the
#   ones CUDA 13.0 Update 2 shipped, and the headers of cub/thrust come from cccl.

# Long builds are run unattended: the log says when a script started and, whatever its end,
# how it ended and after how long.
cuda_wheels_timed() {
    cuda_wheels_script=$1
    cuda_wheels_started=$SECONDS
    trap cuda_wheels_report EXIT
    echo "$cuda_wheels_script: started $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD"
}

cuda_wheels_report() {
    local rc=$? t=$((SECONDS - cuda_wheels_started))
    printf '%s: %s after %dh %02dm %02ds\n' "$cuda_wheels_script" \
        "$([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)")" $((t / 3600)) $((t % 3600 / 60)) $((t % 60))
}

CUDA_WHEELS_PINS=(
    "nvidia-cuda-nvcc==13.0.88"
    "nvidia-cuda-crt==13.0.88"
    "nvidia-nvvm==13.0.88"
    "nvidia-cuda-runtime==13.0.96"
    "nvidia-cuda-cccl==13.0.85"
    "nvidia-cublas==13.1.0.3"
    "nvidia-curand==10.4.0.35"
    "nvidia-cuda-nvrtc==13.0.88"
)

# Installs the wheels into $EDGENODE_CUDA_VENV (default ~/.cache/edgenode/cuda-venv) unless
# they already are (so a second run works offline), then exports the toolkit's environment.
cuda_wheels_env() {
    local venv="${EDGENODE_CUDA_VENV:-$HOME/.cache/edgenode/cuda-venv}"
    local marker="$venv/.edgenode-pins"
    local want
    want="$(printf '%s\n' "${CUDA_WHEELS_PINS[@]}")"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    if [ ! -f "$marker" ] || [ "$(cat "$marker")" != "$want" ]; then
        echo "cuda-wheels: installing ${#CUDA_WHEELS_PINS[@]} CUDA 13.0 wheels into $venv (about 1.2 GB)"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${CUDA_WHEELS_PINS[@]}"
        printf '%s\n' "$want" > "$marker"
    fi
    local root
    root="$("$venv/bin/python" - <<'PY'
import os, nvidia
for base in nvidia.__path__:
    top = os.path.join(base, "cu13")
    if os.path.isfile(os.path.join(top, "bin", "nvcc")):
        print(top)
        break
PY
)"
    if [ -z "$root" ]; then
        echo "cuda-wheels: no nvidia/cu13/bin/nvcc in $venv" >&2
        return 1
    fi
    # The wheels ship only versioned sonames (libcudart.so.13); the linker's -lcudart needs
    # the unversioned name.
    local lib so f
    for lib in cudart cublas cublasLt curand nvrtc; do
        so=""
        for f in "$root/lib/lib$lib.so."*; do
            # libcudart.so.13, not libnvrtc-builtins.so.13.0 or libnvrtc.alt.so.13.
            if [[ "${f##*/}" =~ ^lib$lib\.so\.[0-9]+$ ]]; then
                so="${f##*/}"
                break
            fi
        done
        if [ -z "$so" ]; then
            echo "cuda-wheels: lib$lib.so.N is missing from $root/lib" >&2
            return 1
        fi
        ln -sfn "$so" "$root/lib/lib$lib.so"
    done
    export CUDA_ROOT="$root" CUDA_HOME="$root" CUDA_PATH="$root" CUDA_TOOLKIT_ROOT_DIR="$root"
    export PATH="$root/bin:$PATH"
    # gcc (rustc's linker) searches LIBRARY_PATH for -l; the build scripts' own search paths
    # (cudarc adds $CUDA_ROOT/lib and lib/stubs) point at the same places.
    export LIBRARY_PATH="$root/lib:$root/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
    # At run time (tests, the daemon) the binary loads these; never the stubs folder.
    export LD_LIBRARY_PATH="$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # There is no GPU to ask during a build: H100/H200 are compute capability 9.0.
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    cuda_wheels_check_nvcc
}

# `cargo build --release --locked --features cuda ARGS` against this toolkit, in the CUDA
# build's own target folder (EDGENODE_CUDA_TARGET_DIR, default ~/.cache/edgenode-target-cuda),
# so it never locks or invalidates the CPU build's. Call after cuda_wheels_env. Leaves
# CARGO_TARGET_DIR exported: the binary is $CARGO_TARGET_DIR/release/edgenode.
cuda_wheels_build() {
    export CARGO_TARGET_DIR="${EDGENODE_CUDA_TARGET_DIR:-$HOME/.cache/edgenode-target-cuda}"
    # Parallel nvcc jobs per crate; 1 bounds memory.
    export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-1}"
    # --locked: fail rather than ever rewrite Cargo.lock.
    cargo fetch --locked
    cuda_wheels_stub_libcuda
    echo "cuda-wheels: cargo build --release --locked --features cuda $* (sm_$CUDA_COMPUTE_CAP, target $CARGO_TARGET_DIR)"
    cargo build --release --locked --features cuda "$@"
}

# Refuses an nvcc the CUDA crates would refuse later, with a clearer message.
cuda_wheels_check_nvcc() {
    local release
    release="$(nvcc --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)"
    case "$release" in
        12.[0-9] | 13.[0-2]) ;;
        *)
            echo "cuda-wheels: nvcc $(command -v nvcc) is CUDA ${release:-unknown}; cudarc 0.19.10 takes at most 13.4 and mistralrs-quant 0.8.1 at most 13.2" >&2
            return 1
            ;;
    esac
}

# Writes $CUDA_ROOT/lib/stubs/libcuda.so: every CUDA driver API entry point, each returning
# CUDA_ERROR_STUB_LIBRARY (34), with the soname libcuda.so.1. It exists for the link step
# only: candle turns on cudarc's `dynamic-linking`, so the binary references cuInit & co.
# directly and the linker needs a library that defines them (a truly empty libcuda.so leaves
# them undefined). At run time the loader asks for libcuda.so.1, which only the NVIDIA driver
# provides: the stub is never loaded. NVIDIA's own toolkit ships the same kind of stub in
# lib64/stubs; the wheels do not.
cuda_wheels_stub_libcuda() {
    local stubs="$CUDA_ROOT/lib/stubs"
    mkdir -p "$stubs"
    local tmp
    tmp="$(mktemp -d)"
    # The entry points cuda.h declares, after its macros map names to their current versions
    # (cuMemAlloc -> cuMemAlloc_v2) ...
    gcc -E -P -x c -I"$CUDA_ROOT/include" "$CUDA_ROOT/include/cuda.h" \
        | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' > "$tmp/names"
    # ... and every name the cudarc sources in cargo's registry declare, in case they differ.
    local src
    for src in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs; do
        [ -f "$src" ] || continue
        grep -oE 'fn cu[A-Z][A-Za-z0-9_]*\(' "$src" | sed -e 's/^fn //' -e 's/($//' >> "$tmp/names"
    done
    sort -u "$tmp/names" | awk '{ printf "int %s(void) { return 34; }\n", $1 }' > "$tmp/stub.c"
    gcc -shared -fPIC -w -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$tmp/stub.c"
    echo "cuda-wheels: link-only stub $stubs/libcuda.so ($(wc -l < "$tmp/stub.c") entry points)"
    rm -rf "$tmp"
}
