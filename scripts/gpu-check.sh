#!/usr/bin/env bash
# The GPU check: one script for a machine with an NVIDIA GPU (H100/H200, a CUDA 12 or 13
# driver, no network). It builds edgenode with `--features cuda`, runs the tests that
# exercise the GPU, then a short benchmark, and prints one table at the end. Budget: 8
# minutes (EDGENODE_GPU_CHECK_BUDGET_S=480), with a warm target folder.
#
#   scripts/gpu-check.sh
#
# What runs, honestly:
# - kernels: tests/kernels.rs, whose `gpu_kernels_match_their_cpu_twins` (built only with
#   `cuda`) compares our CUDA pooling kernels with their Rust twins on random inputs. That
#   test returns early with "skipped" when it finds no CUDA device; this script counts that
#   as a failure, not a pass.
# - embed: tests/embed.rs (golden parity with sentence-transformers, classifiers) with
#   EDGENODE_RUNTIME__DEVICE=cuda. The tests start the real daemon and it inherits the
#   environment (tests/common/mod.rs removes only EDGENODE_CONFIG), so the models run on the
#   GPU (candle's CUDA ops; `auto` and `candle` engines both). There is no GPU-only embed
#   test: this is the existing one, on the GPU.
# - generate: the greedy-determinism and concurrent-streams tests of tests/generate.rs on the
#   mistral.rs engine (the GPU engine; our native engine is CPU-only), on the GPU.
# - card-models: tests/card_models.rs on the GPU: the TinyLlama-shaped stand-ins (Q4_K_M,
#   Q8_0) served by mistral.rs with llama.cpp's prompt tokens, and bge-shaped folders against
#   sentence-transformers' vectors (needs numpy and gguf for scripts/standins.py).
# - device: the daemon started here with EDGENODE_RUNTIME__DEVICE=cuda reports cuda:N in
#   /info for the node and every model (the tests above do not look).
# - benchmark: benches/edge.rs (embed batch 32, 1 and 8 decode streams) on the GPU, plus
#   embed batch 32 and 128 measured here the same way (the bench has no batch 128;
#   EDGENODE_LIMITS__MAX_INPUTS=128 lets a request carry 128 inputs).
#
# The machine has no network, so it needs, before it starts:
# - every crate of Cargo.lock in cargo's registry (`cargo fetch --locked` elsewhere, copy
#   ~/.cargo/registry); cargo runs offline unless CARGO_NET_OFFLINE=false;
# - the default models in models/ (`edgenode models fetch` elsewhere); the tests verify them;
# - a CUDA toolkit the crates accept (12.x to 13.2) and the driver supports: nvcc on PATH or
#   in /usr/local/cuda, or the pip-wheel toolkit scripts/check-cuda-build.sh installs into
#   ~/.cache/edgenode/cuda-venv (copy it along);
# - ideally a warm EDGENODE_CUDA_TARGET_DIR (default ~/.cache/edgenode-target-cuda): a cold
#   build compiles candle's and mistral.rs's kernels and takes far longer than 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

budget=${EDGENODE_GPU_CHECK_BUDGET_S:-480}
started=$SECONDS
export CARGO_TARGET_DIR="${EDGENODE_CUDA_TARGET_DIR:-$HOME/.cache/edgenode-target-cuda}"
export CARGO_NET_OFFLINE="${CARGO_NET_OFFLINE:-true}"
logs="$(mktemp -d)"
rows=()     # "name|result|seconds|detail"
bench=()    # "measurement|value"

remaining() { echo $((budget - (SECONDS - started))); }

# record NAME RESULT SECONDS DETAIL
record() {
    rows+=("$1|$2|$3|$4")
    printf '\n=== %s: %s (%ss) %s\n' "$1" "$2" "$3" "$4"
}

# fail_last DETAIL: turns the last recorded step into a failure (a command that exited 0
# but did not do what the step is for).
fail_last() {
    local last="${rows[${#rows[@]} - 1]}" name secs
    name="${last%%|*}"
    secs="$(cut -d'|' -f3 <<< "$last")"
    rows[${#rows[@]} - 1]="$name|FAIL|$secs|$(tr -d '|' <<< "$1")"
    printf '=== %s: FAIL %s\n' "$name" "$1"
}

# step NAME MAX_SECONDS COMMAND...: runs it with what is left of the budget (at most
# MAX_SECONDS), logs to $logs/NAME.log, and records the result. Returns the command's status.
step() {
    local name=$1 max=$2
    shift 2
    local left
    left=$(remaining)
    if [ "$left" -le 5 ]; then
        record "$name" "SKIPPED" 0 "out of time (budget ${budget}s)"
        return 1
    fi
    local limit=$((left < max ? left : max)) t0=$SECONDS rc
    printf '\n--- %s (limit %ss): %s\n' "$name" "$limit" "$*"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$logs/$name.log" 2>&1
    rc=$?
    tail -n 15 "$logs/$name.log"
    if [ "$rc" -eq 0 ]; then
        record "$name" "PASS" $((SECONDS - t0)) ""
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        record "$name" "FAIL" $((SECONDS - t0)) "timed out after ${limit}s"
    else
        record "$name" "FAIL" $((SECONDS - t0)) "exit $rc, log $logs/$name.log"
    fi
    return "$rc"
}

# shellcheck disable=SC2329  # called by the EXIT trap
print_table() {
    echo
    echo "## edgenode GPU check — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "${gpu_line:-GPU: unknown}"
    echo "toolkit: ${toolkit_line:-unknown}; CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-unset}; total $((SECONDS - started))s of ${budget}s"
    echo
    echo "| step | result | seconds | detail |"
    echo "|---|---|---|---|"
    local r
    for r in "${rows[@]}"; do
        IFS='|' read -r name result secs detail <<< "$r"
        echo "| $name | $result | $secs | $detail |"
    done
    if [ "${#bench[@]}" -gt 0 ]; then
        echo
        echo "| benchmark (GPU) | value |"
        echo "|---|---|"
        for r in "${bench[@]}"; do
            IFS='|' read -r name value <<< "$r"
            echo "| $name | $value |"
        done
    fi
    echo
    echo "logs: $logs"
}
trap print_table EXIT

# ---------------------------------------------------------------------------------------
# Preflight: the GPU, its driver, a toolkit both the crates and the driver accept.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
    record preflight FAIL 0 "nvidia-smi finds no NVIDIA GPU"
    exit 1
fi
gpu_line="GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
driver_cuda="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)"
gpu_line="$gpu_line, driver supports CUDA ${driver_cuda:-?}"
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')"
    export CUDA_COMPUTE_CAP="${cap:-90}"
fi

if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH="/usr/local/cuda/bin:$PATH"
fi
# shellcheck source=scripts/cuda-wheels.sh
source scripts/cuda-wheels.sh
if command -v nvcc >/dev/null 2>&1 && cuda_wheels_check_nvcc 2>/dev/null; then
    nvcc_root="$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)"
    export CUDA_ROOT="${CUDA_ROOT:-$nvcc_root}" CUDA_HOME="${CUDA_HOME:-$nvcc_root}"
    export CUDA_PATH="${CUDA_PATH:-$nvcc_root}" CUDA_TOOLKIT_ROOT_DIR="${CUDA_TOOLKIT_ROOT_DIR:-$nvcc_root}"
    for d in "$nvcc_root/lib64" "$nvcc_root/lib"; do
        [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
elif [ -x "${EDGENODE_CUDA_VENV:-$HOME/.cache/edgenode/cuda-venv}/bin/python" ]; then
    # The pip-wheel toolkit; installed already (no network here), so this only sets it up.
    # The driver provides the real libcuda.so; the wheels have none, so the link step
    # needs the stub (never loaded at run time: the binary asks for libcuda.so.1).
    cuda_wheels_env || { record preflight FAIL 0 "the pip-wheel CUDA toolkit is incomplete"; exit 1; }
    if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so '; then
        cuda_wheels_stub_libcuda
    fi
else
    record preflight FAIL 0 "no usable nvcc (12.x to 13.2) and no pip-wheel toolkit; see the header of this script"
    exit 1
fi
toolkit="$(nvcc --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)"
toolkit_line="nvcc $toolkit at $(command -v nvcc)"
# A driver runs code built for its own CUDA version or older: 13.x code on a 12.x driver
# fails at the first kernel (or at cuInit).
if [ -n "$driver_cuda" ] && [ "$(printf '%s\n%s\n' "$driver_cuda" "$toolkit" | sort -V | head -n 1)" != "$toolkit" ]; then
    record preflight FAIL 0 "toolkit CUDA $toolkit is newer than the driver's CUDA $driver_cuda: use a $driver_cuda-or-older toolkit"
    exit 1
fi
record preflight PASS 0 "${gpu_line#GPU: }; $toolkit_line; CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"

# ---------------------------------------------------------------------------------------
# Build: the binary, the test binaries and the benchmark, with CUDA.
step build 900 cargo build --release --locked --features cuda --bins --tests --benches || exit 1
bin="$CARGO_TARGET_DIR/release/edgenode"
step models 60 "$bin" models verify || exit 1

# ---------------------------------------------------------------------------------------
# GPU tests.
if step kernels 120 cargo test --release --locked --features cuda --test kernels -- --nocapture; then
    if grep -q '\*\*\* skipped' "$logs/kernels.log"; then
        fail_last "the GPU kernel test skipped itself: $(grep -m1 '\*\*\* skipped' "$logs/kernels.log" | tr -d '*')"
    fi
fi
EDGENODE_RUNTIME__DEVICE=cuda step embed-parity 180 \
    cargo test --release --locked --features cuda --test embed
EDGENODE_RUNTIME__DEVICE=cuda step generate-greedy 180 \
    cargo test --release --locked --features cuda --test generate -- \
    mistralrs::greedy_is_deterministic_streaming_or_not mistralrs::concurrent_streams_are_independent_and_correct
# The card's models on the GPU: the TinyLlama-shaped Q4_K_M and Q8_0 stand-ins (mistral.rs,
# with our SentencePiece tokenizer) and the bge-shaped folders against sentence-transformers'
# vectors. The stand-ins are written by scripts/standins.py, which needs numpy and gguf in
# TEST_PYTHON (or python3).
EDGENODE_RUNTIME__DEVICE=cuda step card-models 240 \
    cargo test --release --locked --features cuda --test card_models

# ---------------------------------------------------------------------------------------
# Benchmark.
# shellcheck disable=SC2329  # called through `bash -c` under timeout
bench_client() {
    # Starts the daemon on the GPU, checks /info names the GPU for the node and every model,
    # and measures embed throughput at batch 32 and 128 (best of 3, 1024 sentences each).
    # Runs under `timeout` in a child bash (hence exported), which stops the daemon on exit.
    # Not local: the EXIT trap runs after the function has returned.
    EDGENODE_RUNTIME__DEVICE=cuda EDGENODE_LIMITS__MAX_INPUTS=128 EDGENODE_LOG__FORMAT=json \
        "$bin" serve --addr 127.0.0.1:0 > "$logs/daemon.log" 2>&1 &
    daemon_pid=$!
    trap 'kill -TERM "$daemon_pid" 2>/dev/null; wait "$daemon_pid" 2>/dev/null' EXIT
    python3 - "$logs/daemon.log" tests/fixtures/public_sentences.txt "$daemon_pid" <<'PY'
import json, os, sys, time, urllib.request
log_file, corpus_file, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])

def alive():
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False

deadline = time.time() + 240
base = None
while base is None:
    for line in open(log_file, errors="replace"):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("message") == "listening":
            base = "http://" + event["addr"]
    if base is None:
        if not alive() or time.time() > deadline:
            sys.exit("the daemon did not start listening: " + open(log_file, errors="replace").read()[-2000:])
        time.sleep(0.2)

def call(path, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()

while True:
    try:
        if call("/readyz", timeout=5)[0] == 200:
            break
    except Exception:
        pass
    if not alive() or time.time() > deadline:
        sys.exit("not ready: " + open(log_file, errors="replace").read()[-2000:])
    time.sleep(0.2)

info = json.loads(call("/info")[1])
devices = {m["name"]: m.get("device") for m in info["models"]}
print(f"device node={info['device']} models={devices}")
on_gpu = str(info["device"]).startswith("cuda") and all(not d or str(d).startswith("cuda") for d in devices.values())
print(f"on_gpu={int(on_gpu)}")

lines = [l for l in open(corpus_file).read().splitlines() if l.strip() and len(l) < 200]
corpus = (lines * (1024 // len(lines) + 1))[:1024]
call("/embed", {"inputs": corpus[:128]})  # warm-up at the largest batch
for batch in (32, 128):
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for i in range(0, len(corpus), batch):
            status, _ = call("/embed", {"inputs": corpus[i:i + batch]})
            assert status == 200, status
        best = min(best, time.perf_counter() - t)
    print(f"embed_batch{batch}_sent_per_s={len(corpus) / best:.1f}")
PY
}
export -f bench_client
export bin logs

if command -v python3 >/dev/null 2>&1; then
    if step device-and-batch 300 bash -c bench_client; then
        grep -q '^on_gpu=1' "$logs/device-and-batch.log" \
            || fail_last "/info does not name the GPU: $(grep -m1 '^device' "$logs/device-and-batch.log")"
        for b in 32 128; do
            v="$(sed -n "s/^embed_batch${b}_sent_per_s=//p" "$logs/device-and-batch.log")"
            [ -n "$v" ] && bench+=("embed batch $b, sentences/s (1024 sentences, best of 3)|$v")
        done
    fi
else
    record device-and-batch SKIPPED 0 "no python3 for the batch-128 client"
fi

EDGENODE_RUNTIME__DEVICE=cuda EDGENODE_LIMITS__MAX_INPUTS=128 step bench-edge 300 \
    cargo bench --locked --features cuda --bench edge -- embed generate
kv() { grep -o "$1=[0-9.]*" "$logs/bench-edge.log" 2>/dev/null | head -n 1 | cut -d= -f2; }
[ -n "$(kv batch32_throughput_sent_per_s)" ] && bench+=("embed batch 32, sentences/s (benches/edge.rs, 512 sentences)|$(kv batch32_throughput_sent_per_s)")
[ -n "$(kv single_p50_ms)" ] && bench+=("embed single sentence p50, ms|$(kv single_p50_ms)")
[ -n "$(kv decode_tok_per_s)" ] && bench+=("decode, 1 stream, tokens/s|$(kv decode_tok_per_s)")
[ -n "$(kv streams8_tok_per_s)" ] && bench+=("decode, 8 streams, tokens/s (aggregate)|$(kv streams8_tok_per_s)")
[ -n "$(kv ttft_ms_p50)" ] && bench+=("time to first token, ms|$(kv ttft_ms_p50)")
[ -n "$(kv peak_rss_mb)" ] && bench+=("daemon peak RSS, MiB|$(kv peak_rss_mb)")

failed=0
for r in "${rows[@]}"; do
    case "$r" in *"|FAIL|"* | *"|SKIPPED|"*) failed=1 ;; esac
done
exit "$failed"
