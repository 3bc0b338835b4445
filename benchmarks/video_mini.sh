#!/usr/bin/env bash
# The miniature video benchmark (issue 33; the SOAP paper's appendix A.4, Fig. 7, at 2-CPU scale): Adam against
# SOAP through DCVC's four training stages, on sequences cut from the shared clips with whole clips held out for
# validation and testing, then both final models coded to real bit-streams on the held-out clips.
#
#   benchmarks/video_mini.sh [OUT]        (default runs/video-mini; reruns reuse finished runs and resume others)
#
# Sizes (STAGE_STEPS, IFRAME_STEPS, VAL_SEQS, LR), SEED (default 0: the models' initial weights and the data order),
# RECIPES (default adam,soap) and EVAL (default 1; 0 skips step 4, the held-out bit-streams, ~15 min a model) are
# environment variables; the
# defaults were chosen by measuring the tiny preset's step time on the 2-core machine (~165 ms an Adam step in
# stage 1) to fit Adam and SOAP through the four stages in about an hour (benchmarks/RESULTS.md, "The miniature
# video benchmark"). LR: one rate for both optimizers and every stage, 1e-3 (OpenDCVCs' 1e-4 hardly moves the
# stage-1 loss in a few hundred steps).
# An Adam learning-rate sweep reuses one folder's sequences and I-frame codec (DATA, IFRAME):
#   RECIPES=adam LR=3e-4 DATA=runs/video-mini/data IFRAME=runs/video-mini/iframe \
#       benchmarks/video_mini.sh runs/video-mini-adam-3e-4
# and so does another seed:  SEED=1 DATA=... IFRAME=... benchmarks/video_mini.sh runs/video-mini-seed1
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/video-mini}
PY=${PY:-.venv/bin/python}
CLIPS=../shared/data/video/clips
STAGE_STEPS=${STAGE_STEPS:-"2000 1000 1500 1500"}
LR=${LR:-1e-3}
IFRAME_STEPS=${IFRAME_STEPS:-8000}
VAL_SEQS=${VAL_SEQS:-4}
RECIPES=${RECIPES:-adam,soap}
SEED=${SEED:-0}
DATA=${DATA:-$OUT/data}
IFRAME=${IFRAME:-$OUT/iframe}
TEST_CLIPS=intel_car-detection.mp4,openh264_Zhling_1280x720.264
mkdir -p "$OUT"
date -u +"started %Y-%m-%dT%H:%M:%SZ"

# 1. training and held-out sequences (7 frames every 30, at most 25 a clip, 448x256)
if [ ! -f "$DATA/sep_trainlist.txt" ]; then
  $PY -m lictrain video-prepare "$CLIPS"/*.mp4 "$CLIPS"/*.264 -o "$DATA" --frames 7 --every 30 \
      --max-per-clip 25 --test "$TEST_CLIPS"
fi

# 2. the I-frame codec: the image benchmark's model and data, shortened
if [ ! -f "$IFRAME/summary.json" ]; then
  if [ -f "$IFRAME/checkpoint.pt" ]; then
    $PY -m lictrain train --resume "$IFRAME" --set train.progress=false | tail -2
  else
    $PY -m lictrain train --config bench --set run_dir="$IFRAME" --set loss.lmbda=0.0067 \
        --set train.steps="$IFRAME_STEPS" --set train.val_every=1000 --set train.ckpt_every=1000 \
        --set train.progress=false | tail -2
  fi
fi

# 3. Adam, then SOAP, through the four stages (each stage from the same optimizer's previous one)
read -r S1 S2 S3 S4 <<< "$STAGE_STEPS"
steps=("$S1" "$S2" "$S3" "$S4")
sets=(--set "data.train=$DATA[train]" --set "data.val=$DATA[test]" --set "data.val_max_images=$VAL_SEQS"
      --set "model.kwargs.iframe=$IFRAME" --set "optim.lr=$LR" --set "seed=$SEED")
for k in 1 2 3 4; do
  $PY - "configs/dcvc-stage$k.yaml" "$OUT/stage$k.yaml" "${steps[$((k - 1))]}" <<'EOF'
import sys, yaml
source, path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = yaml.safe_load(open(source))
cfg["train"].update(steps=steps, val_every=max(steps // 6, 1), ckpt_every=steps)
open(path, "w").write(yaml.safe_dump(cfg, sort_keys=False))
EOF
done
$PY -m lictrain video-compare --stages "$OUT/stage1.yaml,$OUT/stage2.yaml,$OUT/stage3.yaml,$OUT/stage4.yaml" \
    --recipes "$RECIPES" --out "$OUT/compare" "${sets[@]}"

# 4. both final models on the held-out clips, real bit-streams (intra period 7: one I-frame a septuplet)
EVAL=${EVAL:-1}
for r in ${RECIPES//,/ }; do
  [ "$EVAL" = 0 ] && break
  $PY -m lictrain eval "$OUT/compare/$r-stage4" --data "$DATA[test]" --intra-period 7 --out "$OUT/eval-$r" \
      | tail -3
done
date -u +"finished %Y-%m-%dT%H:%M:%SZ"
