#!/usr/bin/env bash
# Real-depth video speed on the lent GPU: Qwen2-VL-7B shape (32-layer ViT, 28-layer LLM), random weights, bf16,
# frames from eval/media/carphone_pristine.mp4 pre-decoded to .whl/carphone.npy (no video decoder there).
#   bash eval/device_video.sh TAG
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 eval/bench_video.py --video .whl/carphone.npy --frames 8 16 32 --device cuda --dtype bfloat16 \
  --vision-layers 32 --llm-layers 28 --repeats 5 --out "$OUT" --name "video_qwen2vl7b_${1:-gpu}" 2>&1 | tail -30
