#!/usr/bin/env bash
# The one prepared GPU check (issue 28): the CUDA tests, then benchmarks/gpu_check.py, everything under $OUT.
#
# On the lent GPU machine (Python 3.12 and PyTorch there, no package index), from the repository root, with the
# wheels and CompressAI's source that benchmarks/fetch_gpu_deps.sh put in .whl/ (git-ignored) carried along:
#
#     bash benchmarks/gpu_check.sh            # planned for < 8 minutes (gpu_check.py --budget); exit 1 if a check failed
#
# On the CPU (the test suite runs this): bash benchmarks/gpu_check.sh --dry-run   (tiny sizes, no CUDA tests)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
if [ "${1:-}" = "--dry-run" ]; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    PY="${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
    exec "$PY" benchmarks/gpu_check.py --dry-run --out "$OUT"
fi
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25
tests=${PIPESTATUS[0]}
"$PY" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log" | grep -v "^  "
check=${PIPESTATUS[0]}
echo "pytest -m cuda exit $tests; gpu_check exit $check; results in $OUT"
[ "$tests" = 0 ] && [ "$check" = 0 ]
