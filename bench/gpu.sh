#!/usr/bin/env bash
# Issue 29's GPU checks in one prepared script, under 8 minutes on one H100: the card, the CUDA tests
# (the recorder on the GPU, float16 with a GradScaler, bfloat16 autocast), then the HuggingFace rows
# of bench_recorder.py (BERT and GPT-2, 4 layers, hidden 256, 128 tokens; plain, recorder, Opacus)
# in float32 and under bfloat16 autocast. Run from the repository root: bash bench/gpu.sh
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -m pytest -m cuda -q -p no:cacheprovider tests/test_recorder.py tests/test_recorder_training.py
for precision in "" "--autocast"; do
  python bench/bench_recorder.py --device cuda --models bert,gpt2 --batches 32,128 --steps 10 --rounds 3 \
    --routes plain,recorder,opacus $precision
done
