#!/usr/bin/env python3
"""What TGI's dialect costs beside our own: the same greedy generation asked for as
`/generate {"prompt"}` and as TGI's `/generate {"inputs"}`, plain and with `details` and
`top_n_tokens` (every token's log-probability and its alternatives), on one node.

    benches/tgi_overhead.py EDGENODE_BIN [--tokens 64] [--reps 5]

Starts EDGENODE_BIN serve with the repository's edgenode.toml (the default models) on a
free port, checks that the three requests generate the same text, and prints the best of
`--reps` for each, with the ratio to ours. Standard library only.
"""

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        answer = json.loads(r.read())
    return time.perf_counter() - started, answer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = subprocess.Popen([args.binary, "serve", "--addr", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        n = args.tokens
        cases = {
            "ours: /generate prompt": ("/generate", {"prompt": PROMPT, "max_tokens": n, "temperature": 0}),
            "TGI: /generate inputs": ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": n}}),
            "TGI: details, top_n_tokens 5": ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": n, "details": True, "top_n_tokens": 5}}),
        }
        texts = {name: post(base, path, body)[1] for name, (path, body) in cases.items()}
        texts = {name: a.get("text", a.get("generated_text")) for name, a in texts.items()}
        assert len(set(texts.values())) == 1, texts
        best = {}
        for _ in range(args.reps):
            for name, (path, body) in cases.items():
                best[name] = min(best.get(name, float("inf")), post(base, path, body)[0])
        ours = best["ours: /generate prompt"]
        for name, seconds in best.items():
            print(f"{name}: {seconds * 1000:.0f} ms for {n} tokens, {seconds / ours:.2f}x ours")
    finally:
        node.terminate()
        node.wait()


if __name__ == "__main__":
    sys.exit(main())
