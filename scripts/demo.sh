#!/usr/bin/env bash
# The main job: openclipart shards -> MS-CLIP-S tiny trained with DeepSpeed ZeRO-2 -> held-out
# retrieval and category zero-shot evaluation -> loss-curve plot and retrieval gallery.
# On a machine without CUDA it runs 2 CPU ranks (gloo); with CUDA it uses every GPU.
# A previous run in $RUN is kept: it is moved to a timestamped sibling (runs/demo.YYYYmmdd-HHMMSS).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${DATA:-data/openclipart}
RUN=${RUN:-runs/demo}
RUN=${RUN%/}  # "runs/demo/" would move the old run into itself
MODEL=${MODEL:-msclip-s-tiny}
EPOCHS=${EPOCHS:-6}
BATCH=${BATCH:-64}
export PATH="$PWD/.venv/bin:$PATH"

if [ ! -f "$DATA/manifest.json" ]; then
  echo "== building openclipart shards in $DATA (about a minute)"
  $PY -m msclip_fast.data.make_shards --source openclipart --out "$DATA" --image-size 96
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  LAUNCH=(deepspeed train.py)
else
  # DeepSpeed's CPU accelerator: 2 real ranks over gloo on this 2-core machine
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  LAUNCH=(deepspeed --num_gpus 2 train.py)
fi

# train.py logs the held-out loss once per epoch when --val-data comes without --eval-every;
# EVAL_EVERY=N asks for every N steps instead
EVAL_FLAGS=() EVAL_WHEN="once per epoch"
if [ -n "${EVAL_EVERY:-}" ]; then EVAL_FLAGS=(--eval-every "$EVAL_EVERY") EVAL_WHEN="every $EVAL_EVERY steps"; fi

# train.py refuses an --output that holds a run; move it aside rather than delete it
if [ -e "$RUN" ]; then
  OLD="$RUN.$(date +%Y%m%d-%H%M%S)"
  while [ -e "$OLD" ]; do OLD="$OLD.1"; done
  mv "$RUN" "$OLD"
  echo "== kept the previous run: $RUN -> $OLD (delete old runs yourself when done with them)"
fi

echo "== training $MODEL for $EPOCHS epochs (ZeRO-2), held-out loss $EVAL_WHEN: ${LAUNCH[*]}"
"${LAUNCH[@]}" --ds_config configs/ds/zero2.json --model "$MODEL" \
  --train-data "$DATA/train" --val-data "$DATA/val" "${EVAL_FLAGS[@]}" \
  --batch-size "$BATCH" --epochs "$EPOCHS" --lr 1e-3 --warmup 50 --output "$RUN"

echo "== evaluating"
$PY -m msclip_fast.eval retrieval --checkpoint "$RUN" --data "$DATA/val" | tee "$RUN/retrieval.log"
$PY -m msclip_fast.eval zeroshot --checkpoint "$RUN" --data "$DATA/val" --classes openclipart | tee "$RUN/zeroshot.log"
$PY -m msclip_fast.plot "$RUN"

# The gallery subcommand is newer than this script may be: use it when this checkout has it.
# Its failure does not hide the summary below; the script still exits non-zero.
GALLERY="$RUN/gallery"
STATUS=0
if $PY -m msclip_fast.eval gallery --help >/dev/null 2>&1; then
  echo "== drawing the retrieval gallery"
  if $PY -m msclip_fast.eval gallery --checkpoint "$RUN" --data "$DATA/val" --out "$GALLERY"; then
    GALLERY="$GALLERY/ ($(ls "$GALLERY" | paste -sd ' ' -))"
  else
    echo "demo: the gallery failed (see above); the run and its evaluation are complete" >&2
    GALLERY="failed (see above)"
    STATUS=1
  fi
else
  GALLERY="none (this checkout's msclip_fast.eval has no 'gallery' subcommand)"
fi

echo
echo "run directory : $RUN"
echo "metrics       : $RUN/metrics.jsonl  (summary: $RUN/summary.json)"
echo "checkpoints   : $RUN/checkpoints (latest: $(cat "$RUN/checkpoints/latest" 2>/dev/null || echo none))"
echo "pictures      : $RUN/curves.png (loss, val loss, lr, scale, throughput)"
echo "gallery       : $GALLERY"
echo "retrieval     : $(tail -n 1 "$RUN/retrieval.log")"
echo "zero-shot     : $(tail -n 1 "$RUN/zeroshot.log")"
exit "$STATUS"
