#!/usr/bin/env bash
# What the lent GPU machine lacks, downloaded here into .whl/ (git-ignored) for benchmarks/gpu_check.sh to install
# there: it runs Python 3.12 with PyTorch, NumPy, SciPy, scikit-image, PyYAML, tqdm, matplotlib, tensorboard,
# torch_geometric, pybind11 and pytest already, but no package index. CompressAI has no wheel for Python 3.12, so its
# source goes along and is built there (pybind11 and a C++ compiler are on that machine). The training and test
# photos go along in .whl/data for benchmarks/gpu_converge.sh (../shared is not on that machine): ~43 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
for pkg in pytorch-msssim==1.0.0 bjontegaard==1.3.0 pytorch_optimizer==4.1.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
        -d .whl "$pkg"
done
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl compressai==1.2.8
mkdir -p .whl/data
for d in kodak cbsd68 sun-hays80; do
    [ -d ../shared/data/$d ] && cp -r ../shared/data/$d .whl/data/
done
ls -la .whl .whl/data
du -sh .whl
