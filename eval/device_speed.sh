#!/usr/bin/env bash
# Real-size speed on the lent GPU: LLaVA-1.5-7B shape (24-layer CLIP-L/336, 32-layer Vicuna-7B widths), random
# weights, bf16, at three workloads: 1 image (616 tokens), 1 row x 5 images (2920 tokens, LLaVA-NeXT-like), and
# batch 8 x 1 image. Run from the repo root through the device tool with `.whl` (transformers 5.24 wheel) carried:
#   bash eval/device_speed.sh TAG     (results land in $OUT; copied into eval/results/)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
tag=${1:-gpu}
nvidia-smi -L
common=(--device cuda --dtype bfloat16 --vision-layers 24 --llm-layers 32 --new-tokens 8 --out "$OUT")
python3 eval/bench_speed.py "${common[@]}" --repeats 10 --name "speed_7b_${tag}_1img" 2>&1 | tail -13
python3 eval/bench_speed.py "${common[@]}" --repeats 7 --images 5 --name "speed_7b_${tag}_5img" 2>&1 | tail -12
python3 eval/bench_speed.py "${common[@]}" --repeats 7 --batch 8 --name "speed_7b_${tag}_b8" 2>&1 | tail -12
rm -f "$OUT"/*.png  # at most 8 files come back; plots are redrawn from the JSON
