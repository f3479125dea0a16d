#!/usr/bin/env bash
# The first thing to run on a lent GPU machine: under ten minutes, its figures as JSON.
#   bash benchmarks/gpu.sh --json benchmarks/gpu-$(date +%F).json
# Dry, on a CPU (tiny sizes; tests/test_gpu_script.py runs it so it cannot rot):
#   bash benchmarks/gpu.sh --cpu --json /tmp/gpu-dry.json --frames 64
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m benchmarks.gpu "$@"
