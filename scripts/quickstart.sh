#!/usr/bin/env bash
# Set up (if needed) and train the quickstart: a tiny Llama learning integer addition with DFT.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lightning-tokens fit --config configs/quickstart.yaml "$@"
