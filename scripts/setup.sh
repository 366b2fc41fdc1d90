#!/usr/bin/env bash
# Create .venv (if needed) and install lightning-tokens with the pinned versions of constraints.txt.
# Idempotent: a stamp records what was installed, so a second run returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
stamp="$VENV/.lightning-tokens-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, from the exact pinned pair (never an unpinned multi-GB CUDA build)
"$VENV/bin/python" -m pip install -q -c constraints.txt torch torchvision
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
echo "$want" > "$stamp"
