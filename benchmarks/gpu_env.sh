# Sourced by the GPU payloads (gpu_check.sh, gpu_converge.sh) on the lent GPU machine: Python 3.12 and PyTorch there,
# no package index. Installs what it lacks from .whl/ (benchmarks/fetch_gpu_deps.sh made it here; carried along):
# the pure-Python wheels, then CompressAI built from source (its rANS coder). Sets PY and PYTHONPATH.
PY="${PY:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import compressai, pytorch_msssim, bjontegaard" 2>/dev/null; then
    [ -d .whl ] || { echo "error: .whl/ is missing: run benchmarks/fetch_gpu_deps.sh where pip can download"; exit 2; }
    SITE=/tmp/lictrain-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        && "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" \
            .whl/compressai-*.tar.gz 2>&1 | tail -5
    export PYTHONPATH="$PYTHONPATH:$SITE"
    "$PY" -c "import compressai" || { echo "error: compressai did not install"; exit 2; }
fi
