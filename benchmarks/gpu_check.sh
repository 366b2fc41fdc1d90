#!/usr/bin/env bash
# GPU checks for the lent H100/H200 (see README "Benchmarks"): installs carried wheels (.whl/, e.g.
# liger-kernel), runs the CUDA-marked tests, then the token-loss benchmark. Writes logs to $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
[ -n "${SKIP_TESTS:-}" ] || python3 -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/cuda_tests.txt"
python3 benchmarks/token_loss.py --device cuda --preset "${PRESET:-llama-1.5b}" --vocab "${VOCAB:-128256}" \
  --batch "${BATCH:-8}" --seq "${SEQ:-4096}" --steps "${STEPS:-6}" --warmup 2 \
  --variants "${VARIANTS:-hf_loss,token_lm,dft,dft:torch}" --json "$OUT/token_loss.json" 2>&1 \
  | grep -v -i warn | tail -12 | tee "$OUT/token_loss.txt"
