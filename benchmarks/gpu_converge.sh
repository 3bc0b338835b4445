#!/usr/bin/env bash
# The convergence benchmark (issue 32) at a GPU's scale: configs/converge.yaml's Adam and SOAP runs as parallel
# processes on one GPU (benchmarks/parallel_compare.py), each stopped at the converged rule, with a deadline so the
# call ends inside the device's time; quality figures only (processes sharing a GPU give no timing claims).
#
# On the lent GPU machine, from the repository root, with .whl/ carried (benchmarks/fetch_gpu_deps.sh: the wheels,
# CompressAI's source, and the training and test photos in .whl/data, since ../shared is not on that machine):
#
#     bash benchmarks/gpu_converge.sh                 # seeds 0,1 x 4 lambda x adam,soap = 16 processes, 420 s
#     SEEDS=0,1,2 DEADLINE=480 JOBS=24 bash benchmarks/gpu_converge.sh
#
# Everything goes to $OUT/converge: each run's metrics.jsonl, summary and checkpoints (so a later call, given that
# folder back, resumes them), the logs, progress.txt (each run's last validation), and, when every run finished,
# compare's summary (BD-rates, converged steps) in $OUT/converge/summary.md.
# On the CPU (the test suite runs this): bash benchmarks/gpu_converge.sh --dry-run [--set k=v ...]   (tiny sizes,
# the bundled photos)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
SEEDS="${SEEDS:-0,1}"
LAMBDAS="${LAMBDAS:-0.0018,0.0035,0.0067,0.025}"
DEADLINE="${DEADLINE:-420}"
ARGS=(--set train.progress=false --set data.workers=0)
if [ "${1:-}" = "--dry-run" ]; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    PY="${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
    JOBS="${JOBS:-2}"
    ARGS+=(--set device=cpu --set model.preset=tiny --set data.train=samples:train --set data.val=samples:val
           --set data.crop=32 --set data.val_crop=64 --set train.steps=20 --set train.val_every=10
           --set train.ckpt_every=10 "--set" "compare.eval_data=[samples:val]")
    LAMBDAS="${LAMBDAS_DRY:-0.0067,0.025}"
    ARGS+=("${@:2}")  # further --set overrides (the tests')
else
    source benchmarks/gpu_env.sh
    JOBS="${JOBS:-16}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
    ARGS+=(--set device=cuda)
    if [ ! -d ../shared/data ]; then  # the photos travel in .whl/data; the same splits as configs/converge.yaml
        [ -d .whl/data ] || { echo "error: no ../shared/data and no .whl/data (benchmarks/fetch_gpu_deps.sh)"; exit 2; }
        ARGS+=(--set "data.train=.whl/data/cbsd68[train:-6], .whl/data/sun-hays80[train:-6]"
               --set "data.val=.whl/data/cbsd68[val:6], .whl/data/sun-hays80[val:6]"
               --set "compare.eval_data=[.whl/data/kodak]")
    fi
fi
mkdir -p "$OUT/converge"
"$PY" benchmarks/parallel_compare.py --config configs/converge.yaml --out "$OUT/converge" --jobs "$JOBS" \
    --threads 1 --seeds "$SEEDS" --lambdas "$LAMBDAS" --deadline "$DEADLINE" "${ARGS[@]}" \
    2>&1 | tee "$OUT/converge/progress.txt"
status=${PIPESTATUS[0]}
echo "parallel_compare exit $status (0: every run finished and summarised; 3: the deadline stopped some, which the same
call resumes given $OUT/converge back); results in $OUT/converge"
exit "$status"
