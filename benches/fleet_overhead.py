#!/usr/bin/env python3
"""What the fleet store costs a keyed request: p50 and p99 over HTTP of the same keyed
`/embed` (a key with requests_per_minute, tokens_per_minute and daily_budget_usd, so every
limit is checked) on a node without `[fleet] store`, on one sharing a real Redis, and on one
whose leases are 50 requests (so one request in 50 makes the round trip to Redis itself).

    benches/fleet_overhead.py EDGENODE_BIN [--requests 3000] [--rounds 12]

Starts redis-server (Debian's package); then, round after round, each node in turn (one at a
time, each round in another order, a fresh state dir each), warms it and times sequential
requests on one kept-alive connection. Prints pooled p50/p99 per node and the median of the
per-round p50 differences to the no-store node (rounds are adjacent in time, so the host's
drift cancels). Standard library only.
"""

import argparse
import http.client
import json
import os
import socket
import subprocess
import tempfile
import time

KEY = "sk-bench-fleet"
CONFIG = """
[[auth.keys]]
name = "bench"
key_env = "BENCH_KEY"
requests_per_minute = 1000000
tokens_per_minute = 100000000
daily_budget_usd = 1000000.0

[[models]]
name = "minilm"
kind = "embed"
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(port, path="/readyz"):
    for _ in range(600):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"port {port} never answered {path}")


def start(binary, config, env, tmp, name):
    port = free_port()
    path = os.path.join(tmp, f"{name}.toml")
    with open(path, "w") as f:
        f.write(config)
    store = os.path.join(os.getcwd(), "models")
    env = dict(os.environ, BENCH_KEY=KEY, EDGENODE_STATE__DIR=os.path.join(tmp, f"{name}-state"), EDGENODE_STORE__DIR=store, **env)
    proc = subprocess.Popen([binary, "serve", "--addr", f"127.0.0.1:{port}", "--config", path], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait(port)
    return proc, port


def timed(conn, body):
    started = time.perf_counter()
    conn.request("POST", "/embed", body=body, headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status
    return (time.perf_counter() - started) * 1000


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fleet-bench-")
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    store = f"redis://127.0.0.1:{redis_port}"
    configs = {
        "no store": {},
        "fleet store (Redis)": {"EDGENODE_FLEET__STORE": store},
        # Leases of 50 requests (0.005% of the limit): one request in 50 makes the round trip.
        "the same, 50-request leases": {"EDGENODE_FLEET__STORE": store, "EDGENODE_FLEET__NAMESPACE": "small", "EDGENODE_FLEET__LEASE_SHARE": "0.00005"},
    }
    body = json.dumps({"inputs": "how far is the nearest edge region"})
    samples = {name: [] for name in configs}
    round_p50 = {name: [] for name in configs}
    calls = {}
    per_round = max(1, args.requests // args.rounds)
    names = list(configs)
    try:
        # One node at a time (two processes on two cores disturb each other, the first started
        # the most), each round in another order, each node on a fresh state of its own.
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                proc, port = start(args.binary, CONFIG, configs[name], tmp, f"{name[:5].strip()}-{r}")
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port)
                    for _ in range(200):
                        timed(conn, body)
                    xs = [timed(conn, body) for _ in range(per_round)]
                    samples[name].extend(xs)
                    round_p50[name].append(pct(xs, 0.5))
                    if configs[name]:
                        conn.request("GET", "/stats", headers={"Authorization": f"Bearer {KEY}"})
                        f = json.loads(conn.getresponse().read())["fleet"]
                        calls[name] = calls.get(name, 0) + f["syncs"]
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
        print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores; keyed POST /embed, one connection, {per_round * args.rounds} requests per node in {args.rounds} rounds")
        base = None
        for name, xs in samples.items():
            p50, p99 = pct(xs, 0.5), pct(xs, 0.99)
            # Paired: each round's p50 against the no-store node's in the same round (the host's
            # speed drifts between rounds), the median of those differences.
            paired = sorted(a - b for a, b in zip(round_p50[name], round_p50[names[0]]))
            diff = "" if base is None else f"   ({p50 - base[0]:+.3f} ms p50, {p99 - base[1]:+.3f} ms p99; paired p50 difference {paired[len(paired) // 2]:+.3f} ms)"
            base = base or (p50, p99)
            print(f"  {name:28s} p50 {p50:.3f} ms   p99 {p99:.3f} ms{diff}")
        for name, n in calls.items():
            print(f"  calls to Redis by '{name}' (syncs and refills, warm-up included): {n}")
    finally:
        redis.terminate()
        redis.wait(timeout=30)


if __name__ == "__main__":
    main()
