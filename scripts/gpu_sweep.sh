#!/usr/bin/env bash
# A sweep on the GPU machine inside one time-limited call, resumable across calls.
# Usage (repository root, GPU machine):
#   bash scripts/gpu_sweep.sh OUTDIR SECONDS SWEEP_ARGS...
# e.g. bash scripts/gpu_sweep.sh $OUT 480 --tasks listops --models full --preset lra --seeds 0 1
# The sweep directory is runs/lra (SWEEP_DIR to change it), the data /tmp/data. Cells still
# running after SECONDS stop cleanly (sweep --stop-after) and resume on the next call.
# Brought back in OUTDIR:
#   sweep_results.tgz  every cell's config.json, final.json, metrics.jsonl and train.log (the
#                      files results/lra/ keeps)
#   sweep_state.tgz    the whole sweep directory, checkpoints included, when it packs to at most
#                      STATE_MAX_MB (default 48): unpack it into the repository root and name
#                      runs/ in the next call's carry to resume unfinished cells there.
set -uo pipefail
out=${1:?output folder}; seconds=${2:?seconds}; shift 2
dir=${SWEEP_DIR:-runs/lra}
source scripts/gpu_setup.sh > "$out/setup.log" 2>&1 || { tail "$out/setup.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__)" | tee -a "$out/gpu.txt"
xformers-zoo sweep --dir "$dir" --stop-after "$seconds" "$@" data.data_dir=/tmp/data \
  > "$out/sweep.log" 2>&1
rc=$?
echo "sweep exit $rc"; tail -25 "$out/sweep.log"
tar czf "$out/sweep_results.tgz" --exclude=checkpoints --exclude=best --exclude=corrupt \
  --exclude=.probe "$dir"
tar czf /tmp/sweep_state.tgz --exclude=.probe "$dir"
mb=$(( $(stat -c %s /tmp/sweep_state.tgz) / 1048576 ))
if [ "$mb" -le "${STATE_MAX_MB:-48}" ]; then mv /tmp/sweep_state.tgz "$out/"
else echo "sweep state is $mb MB: too large to bring back; unfinished cells restart next time"; fi
exit $rc
