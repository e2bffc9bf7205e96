#!/usr/bin/env bash
# Train both fidelity models on one GPU, one after the other, and pack them into $OUT.
#
#   OUT=/path/to/empty bash benchmarks/fidelity/device_train.sh [--minutes 3.4]
#
# Each model trains for --minutes (wall clock), then writes its folder (save_pretrained bf16
# safetensors, model_card.json, loss.png, example_inputs.safetensors, dense_samples.png,
# attention_recall.json). $OUT gets wan.tar, cogvideox.tar (each unpacks to <name>/) and
# train_log.txt. Whole run: about 2 x (minutes + 0.5) minutes.
set -euo pipefail
: "${OUT:?set OUT to an empty output folder}"
MINUTES=3.4
while [[ $# -gt 0 ]]; do
  case "$1" in
    --minutes) MINUTES="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
WORK="$(mktemp -d)"
LOG="$OUT/train_log.txt"
mkdir -p "$OUT"
{
  echo "== $(date -u +%FT%TZ) device_train.sh --minutes $MINUTES"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  "$PYTHON" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
} 2>&1 | tee -a "$LOG"
status=0
for model in wan cogvideox; do
  echo "== $(date -u +%FT%TZ) training $model" | tee -a "$LOG"
  if "$PYTHON" benchmarks/fidelity/train.py --model "$model" --minutes "$MINUTES" --out "$WORK" 2>&1 | tee -a "$LOG"; then
    tar -C "$WORK" -cf "$OUT/$model.tar" "$model"
  else
    echo "== $model FAILED" | tee -a "$LOG"
    status=1
  fi
done
ls -la "$OUT" | tee -a "$LOG"
exit $status
