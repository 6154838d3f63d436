#!/usr/bin/env bash
# Data-layer performance on the GPU machine (16 CPU cores, one GPU): full Pathfinder builds
# timed end to end, the build-rate benchmark, and the input pipeline beside the training step.
# Usage (repository root, GPU machine): bash scripts/gpu_data_perf.sh OUTDIR STAGE...
#   build:TASK[:TRAIN:VAL:TEST]  `xformers-zoo data prepare TASK` on every core into /tmp
#                                (default sizes: the LRA 160K/20K/20K), wall time and rate
#   rates:SIZE[,SIZE...]         `bench data --workers 16` at those sizes (n and 2n builds)
#   loader                       `bench loader` (0 and 4 loader workers against the step)
# Every stage runs under what is left of DEADLINE seconds (default 540) from the start, so the
# whole job ends inside one 9-minute call; a stage cut short says so and the next is skipped.
set -uo pipefail
out=${1:?output folder}; shift
deadline=${DEADLINE:-540}
t0=$(date +%s)
source scripts/gpu_setup.sh || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  lscpu | grep -E "Model name|^CPU\(s\)"; free -g | head -2; df -h /tmp
  python3 -c "import jax; print('jax', jax.__version__)"; date -u; } | tee "$out/machine.txt"

left() { echo $(( deadline - ($(date +%s) - t0) )); }

build() {  # task [train val test]: one full build, timed by date stamps, with a disk trace
  local task=$1 dir=/tmp/data_$1 sizes=()
  [ $# -eq 4 ] && sizes=("data.train_size=$2" "data.val_size=$3" "data.test_size=$4")
  local images=$(( ${2:-160000} + ${3:-20000} + ${4:-20000} ))
  rm -rf "$dir"
  (while sleep 20; do echo "$(date -u +%T) $(du -sm "$dir" 2>/dev/null | cut -f1) MB"; done) \
    > "$out/build_${task}_disk.txt" &
  local tracer=$! start end rc
  start=$(date +%s.%N)
  timeout "$(left)" python3 -m xformers_zoo data prepare "$task" "data.data_dir=$dir" \
    data.workers=16 "${sizes[@]}" > "$out/build_${task}.txt" 2>&1
  rc=$?
  end=$(date +%s.%N)
  kill "$tracer"
  python3 - "$task" "$images" "$start" "$end" "$rc" "$(du -sm "$dir" | cut -f1)" <<'EOF' \
    | tee -a "$out/build_${task}.txt"
import sys
task, images, start, end, rc, mb = sys.argv[1:]
seconds = float(end) - float(start)
print(f"build {task}: {images} images, rc {rc}, {seconds:.1f} s = {seconds / 60:.2f} min, "
      f"{int(images) / seconds:.1f} images/s end to end, {mb} MB on disk"
      + ("" if rc == "0" else " (DID NOT FINISH: the rate is not a build rate)"))
EOF
  rm -rf "$dir"
  return "$rc"
}

for stage in "$@"; do
  [ "$(left)" -gt 20 ] || { echo "no time left for $stage"; break; }
  echo "== $stage ($(left) s left)"
  case $stage in
    build:*) IFS=: read -r _ task sizes <<< "$stage"; build "$task" ${sizes//:/ } || break ;;
    rates:*) sizes=${stage#rates:}
             timeout "$(left)" python3 -m xformers_zoo bench data --workers 16 \
               --sizes ${sizes//,/ } --tasks --out "$out/bench_data_rates" \
               > "$out/bench_data_rates.log" 2>&1 || { tail -5 "$out/bench_data_rates.log"; break; }
             cat "$out/bench_data_rates.md" ;;
    loader) timeout "$(left)" python3 -m xformers_zoo bench loader \
              --out "$out/bench_loader_gpu" ${LOADER_ARGS:-} > "$out/bench_loader.log" 2>&1
            rc=$?; cat "$out/bench_loader_gpu.md" 2>/dev/null; tail -3 "$out/bench_loader.log"
            [ $rc -eq 0 ] || break ;;
    *) echo "unknown stage $stage (build:TASK[:TRAIN:VAL:TEST], rates:SIZES, loader)"; exit 2 ;;
  esac
done
echo "done after $(( $(date +%s) - t0 )) s"
