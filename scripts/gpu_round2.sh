#!/usr/bin/env bash
# Second GPU-machine job: every variant on tiny ListOps, the encoder memory benchmark on the GPU,
# and the data-layer benchmark on the machine's CPUs. Everything lands in one tarball.
# Usage: bash scripts/gpu_round2.sh OUTDIR
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out/r"
source scripts/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/r/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)" >> "$out/r/gpu.txt"
bash scripts/gpu_variants_tiny.sh "$out/r" "${VARIANT_STEPS:-400}"
timeout 150 python3 -m xformers_zoo.train.bench_memory > "$out/r/memory_gpu.md" 2>&1
tail -12 "$out/r/memory_gpu.md"
timeout 240 python3 -m xformers_zoo.train.bench_data --workers 16 \
  --out "$out/r/bench_data_gpu_host" > "$out/r/bench_data.log" 2>&1
tail -25 "$out/r/bench_data_gpu_host.md"
tar czf "$out/round2.tgz" -C "$out" r && rm -rf "$out/r"
