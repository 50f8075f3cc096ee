#!/usr/bin/env python3
"""The GPU check's steps, run by scripts/gpu-check.sh (which unpacks the bundle and sets up
the environment first; run that, not this).

On the GPU machine (no network, no Rust; PyTorch, transformers and sentence-transformers are
there) it makes the card models' stand-ins, starts the bundled daemon on `cuda`, and checks,
in order of value, each step timed and skipped cleanly when the budget runs short:

  kernels      `edgenode kernels verify`: our CUDA pooling/normalize kernels against their
               Rust twins on the GPU
  standins     bge-small- and bge-base-shaped folders, the TinyLlama-shaped GGUF (22 layers;
               F16, Q8_0 and llama.cpp's Q4_K_M mix) by scripts/standins.py (numpy and gguf)
  golden       sentence-transformers' vectors for the bge stand-ins, on the GPU (fp32)
  daemon       the bundled binary serving every stand-in, ready within its timeout
  device       /info says cuda:0 for the node and every model, and which engine decodes
  embed        the daemon's /embed against sentence-transformers: cosine >= 0.99 when the
               encoder runs in fp16 (it does on a GPU), >= 0.999 in fp32
  decode-*     TinyLlama-shaped decode on the daemon (mistral.rs on a GPU): time to first
               token, one stream's and eight streams' tokens/s, beside PyTorch/transformers'
               own `generate` on the same shapes (random weights, fp16, greedy)
  throughput   embed throughput at batch 32 and 256 beside sentence-transformers (fp16)

With --dry-run the same steps run on the CPU (the test environment's CPU PyTorch, the daemon
on `cpu`, two layers instead of 12/22, fewer tokens): everything but the CUDA parts is proven
before a GPU is reached. The kernels step then only checks that a CPU build refuses cleanly.

The table is rewritten after every step as check.json and check.md in OUT_DIR, so a run cut
short still leaves what it measured.
"""
import argparse
import concurrent.futures
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = os.path.join(ROOT, "tests", "fixtures", "public_sentences.txt")
STANDINS = os.path.join(ROOT, "scripts", "standins.py")
# The TinyLlama stand-in's file types and the names they are served under.
MIXES = {"f16": "tinyllama-f16", "q8_0": "tinyllama-q8", "q4_k_m": "tinyllama-q4"}


class Skip(Exception):
    """A step that cannot run here (not a failure)."""


class Check:
    """The budget, the rows, and the table files."""

    def __init__(self, out, budget, dry_run, build):
        self.out, self.budget, self.dry_run, self.build = out, budget, dry_run, build
        self.t0 = time.monotonic()
        self.rows, self.bench, self.facts = [], [], {}
        os.makedirs(out, exist_ok=True)

    def left(self):
        return self.budget - (time.monotonic() - self.t0)

    def step(self, name, needs_s, fn):
        """Runs fn() if about needs_s seconds are left; records PASS/FAIL/SKIPPED."""
        if self.left() < needs_s:
            self.record(name, "SKIPPED", 0, f"needs about {needs_s}s, {self.left():.0f}s of the budget left")
            return None
        t = time.monotonic()
        print(f"\n--- {name} ({self.left():.0f}s left)", flush=True)
        try:
            detail = fn() or ""
            result = "PASS"
        except Skip as e:
            detail, result = str(e), "SKIPPED"
        except Exception as e:  # noqa: BLE001 - every failure becomes a row, the run goes on
            detail, result = f"{type(e).__name__}: {e}", "FAIL"
        self.record(name, result, time.monotonic() - t, detail)
        return result

    def record(self, name, result, seconds, detail):
        detail = " ".join(str(detail).split())[:400]
        self.rows.append({"step": name, "result": result, "seconds": round(seconds, 1), "detail": detail})
        print(f"=== {name}: {result} ({seconds:.1f}s) {detail}", flush=True)
        self.write()

    def measure(self, workload, unit, ours, baseline_name, baseline, higher_is_better=True):
        """One benchmark row: our figure beside the baseline's, and their ratio."""
        ratio = None
        if ours and baseline:
            ratio = ours / baseline if higher_is_better else baseline / ours
        self.bench.append({
            "workload": workload, "unit": unit, "edgenode": round(ours, 2) if ours else None,
            "baseline": baseline_name, "baseline_value": round(baseline, 2) if baseline else None,
            "ratio": round(ratio, 2) if ratio else None,
        })
        self.write()

    def write(self):
        doc = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dry_run": self.dry_run, "budget_s": self.budget,
            "elapsed_s": round(time.monotonic() - self.t0, 1),
            "build": self.build, "facts": self.facts, "steps": self.rows, "benchmarks": self.bench,
        }
        with open(os.path.join(self.out, "check.json"), "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        lines = [f"## edgenode GPU check{' (dry run, CPU)' if self.dry_run else ''} — {doc['date']}", ""]
        for k, v in self.facts.items():
            lines.append(f"- {k}: {v}")
        lines += ["", f"total {doc['elapsed_s']}s of {self.budget}s", "", "| step | result | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['result']} | {r['seconds']} | {r['detail'].replace('|', '/')} |" for r in self.rows]
        if self.bench:
            lines += ["", "ratio: how many times better edgenode is (baseline time over ours, or our rate over the baseline's)", "",
                      "| workload | edgenode | baseline | ratio |", "|---|---|---|---|"]
            for b in self.bench:
                ours = f"{b['edgenode']} {b['unit']}" if b["edgenode"] is not None else "—"
                base = f"{b['baseline']}: {b['baseline_value']} {b['unit']}" if b["baseline_value"] is not None else f"{b['baseline']}: —"
                ratio = f"{b['ratio']}×" if b["ratio"] is not None else "—"
                lines.append(f"| {b['workload']} | {ours} | {base} | {ratio} |")
        with open(os.path.join(self.out, "check.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------
# HTTP to the daemon (stdlib only: the GPU machine has no requests of ours to rely on).


def http(method, url, body=None, timeout=120):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def stream_completion(base, model, prompt, max_tokens):
    """One streamed /v1/completions: (seconds to the first token, seconds to the last, tokens)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                now = time.perf_counter() - t0
                first = now if first is None else first
                last = now
    if first is None:
        raise AssertionError(f"{model}: the stream carried no text")
    return first, last, tokens


def daemon_env(**extra):
    """The environment for the binary: the daemon reads every EDGENODE_* variable as a config
    key and refuses unknown ones, so the scripts' own knobs are left out."""
    knobs = ("EDGENODE_BIN", "EDGENODE_GPU_", "EDGENODE_CUDA_", "EDGENODE_TEST_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(knobs)}
    env.update(extra)
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cosine(a, b):
    import numpy as np
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@functools.lru_cache(maxsize=None)
def _sentence_lines():
    with open(SENTENCES) as f:
        return tuple(line.strip() for line in f if line.strip())


def sentences(n):
    lines = _sentence_lines()
    return [lines[i % len(lines)] for i in range(n)]


# ----------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--bin", required=True, help="the edgenode binary (unpacked from the bundle)")
    ap.add_argument("--bundle", required=True, help="the unpacked bundle (vocab/, tokenizer/, BUILD)")
    ap.add_argument("--work", required=True, help="scratch folder for the stand-ins")
    ap.add_argument("--budget", type=float, default=540)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()

    build = open(os.path.join(a.bundle, "BUILD")).read().strip() if os.path.exists(os.path.join(a.bundle, "BUILD")) else ""
    c = Check(a.out, a.budget, a.dry_run, build)
    dry = a.dry_run
    # Shapes: the card's own on the GPU; two layers in the dry run (same widths and vocabularies).
    bge_layers, llama_layers = (2, 2) if dry else (12, 22)
    decode_tokens, streams = (16, 8) if dry else (128, 8)
    batches = (32, 64) if dry else (32, 256)
    device = "cpu" if dry else "cuda"

    import torch
    c.facts["python"] = sys.version.split()[0]
    c.facts["torch"] = torch.__version__
    if not dry:
        if not torch.cuda.is_available():
            c.record("preflight", "FAIL", 0, "PyTorch sees no CUDA device")
            return 1
        c.facts["gpu"] = torch.cuda.get_device_name(0)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
            c.facts["driver, memory"] = smi
        except (OSError, subprocess.SubprocessError):
            pass
    c.facts["shapes"] = f"bge {bge_layers} layers, TinyLlama {llama_layers} layers"

    # --- kernels: cheap and the one thing nothing else covers.
    def kernels():
        r = subprocess.run([a.bin, "kernels", "verify", "--device", "cuda:0"], capture_output=True, text=True, timeout=120, env=daemon_env())
        tail = (r.stdout.strip().splitlines() or [""])[-1]
        if dry:
            if r.returncode != 2 or "without CUDA" not in r.stderr:
                raise AssertionError(f"a CPU build should refuse with exit 2; got {r.returncode}: {r.stderr.strip()}")
            raise Skip("dry run: the CPU build refuses cleanly (exit 2); " + r.stderr.strip())
        if r.returncode != 0:
            raise AssertionError(f"exit {r.returncode}: {tail or r.stderr.strip()[-300:]}")
        return tail

    c.step("kernels", 10, kernels)

    # --- stand-ins: bge now, TinyLlama in the background while the baselines use the GPU.
    std = os.path.join(a.work, "standins")
    tokenizer = os.path.join(a.bundle, "tokenizer", "tokenizer.json")
    vocab = os.path.join(a.bundle, "vocab", "ggml-vocab-llama-spm.gguf")
    bge_dirs = {s: os.path.join(std, f"bge-{s}") for s in ("small", "base")}

    def bge_standins():
        for shape, d in bge_dirs.items():
            subprocess.run([sys.executable, STANDINS, "bge", d, "--tokenizer", tokenizer, "--shape", shape,
                            "--layers", str(bge_layers), "--seed", "1"], check=True, capture_output=True, text=True)
        return ", ".join(f"bge-{s}" for s in bge_dirs)

    c.step("standins-bge", 30, bge_standins)
    llama_dir = os.path.join(std, "tinyllama")
    llama_log = open(os.path.join(a.work, "standins-tinyllama.log"), "w")
    llama_t0 = time.monotonic()
    # One process per file type (the same seeded weights in each): numpy is single-threaded,
    # and this is the longest step of the run.
    llama_procs = [subprocess.Popen([sys.executable, STANDINS, "tinyllama", llama_dir, "--vocab", vocab, "--layers", str(llama_layers),
                                     "--types", mix, "--seed", "1"], stdout=llama_log, stderr=subprocess.STDOUT) for mix in MIXES]

    # --- sentence-transformers on the device: the reference vectors and the embed baseline.
    golden = {}
    st_models = {}

    def reference():
        from sentence_transformers import SentenceTransformer
        texts = sentences(66)
        for shape, d in bge_dirs.items():
            m = SentenceTransformer(d, device=device)
            golden[shape] = m.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=False).tolist()
            st_models[shape] = m
        return f"{len(texts)} sentences × {len(golden)} models on {device} (fp32)"

    c.step("golden", 60, reference)

    def st_throughput(batch):
        m = st_models["small"]
        if not dry:
            m = m.half()
        texts = sentences(batch)
        m.encode(texts, batch_size=batch)  # warm
        best = 0.0
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            m.encode(texts, batch_size=batch, convert_to_numpy=True)
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, batch / (time.perf_counter() - t))
        if not dry:
            st_models["small"] = m.float()
        return best

    st_rates = {}

    def st_baseline():
        if "small" not in st_models:
            raise Skip("no sentence-transformers model (the golden step did not run)")
        for b in batches:
            st_rates[b] = st_throughput(b)
        return ", ".join(f"batch {b}: {r:.0f} sentences/s" for b, r in st_rates.items())

    c.step("baseline-embed", 40, st_baseline)

    # --- PyTorch/transformers' own generate on the TinyLlama shape (random weights).
    hf = {}

    def hf_baseline():
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=llama_layers,
                          num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                          rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
        dtype = torch.float32 if dry else torch.float16
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype).eval()
        prompt_len = 64

        def run(batch, new):
            ids = torch.randint(3, 32000, (batch, prompt_len), device=device)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=2)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t

        run(1, 4)  # warm: kernels, allocator
        ttft = min(run(1, 1) for _ in range(3))
        one = run(1, decode_tokens)
        many = run(streams, decode_tokens)
        hf["name"] = f"transformers {str(dtype).split('.')[-1]}"
        hf["ttft_ms"] = ttft * 1000
        hf["one"] = (decode_tokens - 1) / max(one - ttft, 1e-9)
        hf["many"] = streams * (decode_tokens - 1) / max(many - ttft, 1e-9)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        return (f"transformers {str(dtype).split('.')[-1]}, prompt {prompt_len}: ttft {hf['ttft_ms']:.1f} ms, 1 stream {hf['one']:.1f} tok/s, "
                f"{streams} streams {hf['many']:.1f} tok/s")

    c.step("baseline-decode", 60, hf_baseline)

    # --- wait for the TinyLlama files.
    def llama_standins():
        deadline = time.monotonic() + max(c.left() - 120, 10)
        for p in llama_procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                for q in llama_procs:
                    q.kill()
                raise AssertionError(f"not written within the budget (started {time.monotonic() - llama_t0:.0f}s ago)")
            if p.returncode != 0:
                raise AssertionError(f"standins.py exited {p.returncode}: " + open(llama_log.name).read()[-300:])
        files = sorted(f for f in os.listdir(llama_dir) if f.endswith(".gguf"))
        sizes = ", ".join(f"{f} {os.path.getsize(os.path.join(llama_dir, f)) / 2**20:.0f} MiB" for f in files)
        return f"{sizes} (written in {time.monotonic() - llama_t0:.0f}s, in the background)"

    llama_ok = c.step("standins-tinyllama", 15, llama_standins) == "PASS"

    # --- the daemon, serving every stand-in.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    daemon = {}
    log_path = os.path.join(a.out, "daemon.log")
    mix_file = {mix: f"tinyllama-1.1b-chat-standin-{llama_layers}l.{mix.upper()}.gguf" for mix in MIXES}
    generators = [MIXES[m] for m in MIXES] if llama_ok else []
    embedders = [f"bge-{s}" for s in bge_dirs if os.path.exists(os.path.join(bge_dirs[s], "model.safetensors"))]

    def start_daemon():
        if not embedders and not generators:
            raise Skip("no stand-ins to serve")
        manifest = ""

        def pin(name, kind, d, *files):
            r = subprocess.run([a.bin, "models", "pin", name, "--kind", kind, "--version", "0.0.1-standin", "--dir", d, *files],
                               capture_output=True, text=True, env=daemon_env())
            if r.returncode != 0:
                raise AssertionError(f"models pin {name}: exit {r.returncode}: {r.stderr.strip()}")
            return r.stdout

        for name in embedders:
            manifest += pin(name, "embed", bge_dirs[name.split("-")[1]])
        for mix, name in zip(mix_file, generators):
            manifest += pin(name, "generate", llama_dir, mix_file[mix])
        mpath = os.path.join(a.work, "manifest.toml")
        with open(mpath, "w") as f:
            f.write(manifest)
        config = f'[store]\ndir = {json.dumps(std)}\nmanifest = {json.dumps(mpath)}\n\n[runtime]\ndevice = "{device}"\n'
        for name in embedders:
            config += f'\n[[models]]\nname = "{name}"\nkind = "embed"\n'
        for name in generators:
            config += f'\n[[models]]\nname = "{name}"\nkind = "generate"\n'
        cpath = os.path.join(a.work, "edgenode.toml")
        with open(cpath, "w") as f:
            f.write(config)
        env = daemon_env(EDGENODE_CONFIG=cpath)
        log = open(log_path, "w")
        t = time.monotonic()
        daemon["proc"] = subprocess.Popen([a.bin, "serve", "--addr", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = t + min(240, max(c.left() - 30, 10))
        while time.monotonic() < deadline:
            if daemon["proc"].poll() is not None:
                raise AssertionError(f"the daemon exited {daemon['proc'].returncode}; see daemon.log: " + open(log_path).read()[-300:])
            try:
                status, _ = http("GET", base + "/readyz", timeout=5)
                if status == 200:
                    return f"ready in {time.monotonic() - t:.1f}s serving {', '.join(embedders + generators)}"
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not ready within {deadline - t:.0f}s; see daemon.log")

    up = c.step("daemon", 40, start_daemon) == "PASS"

    def check_device():
        _, info = http("GET", base + "/info")
        want = "cpu" if dry else "cuda:0"
        wrong = [f"{m['name']}: {m['device']}" for m in info["models"] if m["device"] != want]
        if info["device"] != want or wrong:
            raise AssertionError(f"node {info['device']}, models {wrong or 'all ' + want}; want {want}")
        engines = ", ".join(f"{m['name']} {m.get('details', {}).get('engine', '')}".strip() for m in info["models"])
        c.facts["served"] = engines
        return f"node and {len(info['models'])} models on {want}; {engines}"

    def embed_parity():
        if not golden:
            raise Skip("no reference vectors (the golden step did not run)")
        texts = sentences(66)
        floor = 0.999 if dry else 0.99
        worst = {}
        for shape in golden:
            name = f"bge-{shape}"
            status, got = http("POST", base + "/embed", {"model": name, "inputs": texts})
            if status != 200:
                raise AssertionError(f"{name}: /embed {status} {got}")
            worst[name] = min(cosine(g, w) for g, w in zip(got, golden[shape]))
        bad = {k: v for k, v in worst.items() if v < floor}
        detail = ", ".join(f"{k} min cosine {v:.5f}" for k, v in worst.items()) + f" (floor {floor}, encoder {'fp32' if dry else 'fp16'})"
        if bad:
            raise AssertionError(detail)
        return detail

    def decode():
        if not generators:
            raise Skip("no TinyLlama stand-in")
        prompt = " ".join(sentences(6))  # about 64 tokens with the Llama vocabulary
        out = []
        for name in generators:
            stream_completion(base, name, prompt, 4)  # warm
            runs = [stream_completion(base, name, prompt, decode_tokens) for _ in range(2)]
            ttft = min(r[0] for r in runs) * 1000
            one = max((r[2] - 1) / max(r[1] - r[0], 1e-9) for r in runs)
            t = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(streams) as pool:
                results = list(pool.map(lambda _: stream_completion(base, name, prompt, decode_tokens), range(streams)))
            wall = time.perf_counter() - t
            many = sum(r[2] for r in results) / wall
            kind = name.split("-")[1].upper()
            c.measure(f"{name} time to first token", "ms", ttft, hf.get("name", "transformers"), hf.get("ttft_ms"), higher_is_better=False)
            c.measure(f"{name} decode, 1 stream", "tok/s", one, hf.get("name", "transformers"), hf.get("one"))
            c.measure(f"{name} decode, {streams} streams", "tok/s", many, hf.get("name", "transformers"), hf.get("many"))
            out.append(f"{kind}: ttft {ttft:.1f} ms, 1 stream {one:.1f} tok/s, {streams} streams {many:.1f} tok/s")
        return "; ".join(out)

    def throughput():
        out = []
        for b in batches:
            texts = sentences(b)
            http("POST", base + "/embed", {"model": "bge-small", "inputs": texts})
            rates = []
            for _ in range(5):
                t = time.perf_counter()
                status, got = http("POST", base + "/embed", {"model": "bge-small", "inputs": texts})
                if status != 200:
                    raise AssertionError(f"/embed batch {b}: {status} {got}")
                rates.append(b / (time.perf_counter() - t))
            ours = max(rates)
            c.measure(f"bge-small embed, batch {b}", "sentences/s", ours, "sentence-transformers fp16" if not dry else "sentence-transformers fp32",
                      st_rates.get(b))
            out.append(f"batch {b}: {ours:.0f} sentences/s (median {statistics.median(rates):.0f})")
        return ", ".join(out)

    if up:
        c.step("device", 5, check_device)
        c.step("embed", 20, embed_parity)
        c.step("decode", 60 if not dry else 30, decode)
        c.step("throughput", 20, throughput)
    else:
        for name in ("device", "embed", "decode", "throughput"):
            c.record(name, "SKIPPED", 0, "the daemon did not start")

    if "proc" in daemon:
        daemon["proc"].terminate()
        try:
            daemon["proc"].wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon["proc"].kill()
    for p in llama_procs:
        if p.poll() is None:
            p.kill()
    c.facts["elapsed"] = f"{time.monotonic() - c.t0:.0f}s"
    c.write()
    failed = [r["step"] for r in c.rows if r["result"] == "FAIL"]
    print(open(os.path.join(a.out, "check.md")).read())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
