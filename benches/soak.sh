#!/usr/bin/env bash
# A soak: the default models behind one node, with a second edgenode as its cloud tier,
# under mixed embed / classify / generate / routed (`model: "auto"`) traffic at a share of
# measured capacity, for a long time. It reports per interval the requests, 5xx, p50/p99
# and the node's resident memory, then a verdict: RSS flat within 5% after warm-up, no 5xx,
# p99 stable (the worst interval within 2x the median interval's p99).
#
#   benches/soak.sh [DURATION_S=1800] [SHARE=0.7] [INTERVAL_S=60]
#
# Capacity is measured first: 16 closed-loop clients for 60 s on the same mix. The soak
# then runs open loop at SHARE of that rate. Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgenode-target}"
duration="${1:-1800}"
share="${2:-0.7}"
interval="${3:-60}"
warmup="${SOAK_WARMUP_S:-300}"
capacity_s="${SOAK_CAPACITY_S:-60}"
mix="embed=60,classify=10,generate=15,route=15"
out="$(mktemp -d)"
cargo build --release --bins --bench load -q
"$CARGO_TARGET_DIR/release/edgenode" models fetch >/dev/null
# Copies, so a build during the soak cannot replace what runs.
cp "$CARGO_TARGET_DIR/release/edgenode" "$out/edgenode"
load_bin="$(cargo bench -q --bench load --no-run --message-format=json 2>/dev/null | grep '"name":"load"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)"
cp "$load_bin" "$out/load"
bin="$out/edgenode"
load() { "$out/load" "$@"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cloud_port="$(free_port)"; edge_port="$(free_port)"
cat > "$out/cloud.toml" <<EOF
[[models]]
name = "smollm2"
kind = "generate"
EOF
cat > "$out/edge.toml" <<EOF
[upstream]
base_url = "http://127.0.0.1:$cloud_port/v1"
model = "smollm2"
EOF
"$bin" serve --config "$out/cloud.toml" --addr "127.0.0.1:$cloud_port" 2>"$out/cloud.log" &
cloud_pid=$!
# The edge node merges edge.toml over the defaults: minilm, router, smollm2.
"$bin" serve --config "$out/edge.toml" --addr "127.0.0.1:$edge_port" 2>"$out/edge.log" &
edge_pid=$!
trap 'kill $cloud_pid $edge_pid 2>/dev/null || true' EXIT
for port in "$cloud_port" "$edge_port"; do
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 0.5
  done
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { echo "node on $port never became ready"; tail -20 "$out"/*.log; exit 1; }
done
url="http://127.0.0.1:$edge_port"

echo "soak: measuring capacity (16 closed-loop clients, $capacity_s s, mix $mix)"
load --url "$url" --concurrency 16 --duration "$capacity_s" --mix "$mix" | tee "$out/capacity.txt"
capacity="$(sed -n 's/.*requests in .* s (\([0-9.]*\)\/s).*/\1/p' "$out/capacity.txt")"
rate="$(python3 -c "print(round($capacity * $share, 2))")"
echo "soak: capacity $capacity req/s; soaking at $rate req/s ($share) for $duration s, reporting every $interval s"

load --url "$url" --rate "$rate" --duration "$duration" --interval "$interval" --pid "$edge_pid" --mix "$mix" | tee "$out/soak.txt"
kill -0 "$edge_pid" || { echo "the edge node died"; exit 1; }
curl -s "$url/stats" > "$out/stats.json"

python3 - "$out/soak.txt" "$warmup" "$capacity" "$rate" <<'PY'
import json, statistics, sys
path, warmup, capacity, rate = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
rows = [json.loads(l.split(" ", 1)[1]) for l in open(path) if l.startswith("interval ")]
after = [r for r in rows if r["t_s"] > warmup] or rows
rss = [r["rss_mib"] for r in after if r["rss_mib"]]
p99 = [r["p99_ms"] for r in after]
fivexx = sum(r["status_5xx"] for r in rows)
not200 = sum(r["not_200"] for r in rows)
spread = (max(rss) - min(rss)) / min(rss) * 100 if rss else float("nan")
worst = max(p99) / statistics.median(p99) if p99 else float("nan")
print(f"soak summary: {len(rows)} intervals, {sum(r['requests'] for r in rows)} requests at {rate}/s (capacity {capacity}/s)")
print(f"  RSS after {warmup:.0f} s warm-up: {min(rss):.1f}-{max(rss):.1f} MiB, spread {spread:.1f}% (limit 5%)")
print(f"  5xx: {fivexx}; other non-200: {not200 - fivexx}")
print(f"  p99 per interval after warm-up: median {statistics.median(p99):.1f} ms, worst {max(p99):.1f} ms ({worst:.2f}x the median; limit 2x)")
ok = spread <= 5 and fivexx == 0 and worst <= 2
print("  verdict:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
echo "soak: logs and figures in $out"
