#!/usr/bin/env bash
# The main job: openclipart shards -> MS-CLIP-S tiny trained with DeepSpeed ZeRO-2 -> held-out
# retrieval and category zero-shot evaluation -> loss-curve plot.
# On a machine without CUDA it runs 2 CPU ranks (gloo); with CUDA it uses every GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${DATA:-data/openclipart}
RUN=${RUN:-runs/demo}
MODEL=${MODEL:-msclip-s-tiny}
EPOCHS=${EPOCHS:-6}
BATCH=${BATCH:-64}
export PATH="$PWD/.venv/bin:$PATH"

if [ ! -f "$DATA/manifest.json" ]; then
  echo "== building openclipart shards in $DATA"
  $PY -m msclip_fast.data.make_shards --source openclipart --out "$DATA" --image-size 96
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  LAUNCH=(deepspeed train.py)
else
  # DeepSpeed's CPU accelerator: 2 real ranks over gloo on this 2-core machine
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  LAUNCH=(deepspeed --num_gpus 2 train.py)
fi

rm -rf "$RUN"
echo "== training $MODEL for $EPOCHS epochs (ZeRO-2): ${LAUNCH[*]}"
"${LAUNCH[@]}" --ds_config configs/ds/zero2.json --model "$MODEL" \
  --train-data "$DATA/train" --val-data "$DATA/val" \
  --batch-size "$BATCH" --epochs "$EPOCHS" --lr 1e-3 --warmup 50 --output "$RUN"

echo "== evaluating"
$PY -m msclip_fast.eval retrieval --checkpoint "$RUN" --data "$DATA/val" | tee "$RUN/retrieval.log"
$PY -m msclip_fast.eval zeroshot --checkpoint "$RUN" --data "$DATA/val" --classes openclipart | tee "$RUN/zeroshot.log"
$PY -m msclip_fast.plot "$RUN"

echo
echo "run directory : $RUN"
echo "metrics       : $RUN/metrics.jsonl  (summary: $RUN/summary.json)"
echo "checkpoints   : $RUN/checkpoints (latest: $(cat "$RUN/checkpoints/latest" 2>/dev/null || echo none))"
echo "plot          : $RUN/curves.png"
echo "retrieval     : $(tail -n 1 "$RUN/retrieval.log")"
echo "zero-shot     : $(tail -n 1 "$RUN/zeroshot.log")"
