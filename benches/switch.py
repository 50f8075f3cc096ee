#!/usr/bin/env python3
"""What a version switch costs (`sync.apply`): time from a manifest change to the switch,
request latency during it against before it, and the process's peak memory.

    benches/switch.py EDGENODE_BIN STANDINS_DIR [--seconds 20]

STANDINS_DIR holds the card's stand-ins at full size, two versions each (other seeds), as
`benches/compare.sh switch` writes them: `q4_k_m/` and `q4_k_m-seed2/` (22-layer
TinyLlama-1.1B-shaped Q4_K_M), `bge-small/` and `bge-small-seed2/` (12-layer bge-small
shape). The node serves version 1 of both, with `sync.apply` following a central manifest
file; one client embeds a sentence and another asks for 16-token chat answers, back to back,
for `--seconds` before the change and until a few seconds after the last switch. Prints one
line per figure. Standard library only.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def pin(binary, name, kind, version, folder):
    out = subprocess.run([binary, "models", "pin", name, "--kind", kind, "--version", version, "--dir", folder],
                         check=True, capture_output=True, text=True)
    return out.stdout


def request(url, body, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()
        label = r.headers.get("x-edgenode-model", "")
        status = r.status
    return status, label, time.perf_counter() - started


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("standins")
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    s = args.standins
    work = tempfile.mkdtemp(prefix="edgenode-switch-")
    v1 = pin(args.binary, "bge-small", "embed", "1", f"{s}/bge-small") + pin(args.binary, "tinyllama", "generate", "1", f"{s}/q4_k_m")
    v2 = pin(args.binary, "bge-small", "embed", "2", f"{s}/bge-small-seed2") + pin(args.binary, "tinyllama", "generate", "2", f"{s}/q4_k_m-seed2")
    local, central = os.path.join(work, "manifest.toml"), os.path.join(work, "central.toml")
    for path in (local, central):
        with open(path, "w") as f:
            f.write(v1)
    config = os.path.join(work, "edgenode.toml")
    with open(config, "w") as f:
        f.write(f'[store]\ndir = "{work}/store"\nmanifest = "{local}"\n\n'
                f'[sync]\nexpected_manifest = "{central}"\ninterval_s = 1\napply = true\n\n'
                '[[models]]\nname = "bge-small"\nkind = "embed"\n\n[[models]]\nname = "tinyllama"\nkind = "generate"\n')
    port = 18000 + os.getpid() % 1000
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([args.binary, "--config", config, "serve", "--addr", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while True:
            try:
                if get(f"{base}/readyz")["status"] == "ready":
                    break
            except Exception:
                pass
            if time.time() > deadline:
                sys.exit("the node never became ready")
            time.sleep(0.2)

        samples = []  # (start, kind, status, label, seconds)
        stop = threading.Event()
        peak = {"before": 0, "during": 0}
        phase = {"now": "before"}

        def client(kind):
            while not stop.is_set():
                t = time.time()
                try:
                    if kind == "embed":
                        st, label, secs = request(f"{base}/embed", {"model": "bge-small", "inputs": ["What is an edge node?"]})
                    else:
                        st, label, secs = request(f"{base}/v1/chat/completions", {
                            "model": "tinyllama", "max_tokens": 16, "temperature": 0,
                            "messages": [{"role": "user", "content": "Tell me about edge nodes."}]})
                except urllib.error.HTTPError as e:
                    st, label, secs = e.code, "", time.time() - t
                samples.append((t, kind, st, label, secs))

        def memory():
            while not stop.is_set():
                peak[phase["now"]] = max(peak[phase["now"]], rss_kib(proc.pid))
                time.sleep(0.05)

        threads = [threading.Thread(target=client, args=(k,)) for k in ("embed", "chat")] + [threading.Thread(target=memory)]
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        phase["now"] = "during"
        changed = time.time()
        with open(central + ".partial", "w") as f:
            f.write(v2)
        os.rename(central + ".partial", central)
        switched = {}
        while len(switched) < 2 and time.time() - changed < 600:
            info = get(f"{base}/info")
            for m in info["models"]:
                if m["version"] == "2" and m["name"] not in switched:
                    switched[m["name"]] = time.time() - changed
            time.sleep(0.05)
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join()
        end = changed + max(switched.values(), default=0) + 3
        print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
        print(f"cpu: {model}, {os.cpu_count()} cores")
        for name in ("bge-small", "tinyllama"):
            print(f"switch {name}: {switched.get(name, float('nan')):.2f} s from the manifest change (sync.interval_s = 1)")
        failures = [x for x in samples if x[2] != 200]
        print(f"requests: {len(samples)}, not 200: {len(failures)}")
        for kind in ("embed", "chat"):
            before = [x[4] * 1000 for x in samples if x[1] == kind and x[0] < changed]
            during = [x[4] * 1000 for x in samples if x[1] == kind and changed <= x[0] <= end]
            print(f"{kind} latency before: p50 {percentile(before, 50):.1f} ms, p99 {percentile(before, 99):.1f} ms ({len(before)} requests)")
            print(f"{kind} latency during: p50 {percentile(during, 50):.1f} ms, p99 {percentile(during, 99):.1f} ms ({len(during)} requests)")
        print(f"peak RSS before: {peak['before'] / 1024:.0f} MiB; during the switch: {peak['during'] / 1024:.0f} MiB")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
