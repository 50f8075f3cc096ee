#!/usr/bin/env bash
# Runs edgenode's benchmark beside the baselines, on this machine, in one go, and prints
# the figures with ratios, the date and the CPU. The machine is shared and noisy: quote
# ratios from one run, not figures across runs.
#
#   benches/compare.sh [embed] [generate] [card] [cache] [switch] [tgi] [fleet]
#
#   embed     the default MiniLM against sentence-transformers (fp32 and bf16) and ONNX
#             Runtime (fp32, and its dynamically quantized int8 model) on the same folder,
#             and our own int8 and bf16 MiniLM (precision = "int8", "bf16") against our fp32,
#             with each model's smallest cosine to sentence-transformers' golden vectors
#   generate  the default SmolLM2 (Q4_1) against llama.cpp on the same file, and the cost of
#             constrained decoding (a JSON schema) against our own unconstrained decode
#   card      the card's models at their real size, on shape-faithful stand-ins written by
#             scripts/standins.py (cached in ~/.cache/edgenode/standins): TinyLlama-1.1B-
#             shaped Q4_K_M and Q8_0 (22 layers) against llama.cpp on the same files, with a
#             1,000-token prompt and decode as a share of the measured memory bandwidth; the
#             daemon's peak memory with TinyLlama Q4_K_M and MiniLM resident; the 12-layer
#             bge-small-shaped folder against sentence-transformers on the same folder.
#   cache     the response cache: a hit's latency over HTTP (chat and embeddings), and the
#             throughput it gains on a chat workload where half the requests repeat one,
#             against the same workload sent with Cache-Control: no-store
#   switch    a version switch under load (sync.apply): the card's stand-ins at full size,
#             version 1 to version 2 (other seeds), time from the manifest change to each
#             switch, embed and chat latency during the switch against before it, and peak
#             RSS (benches/switch.py; no baseline: nothing else we know of switches in place)
#   tgi       what TGI's dialect costs beside ours on the default SmolLM2: the same greedy
#             generation as /generate {"prompt"} and {"inputs"}, plain and with details and
#             top_n_tokens (benches/tgi_overhead.py; the baseline is our own route)
#   fleet     what [fleet] store costs a keyed request: p50/p99 of the same keyed /embed on a
#             node without a store and on one sharing a real Redis (benches/fleet_overhead.py;
#             needs redis-server)
#
# Baselines (benches/baselines/, ours): sentence-transformers, ONNX Runtime (the folder exported
# with torch.onnx.export, run in-process with every graph optimization), and llama.cpp through
# llama-cpp-python. They need one Python environment with those packages and numpy and gguf
# (for the stand-ins); BENCH_PYTHON names its interpreter:
#   python3 -m venv .venv-bench && .venv-bench/bin/pip install sentence-transformers onnxruntime onnx \
#       llama-cpp-python numpy gguf==0.19.0
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgenode-target}"
py="${BENCH_PYTHON:-.venv-bench/bin/python}"
what=("$@"); [ ${#what[@]} -eq 0 ] && what=(embed generate)
threads="${BENCH_THREADS:-$(nproc)}"
out="$(mktemp -d)"
bin="$CARGO_TARGET_DIR/release/edgenode"

cargo build --release --bins --benches -q
"$bin" models fetch >/dev/null
bench() { cargo bench -q --bench edge -- "$@"; }

for w in "${what[@]}"; do
  case "$w" in
    embed)
      "$py" benches/baselines/sentence_transformers_bench.py models/minilm tests/fixtures/public_sentences.txt --threads "$threads" | tee "$out/st.txt"
      "$py" benches/baselines/sentence_transformers_bench.py models/minilm tests/fixtures/public_sentences.txt --threads "$threads" --bf16 | tee "$out/st-bf16.txt"
      "$py" benches/baselines/onnxruntime_bench.py models/minilm tests/fixtures/public_sentences.txt --threads "$threads" --int8 \
        2> "$out/ort.log" | tee "$out/ort.txt"
      printf '[store]\ndir = "%s"\n' "$PWD/models" > "$out/embed.toml"
      printf '\n[[models]]\nname = "%s"\nkind = "%s"\n' minilm embed smollm2 generate >> "$out/embed.toml"
      printf '\n[[models]]\nname = "minilm-int8"\nkind = "embed"\nmanifest = "minilm"\nprecision = "int8"\n' >> "$out/embed.toml"
      printf '\n[[models]]\nname = "minilm-bf16"\nkind = "embed"\nmanifest = "minilm"\nprecision = "bf16"\n' >> "$out/embed.toml"
      bench embed --config "$out/embed.toml" --embed-models minilm,minilm-int8,minilm-bf16 --golden | tee "$out/edge-embed.txt" ;;
    generate)
      "$py" benches/baselines/llama_cpp_bench.py models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --template chatml --threads "$threads" | tee "$out/llama.txt"
      bench generate structured | tee "$out/edge-generate.txt" ;;
    card)
      standins="${EDGENODE_STANDINS:-$HOME/.cache/edgenode/standins}"
      for mix in q4_k_m q8_0; do
        [ -d "$standins/$mix" ] || "$py" scripts/standins.py tinyllama "$standins/$mix" \
          --vocab tests/fixtures/vocab/ggml-vocab-llama-spm.gguf --layers 22 --types "$mix"
      done
      [ -d "$standins/bge-small" ] || "$py" scripts/standins.py bge "$standins/bge-small" \
        --tokenizer models/minilm/tokenizer.json --shape small --layers 12
      manifest="$out/card-manifest.toml"
      {
        "$bin" models pin minilm --kind embed --version 0.1.0 --dir models/minilm
        "$bin" models pin tinyllama --kind generate --version standin-22l --dir "$standins/q4_k_m"
        "$bin" models pin tinyllama-q8 --kind generate --version standin-22l --dir "$standins/q8_0"
        "$bin" models pin bge-small --kind embed --version standin-12l --dir "$standins/bge-small"
      } > "$manifest"
      serve() {  # a config serving the named models from the card manifest
        printf '[store]\ndir = "%s"\nmanifest = "%s"\n' "$PWD/models" "$manifest"
        for m in "$@"; do
          case "$m" in tinyllama*) kind=generate ;; *) kind=embed ;; esac
          printf '\n[[models]]\nname = "%s"\nkind = "%s"\n' "$m" "$kind"
        done
      }
      serve minilm tinyllama > "$out/q4.toml"
      serve tinyllama-q8 > "$out/q8.toml"
      serve bge-small > "$out/bge.toml"
      # 111 repetitions of the long sentence are 1,000 tokens in TinyLlama's vocabulary.
      for mix in q4_k_m q8_0; do
        "$py" benches/baselines/llama_cpp_bench.py "$standins/$mix"/*.gguf --template zephyr --long-repeats 111 \
          --threads "$threads" | tee "$out/llama-$mix.txt"
      done
      "$py" benches/baselines/sentence_transformers_bench.py "$standins/bge-small" tests/fixtures/public_sentences.txt \
        --threads "$threads" | tee "$out/st-bge.txt"
      "$py" benches/baselines/onnxruntime_bench.py "$standins/bge-small" tests/fixtures/public_sentences.txt \
        --threads "$threads" 2> "$out/ort-bge.log" | tee "$out/ort-bge.txt"
      bench bandwidth | tee "$out/bandwidth.txt"
      bench generate --config "$out/q4.toml" --model tinyllama --template zephyr --long-repeats 111 | tee "$out/edge-q4_k_m.txt"
      bench generate --config "$out/q8.toml" --model tinyllama-q8 --template zephyr --long-repeats 111 | tee "$out/edge-q8_0.txt"
      bench embed --config "$out/bge.toml" --embed-model bge-small | tee "$out/edge-bge.txt" ;;
    cache)
      printf '[store]\ndir = "%s"\n\n[cache]\nenabled = true\n' "$PWD/models" > "$out/cache.toml"
      printf '\n[[models]]\nname = "%s"\nkind = "%s"\n' minilm embed smollm2 generate >> "$out/cache.toml"
      bench cache --config "$out/cache.toml" | tee "$out/edge-cache.txt" ;;
    switch)
      standins="${EDGENODE_STANDINS:-$HOME/.cache/edgenode/standins}"
      for seed in 1 2; do
        suffix=""; [ "$seed" = 1 ] || suffix="-seed$seed"
        [ -d "$standins/q4_k_m$suffix" ] || "$py" scripts/standins.py tinyllama "$standins/q4_k_m$suffix" \
          --vocab tests/fixtures/vocab/ggml-vocab-llama-spm.gguf --layers 22 --types q4_k_m --seed "$seed"
        [ -d "$standins/bge-small$suffix" ] || "$py" scripts/standins.py bge "$standins/bge-small$suffix" \
          --tokenizer models/minilm/tokenizer.json --shape small --layers 12 --seed "$seed"
      done
      "$py" benches/switch.py "$bin" "$standins" | tee "$out/switch.txt" ;;
    tgi)
      "$py" benches/tgi_overhead.py "$CARGO_TARGET_DIR/release/edgenode" | tee "$out/tgi-overhead.txt" ;;
    fleet)
      "$py" benches/fleet_overhead.py "$CARGO_TARGET_DIR/release/edgenode" | tee "$out/fleet-overhead.txt" ;;
    *) echo "unknown benchmark $w (embed, generate, card, cache, switch, tgi, fleet)"; exit 2 ;;
  esac
done

python3 - "$out" "$threads" <<'PY'
import re, sys, os, datetime, platform
out, threads = sys.argv[1], sys.argv[2]
def kv(name, line=None):
    p = os.path.join(out, name)
    if not os.path.exists(p): return {}
    text = open(p).read()
    if line:
        text = "\n".join(l for l in text.splitlines() if l.startswith(line))
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", text)}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC · {cpu} · {os.cpu_count()} cores · {threads} threads")
print("| workload | edgenode | baseline | ratio (above 1: edgenode ahead) |\n|---|---|---|---|")
def embed_rows(st, e, label, ort=None):
    if not (st and e): return
    print(f"| {label} batch 32, sentences/s | {e['batch32_throughput_sent_per_s']:.0f} | sentence-transformers {st['batch32_throughput_sent_per_s']:.0f} | {e['batch32_throughput_sent_per_s']/st['batch32_throughput_sent_per_s']:.2f}× |")
    print(f"| {label} single sentence p50, ms | {e['single_p50_ms']:.1f} | sentence-transformers {st['single_p50_ms']:.1f} | {st['single_p50_ms']/e['single_p50_ms']:.2f}× |")
    print(f"| {label} single sentence p99, ms | {e['single_p99_ms']:.1f} | sentence-transformers {st['single_p99_ms']:.1f} | {st['single_p99_ms']/e['single_p99_ms']:.2f}× |")
    if ort:
        print(f"| {label} batch 32, sentences/s | {e['batch32_throughput_sent_per_s']:.0f} | ONNX Runtime fp32 {ort['batch32_throughput_sent_per_s']:.0f} | {e['batch32_throughput_sent_per_s']/ort['batch32_throughput_sent_per_s']:.2f}× |")
        print(f"| {label} single sentence p50, ms (ours over HTTP, ONNX Runtime in-process) | {e['single_p50_ms']:.1f} | ONNX Runtime fp32 {ort['single_p50_ms']:.1f} | {ort['single_p50_ms']/e['single_p50_ms']:.2f}× |")
        if "int8_batch32_throughput_sent_per_s" in ort:
            print(f"| {label} batch 32, ONNX Runtime's dynamic int8 model, sentences/s | — | {ort['int8_batch32_throughput_sent_per_s']:.0f} (min cosine {ort['int8_min_cosine']:.3f} to its fp32) | — |")
    print(f"| {label} 16 concurrent clients, sentences/s | {e['concurrent16_sent_per_s']:.0f} ({e['concurrent16_vs_one_client']:.1f}× one client, {e['concurrent16_sent_per_s']/e['batch32_throughput_sent_per_s']:.2f}× our batch 32) | — | — |")
def generate_rows(ll, g, label, bw=None):
    if not (ll and g): return
    print(f"| {label} decode, 1 stream, tokens/s | {g['decode_tok_per_s']:.1f} | llama.cpp {ll['decode_tok_per_s']:.1f} | {g['decode_tok_per_s']/ll['decode_tok_per_s']:.2f}× |")
    print(f"| {label} prompt processing ({g['prompt_tokens']:.0f} tokens), tokens/s | {g['prompt_tok_per_s']:.0f} | llama.cpp {ll['prompt_tok_per_s']:.0f} | {g['prompt_tok_per_s']/ll['prompt_tok_per_s']:.2f}× |")
    print(f"| {label} time to first token, ms | {g['ttft_ms_p50']:.0f} | llama.cpp {ll['ttft_ms_p50']:.0f} | {ll['ttft_ms_p50']/g['ttft_ms_p50']:.2f}× |")
    print(f"| {label} 8 concurrent streams, tokens/s | {g['streams8_tok_per_s']:.1f} ({g['streams8_vs_one']:.2f}× one stream at {g['one_stream_tok_per_s']:.1f}) | — | — |")
    if bw and g.get("weight_bytes_per_token") and ll.get("weight_bytes_per_token"):
        ours = g["weight_bytes_per_token"] * g["decode_tok_per_s"] / 1e9
        theirs = ll["weight_bytes_per_token"] * ll["decode_tok_per_s"] / 1e9
        print(f"| {label} decode weight reads, GB/s (share of {bw:.1f} GB/s measured) | {ours:.1f} ({ours/bw:.0%}; {g['weight_bytes_per_token']/1e6:.0f} MB/token) | llama.cpp {theirs:.1f} ({theirs/bw:.0%}; {ll['weight_bytes_per_token']/1e6:.0f} MB/token) | — |")
embed_rows(kv("st.txt"), kv("edge-embed.txt", "edgenode embed:"), "MiniLM", kv("ort.txt"))
e32, e8, ort = kv("edge-embed.txt", "edgenode embed:"), kv("edge-embed.txt", "edgenode embed [minilm-int8]:"), kv("ort.txt")
if e32 and e8:
    print(f"| MiniLM int8 (`precision = \"int8\"`) batch 32, sentences/s | {e8['batch32_throughput_sent_per_s']:.0f} | edgenode fp32 {e32['batch32_throughput_sent_per_s']:.0f} | {e8['batch32_throughput_sent_per_s']/e32['batch32_throughput_sent_per_s']:.2f}× |")
    if ort.get("int8_batch32_throughput_sent_per_s"):
        print(f"| MiniLM int8 batch 32, sentences/s | {e8['batch32_throughput_sent_per_s']:.0f} | ONNX Runtime dynamic int8 {ort['int8_batch32_throughput_sent_per_s']:.0f} | {e8['batch32_throughput_sent_per_s']/ort['int8_batch32_throughput_sent_per_s']:.2f}× |")
    print(f"| MiniLM int8 single sentence p50, ms | {e8['single_p50_ms']:.1f} | edgenode fp32 {e32['single_p50_ms']:.1f} | {e32['single_p50_ms']/e8['single_p50_ms']:.2f}× |")
    print(f"| MiniLM smallest cosine to sentence-transformers over the 66 golden sentences | int8 {e8['golden_min_cosine']:.4f}, fp32 {e32['golden_min_cosine']:.4f} | ONNX Runtime int8 {ort.get('int8_min_cosine', float('nan')):.3f} (to its fp32) | — |")
generate_rows(kv("llama.txt"), kv("edge-generate.txt", "edgenode generate"), "SmolLM2-135M Q4_1")
bw = kv("bandwidth.txt").get("read_gb_per_s")
generate_rows(kv("llama-q4_k_m.txt"), kv("edge-q4_k_m.txt", "edgenode generate"), "TinyLlama-shaped Q4_K_M", bw)
generate_rows(kv("llama-q8_0.txt"), kv("edge-q8_0.txt", "edgenode generate"), "TinyLlama-shaped Q8_0", bw)
embed_rows(kv("st-bge.txt"), kv("edge-bge.txt", "edgenode embed"), "bge-small-shaped", kv("ort-bge.txt"))
js = kv("edge-generate.txt", "edgenode structured")
if js:
    print(f"| SmolLM2-135M Q4_1 decode held to a JSON schema (`response_format`), tokens/s | {js['json_schema_decode_tok_per_s']:.1f} | "
          f"edgenode unconstrained {js['decode_tok_per_s']:.1f} | {js['json_schema_decode_tok_per_s']/js['decode_tok_per_s']:.2f}× |")
    print(f"| the same, top-p sampling (the grammar's mask every step), tokens/s | {js['top_p_json_schema_decode_tok_per_s']:.1f} | "
          f"edgenode unconstrained {js['top_p_decode_tok_per_s']:.1f} | {js['top_p_json_schema_decode_tok_per_s']/js['top_p_decode_tok_per_s']:.2f}× |")
c = kv("edge-cache.txt", "edgenode cache")
if c:
    print(f"| response cache hit, chat, p50 / p99 over HTTP, ms | {c['hit_p50_ms']:.2f} / {c['hit_p99_ms']:.2f} | target p50 ≤ 1 ms | — |")
    print(f"| response cache hit, embeddings, p50 / p99 over HTTP, ms | {c['embed_hit_p50_ms']:.2f} / {c['embed_hit_p99_ms']:.2f} | — | — |")
    print(f"| SmolLM2 chat, half the requests repeated, 4 clients, requests/s | {c['repeat50_req_per_s']:.2f} ({c['repeat50_hits']:.0f} hits of 64) | "
          f"edgenode without the cache {c['repeat50_no_cache_req_per_s']:.2f} | {c['repeat50_gain']:.2f}× |")
for name, label in [("edge-embed.txt", "MiniLM fp32 and int8 and SmolLM2, embed run"), ("edge-generate.txt", "both default models, generate run"),
                    ("edge-q4_k_m.txt", "TinyLlama-shaped Q4_K_M and MiniLM")]:
    mem = kv(name, "edgenode memory")
    if mem:
        print(f"| peak RSS of the daemon ({label}, under this benchmark), MiB | {mem['peak_rss_mb']:.0f} | — | — |")
PY
