#!/usr/bin/env bash
# Fuzzes the request decoders and the validation layer (src/http/fuzz.rs) for a fixed budget.
#
#   scripts/fuzz.sh            # 200,000 cases per property (about 20 s here)
#   CASES=2000000 scripts/fuzz.sh
#
# A failing input is shrunk and saved under proptest-regressions/; commit that file so every
# later test run replays it first.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgenode-target}"
cases="${CASES:-200000}"
started=$(date +%s)
PROPTEST_CASES="$cases" cargo test --release --lib http::fuzz -- --test-threads 2
echo "fuzz: ${cases} cases per property in $(( $(date +%s) - started )) s"
