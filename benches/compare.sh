#!/usr/bin/env bash
# Runs edgenode's benchmark beside the baselines, on this machine, in one go, and prints
# the figures with ratios and the date. The machine is shared and noisy: quote ratios.
#
#   benches/compare.sh [embed] [generate]
#
# Baselines (in benches/baselines/, copied unchanged from the project's reference scripts):
# sentence-transformers for embeddings, llama.cpp (llama-cpp-python) for generation. They
# need a Python environment with those packages; BENCH_PYTHON names its interpreter:
#   python3 -m venv .venv-bench && .venv-bench/bin/pip install sentence-transformers llama-cpp-python
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgenode-target}"
py="${BENCH_PYTHON:-.venv-bench/bin/python}"
what=("$@"); [ ${#what[@]} -eq 0 ] && what=(embed generate)
threads="${BENCH_THREADS:-$(nproc)}"
out="$(mktemp -d)"

cargo build --release --bins --benches -q
"$CARGO_TARGET_DIR/release/edgenode" models fetch >/dev/null

run_edge=()
for w in "${what[@]}"; do
  case "$w" in
    embed)
      "$py" benches/baselines/bench_st.py models/minilm tests/fixtures/public_sentences.txt "$threads" | tee "$out/st.txt"
      run_edge+=(embed) ;;
    generate)
      "$py" benches/baselines/bench_llamacpp.py models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$threads" 128 | tee "$out/llama.txt"
      run_edge+=(generate) ;;
  esac
done
# One daemon serving both default models for all of edgenode's measurements (so its
# peak memory is the footprint of the whole default deployment under load).
cargo bench -q --bench edge -- "${run_edge[@]}" | tee "$out/edge.txt"
grep "edgenode embed" "$out/edge.txt" > "$out/edge-embed.txt" || true
grep "edgenode generate" "$out/edge.txt" > "$out/edge-generate.txt" || true
grep "edgenode memory" "$out/edge.txt" > "$out/edge-memory.txt" || true

python3 - "$out" "$threads" <<'PY'
import re, sys, os, datetime, platform
out, threads = sys.argv[1], sys.argv[2]
def kv(name):
    p = os.path.join(out, name)
    if not os.path.exists(p): return {}
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", open(p).read())}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"\n{datetime.date.today()} · {cpu} · {os.cpu_count()} cores · {threads} threads")
print("| workload | edgenode | baseline | ratio (higher is better for edgenode) |\n|---|---|---|---|")
st, e = kv("st.txt"), kv("edge-embed.txt")
if st and e:
    print(f"| embed batch 32, sentences/s | {e['batch32_throughput_sent_per_s']:.0f} | sentence-transformers {st['batch32_throughput_sent_per_s']:.0f} | {e['batch32_throughput_sent_per_s']/st['batch32_throughput_sent_per_s']:.2f}× |")
    print(f"| embed single sentence p50, ms | {e['single_p50_ms']:.1f} | sentence-transformers {st['single_p50_ms']:.1f} | {st['single_p50_ms']/e['single_p50_ms']:.2f}× |")
    print(f"| embed single sentence p99, ms | {e['single_p99_ms']:.1f} | sentence-transformers {st['single_p99_ms']:.1f} | {st['single_p99_ms']/e['single_p99_ms']:.2f}× |")
    print(f"| embed 16 concurrent clients, sentences/s | {e['concurrent16_sent_per_s']:.0f} ({e['concurrent16_vs_one_client']:.1f}× one client) | — | — |")
ll, g = kv("llama.txt"), kv("edge-generate.txt")
if ll and g:
    print(f"| decode, 1 stream, tokens/s | {g['decode_tok_per_s']:.1f} | llama.cpp {ll['decode_tok_per_s']:.1f} | {g['decode_tok_per_s']/ll['decode_tok_per_s']:.2f}× |")
    print(f"| prompt processing, tokens/s | {g['prompt_tok_per_s']:.0f} | llama.cpp {ll['prompt_tok_per_s']:.0f} | {g['prompt_tok_per_s']/ll['prompt_tok_per_s']:.2f}× |")
    print(f"| time to first token, ms | {g['ttft_ms_p50']:.0f} | llama.cpp {ll['ttft_ms_p50']:.0f} | {ll['ttft_ms_p50']/g['ttft_ms_p50']:.2f}× |")
    print(f"| 8 concurrent streams, tokens/s | {g['streams8_tok_per_s']:.1f} ({g['streams8_vs_one']:.2f}× one stream at {g['one_stream_tok_per_s']:.1f}, same method) | — | — |")
mem = kv("edge-memory.txt")
if mem:
    print(f"| peak RSS of the daemon (both default models, under this benchmark), MiB | {mem['peak_rss_mb']:.0f} | — | — |")
PY
