#!/bin/sh
# Issue #32 fine-tune of the default clip model (see training/README.md, "Issue #32"). Resumable: rerun the same
# command (finished cache shards are skipped; training resumes from $ROOT/ckpt/last.pt). One torch thread.
#   cd REPO && mkdir -p /work/ckpt/video32 && \
#   nohup flock /tmp/vlm_accel_train.lock nice -n 10 sh training/video32.sh >> /work/ckpt/video32/train.log 2>&1 &
set -e
ROOT=${ROOT:-/work/ckpt/video32}
STEPS=${STEPS:-600}
DECAY=${DECAY:-150}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$ROOT"
# run from a snapshot of the committed tree, so concurrent edits of the working tree cannot break a long run
if [ ! -d "$ROOT/src" ]; then
    git archive --prefix=src/ HEAD | tar -x -C "$ROOT"
    git rev-parse HEAD > "$ROOT/src/COMMIT"
fi
cd "$ROOT/src"
[ -d "$ROOT/init" ] || cp -r vlm_accel/zoo/default "$ROOT/init"  # the shipped step-4550 weights
echo "video32: $(date -u) commit $(cat COMMIT) steps $STEPS"
python -m training.train_video cache --root "$ROOT" --clips 1600 --images 1000 --eval-clips 120 --eval-images 250 \
    --eval-sets clips,clips2 --vary-p 0.7 --threads 1
python -m training.train_video train --root "$ROOT" --steps "$STEPS" --decay "$DECAY" --warmup 30 --lr 3e-4 \
    --reduce-p 0.5 --threads 1 --eval-every 100 --save-every 900 --keep-every 100
