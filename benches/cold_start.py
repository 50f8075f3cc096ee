#!/usr/bin/env python3
"""Cold-start benchmark: start the real daemon N times and measure, per start,

  process start -> /readyz 200 -> first /embed answer -> first generated token,

then the 10th /embed and the 10th time-to-first-token after ready, to show the warm-up did
its job (the first request after ready should be no slower than the tenth). Prints the
median of N runs as key=value lines and a small table.

Usage: benches/cold_start.py [--runs 5] [--binary PATH] [--config FILE]
Only the standard library; talks to 127.0.0.1 only. The models must be in the store
(`edgenode models fetch`), so this measures booting, not downloading.
"""

import argparse
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def first_token_s(base):
    """Seconds from sending a streaming /generate to its first text event."""
    body = {"prompt": "The capital of France is", "stream": True, "max_tokens": 8, "temperature": 0}
    req = urllib.request.Request(base + "/generate", data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data: ") and b'"text"' in line and b'"text":""' not in line:
                return time.perf_counter() - t0
    raise RuntimeError("no token arrived")


def embed_s(base, text):
    t0 = time.perf_counter()
    post(base + "/embed", {"inputs": text})
    return time.perf_counter() - t0


def one_start(binary, config):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, EDGENODE_LOG__LEVEL="warn")
    cmd = [binary, "serve", "--addr", f"127.0.0.1:{port}"]
    if config:
        cmd[1:1] = ["--config", config]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if proc.poll() is not None:
                raise RuntimeError("the daemon exited during boot")
            if time.perf_counter() - t0 > 300:
                raise RuntimeError("not ready after 300 s")
            time.sleep(0.01)
        ready = time.perf_counter() - t0
        first_embed = embed_s(base, "the first request after ready")
        first_token = first_token_s(base)
        for i in range(8):
            embed_s(base, f"request number {i + 2}")
            first_token_s(base)
        tenth_embed = embed_s(base, "the tenth request after ready")
        tenth_token = first_token_s(base)
        return {
            "ready_s": ready,
            "first_embed_ms": first_embed * 1000,
            "tenth_embed_ms": tenth_embed * 1000,
            "first_token_ms": first_token * 1000,
            "tenth_token_ms": tenth_token * 1000,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/edgenode-target"))
    ap.add_argument("--binary", default=os.path.join(target, "release", "edgenode"))
    ap.add_argument("--config", default=None, help="config file (default: the repository's edgenode.toml)")
    args = ap.parse_args()
    runs = []
    for i in range(args.runs):
        r = one_start(args.binary, args.config)
        runs.append(r)
        print(f"run {i + 1}: " + " ".join(f"{k}={v:.2f}" for k, v in r.items()), file=sys.stderr)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    for k, v in med.items():
        print(f"cold_start_{k}={v:.3f}")
    print(f"date={time.strftime('%Y-%m-%d')} runs={args.runs}")
    print()
    print("| median of %d starts | value |" % args.runs)
    print("|---|---|")
    print(f"| process start -> /readyz 200 | {med['ready_s']:.2f} s |")
    print(f"| first /embed after ready | {med['first_embed_ms']:.1f} ms (10th: {med['tenth_embed_ms']:.1f} ms) |")
    print(f"| first token after ready | {med['first_token_ms']:.1f} ms (10th: {med['tenth_token_ms']:.1f} ms) |")


if __name__ == "__main__":
    main()
