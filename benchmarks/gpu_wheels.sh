#!/usr/bin/env bash
# Fetch, HERE (where PyPI is reachable), the wheels the GPU machine lacks, into .whl/ (git-ignored), for
# benchmarks/gpu_suite.sh to install there. The device image has torch, transformers, peft, accelerate, rich, pytest
# and safetensors, but no diffusers (and not diffusers' importlib_metadata need) nor torchao. ~9.8 MB.
#     bash benchmarks/gpu_wheels.sh
# then, in the device call, carry .whl and run `bash benchmarks/gpu_suite.sh core` (see docs/performance.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DIFFUSERS=$(.venv/bin/python -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null || echo 0.42.1)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "diffusers==$DIFFUSERS" importlib_metadata
# torchao (train.frozen_weights, gpu_suite.sh's `quant` step): PyTorch tensor subclasses, plus CUDA extensions that
# load only against a matching torch (the 8-bit weight-only path does not need them); its wheel is manylinux_2_28
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .whl torchao==0.18.0
ls -l .whl
