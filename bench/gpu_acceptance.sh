#!/usr/bin/env bash
# The first call on a GPU node: build the kernels, run their parity probes and the CUDA tests, time the ops, the
# networks (fp16, bf16) and the real training loop (sec/kimg, memory, MFU), and train once through torchrun over
# NCCL; one table at the end (bench/gpu_acceptance.py says more). Without a GPU it runs the CPU parts.
#
#     bash bench/gpu_acceptance.sh [--out=DIR] [--json=FILE]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python bench/gpu_acceptance.py "$@"
