#!/usr/bin/env bash
# A full tracked training. On a GPU: the real-model settings of the PeRL tracking docs (the model must
# be in the local Hugging Face cache). On a CPU: the embedded countdown-nano model with the demo settings.
# Usage: bash scripts/test_tracking.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/test_tracking}
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "GPU found: DeepSeek-R1-Distill-Qwen-1.5B, LoRA r=16, tracking every 100 steps -> $OUT"
  exec accelerate launch run.py \
    --enable_tracking --tracking_frequency 100 \
    --config.model.model_name_or_path deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B \
    --config.model.attn_implementation flash_attention_2 \
    --config.dataset.dataset_name_or_path Jiayi-Pan/Countdown-Tasks-3to4 \
    --config.peft.type lora --config.peft.r 16 --config.peft.lora_alpha 32 \
    --config.training.learning_rate 1e-5 --config.training.max_completion_length 1024 \
    --config.training.max_steps 1000 \
    --config.training.output_dir "$OUT" --overwrite_output_dir
else
  echo "No GPU: the embedded countdown-nano model with the demo settings -> $OUT"
  exec "$PY" run.py --enable_tracking --tracking_frequency 10 \
    --config.training.output_dir "$OUT" --overwrite_output_dir
fi
