#!/usr/bin/env bash
# Runs edgenode's whole test suite: the README's test command.
#
# On a fresh machine with Rust and Python's pip it installs what the tests need into a
# virtual environment of its own (the `openai` package, `jsonschema` and LangChain's
# `langchain-openai`, which drive the daemon in the client tests; numpy and gguf, with
# which scripts/standins.py writes the TinyLlama- and bge-shaped stand-ins;
# sentence-transformers, with PyTorch and transformers, for the GPU check's dry run, which
# computes its reference vectors and decode baseline on the CPU; Hugging Face's own
# `huggingface_hub` client, which tests/hub.rs runs against the hub-shaped test server;
# and, in a second environment, huggingface_hub 1.x with LangChain's `langchain-huggingface`
# (which needs huggingface_hub below 2, while transformers needs 2), which tests/tgi.rs
# drives the daemon with; NVRTC from the
# nvidia-cuda-nvrtc-cu12 wheel, which compiles our CUDA kernels without a GPU), installs
# Debian's chromium and prometheus packages where it can (a real browser loads /dashboard,
# a real Prometheus scrapes /metrics and evaluates the Grafana dashboard's queries; those
# tests say so and skip where neither can be installed) and its redis-server (the fleet
# store tests/fleet.rs shares between three nodes), checks
# style (rustfmt, clippy), fetches and verifies the default models, then runs every test in
# release mode (candle in debug is too slow to test with).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgenode-target}"
venv="${EDGENODE_TEST_VENV:-$HOME/.cache/edgenode/test-venv}"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "openai>=1.40,<3" "jsonschema>=4.20,<5" "langchain-openai>=0.3,<2" \
    "nvidia-cuda-nvrtc-cu12>=12.4,<13" "numpy>=1.26,<3" "gguf==0.19.0" \
    "sentence-transformers>=5,<7" "huggingface_hub>=1,<3"
nvrtc_lib="$("$venv/bin/python" - <<'PY'
import glob, os, nvidia
for base in nvidia.__path__:
    hits = glob.glob(os.path.join(base, "cuda_nvrtc", "lib", "libnvrtc.so*"))
    if hits:
        print(os.path.dirname(hits[0]))
        break
PY
)"
export LD_LIBRARY_PATH="${nvrtc_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Hugging Face's inference clients, in their own environment (see above).
hf_venv="${EDGENODE_HF_CLIENTS_VENV:-$HOME/.cache/edgenode/hf-clients-venv}"
if [ ! -x "$hf_venv/bin/python" ]; then
    python3 -m venv "$hf_venv"
fi
"$hf_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "huggingface_hub>=1,<2" "langchain-huggingface>=1,<2" "jsonschema>=4.20,<5" "numpy>=1.26,<3"
export HF_CLIENTS_PYTHON="$hf_venv/bin/python"
export OPENAI_CLIENT_PYTHON="$venv/bin/python"
export TEST_PYTHON="$venv/bin/python"

# A real browser and a real Prometheus for tests/dashboard.rs, and a real Redis for
# tests/fleet.rs, from Debian's packages.
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo -n"
if ! command -v chromium >/dev/null || ! command -v promtool >/dev/null; then
    if command -v apt-get >/dev/null && $sudo_cmd true 2>/dev/null; then
        $sudo_cmd apt-get install -y -q chromium prometheus >/dev/null ||
            echo "test set-up: could not install chromium and prometheus; tests/dashboard.rs will skip those checks"
    else
        echo "test set-up: no apt-get (or no root): tests/dashboard.rs will skip its browser and Prometheus checks"
    fi
fi
# The fleet tests need Redis itself (they fail without it: the fleet store is not optional there).
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    if command -v apt-get >/dev/null && $sudo_cmd true 2>/dev/null; then
        $sudo_cmd apt-get install -y -q redis-server >/dev/null || echo "test set-up: could not install redis-server; tests/fleet.rs will fail"
    else
        echo "test set-up: no apt-get (or no root): install redis-server (6.2 or newer) for tests/fleet.rs"
    fi
fi

# Style first: it is the cheapest check. rustfmt.toml is the code base's style; clippy's
# lints are errors (a lint allowed in the code says why, beside it).
cargo fmt --check
cargo clippy --release --all-targets -- -D warnings

# The deployment files: hadolint and shellcheck (the fly.toml checks are tests/deploy.rs).
./scripts/lint-deploy.sh

cargo build --release --bins --tests
"$CARGO_TARGET_DIR/release/edgenode" models fetch
cargo test --release "$@"
