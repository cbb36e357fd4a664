#!/usr/bin/env bash
# The GPU check of issue 14, for a maintainer with one GPU: `bash benchmarks/gpu_check.sh OUT` writes OUT/gpu_check.json
# (see benchmarks/gpu_check.py). Needs torch + torchvision; the training sections also need hydra, omegaconf, typer.
# PYTHON picks the interpreter (default: python3). Exit status 1 when a section failed.
set -euo pipefail
out="${1:?usage: bash benchmarks/gpu_check.sh OUT_FOLDER [extra gpu_check.py options]}"
shift
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --out "$out" "$@"
