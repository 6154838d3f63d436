#!/usr/bin/env bash
# Data-parallel train-step rates on the ListOps and Pathfinder-32 public configs (the LRA batch
# per GPU: 32 and 512) on 1, 2, 4 and 8 GPUs of one host, each count in its own process that
# sees only those GPUs (CUDA_VISIBLE_DEVICES), at the same batch per GPU.
# Usage (repository root, a machine with several GPUs):
#   bash scripts/gpu_data_parallel.sh OUTDIR [COUNT...]     (default counts: 1 2 4 8)
# Counts above the GPUs present are skipped. Brought back in OUTDIR: data_parallel.json and
# data_parallel.md (scripts/time_data_parallel.py report), rows.jsonl and one log per run.
# Extra overrides for every run: DP_OVERRIDES="model.dtype=bfloat16 ..."; timed seconds per
# run: DP_SECONDS (default 20).
set -uo pipefail
out=${1:?output folder}; shift
counts=${*:-1 2 4 8}
# NVLink multicast stays off: it can take a shared host's GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source scripts/gpu_setup.sh > "$out/setup.log" 2>&1 || { tail "$out/setup.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvidia-smi topo -m; python3 -c "import jax; print('jax', jax.__version__)"; date -u; } \
  | tee "$out/machine.txt"
gpus=$(nvidia-smi -L | grep -c "^GPU ")
rows="$out/rows.jsonl"; rm -f "$rows"
for spec in listops:32 pathfinder32:512; do
  task=${spec%%:*}; per_gpu=${spec##*:}
  for n in $counts; do
    if [ "$n" -gt "$gpus" ]; then echo "skip $task on $n GPUs: $gpus present"; continue; fi
    visible=$(seq -s, 0 $(( n - 1 )))
    CUDA_VISIBLE_DEVICES=$visible python3 scripts/time_data_parallel.py measure \
      --task "$task" --model full --preset lra --per-device-batch "$per_gpu" \
      --seconds "${DP_SECONDS:-20}" --out "$rows" ${DP_OVERRIDES:-} \
      > "$out/${task}_${n}gpu.log" 2>&1 || { echo "FAILED $task on $n GPUs:"; \
                                             tail -5 "$out/${task}_${n}gpu.log"; }
    tail -1 "$out/${task}_${n}gpu.log"
  done
done
python3 scripts/time_data_parallel.py report "$rows" --out "$out/data_parallel"
