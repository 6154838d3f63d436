#!/usr/bin/env bash
# GPU-machine job for the attention kernels. Steps (any subset, in order given):
#   kernel-tests  the fused Mosaic backward's own GPU tests (with and without dropout)
#   mosaic-tests  the Mosaic kernels through pallas_attention: dense and right padding, dropout
#                 (against the float64 reference and the Triton kernels' decisions), every mask
#                 (causal, key masks, block masks, mask predicates); one line per test, so each
#                 feature's verdict can be read (pallas_attention.MOSAIC_VALIDATED)
#   tests         every other GPU test (-m gpu): the Triton kernels, cuDNN's plain and
#                 length-masked calls, mask predicates, the shared layers
#   time          the fused backward against cuDNN and the Triton kernels for SHAPES (N:D, space
#                 separated; PLANS: plan names of scripts/time_mosaic_backward.py)
#   ptxas         ptxas register and spill report of the D = 128 kernel
#   bench         xformers-zoo bench kernels BENCH_ARGS (its JSON, Markdown and plot go to OUTDIR;
#                 BENCH_LIMIT seconds, default 1500: the PyTorch peer rows compile FlexAttention)
# Logs go to OUTDIR/r and are packed into OUTDIR/kernel_logs.tgz; summaries go to stdout.
# Usage: SHAPES="16384:64 4096:128" bash scripts/gpu_kernels.sh OUTDIR STEP...
set -uo pipefail
out=${1:?output folder}
shift
logs="$out/r"
mkdir -p "$logs"
source scripts/gpu_setup.sh > "$logs/setup.log" 2>&1 || { tail "$logs/setup.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/gpu.txt"
env | grep -E "^(JAX|XLA|TF_)" | tee -a "$logs/gpu.txt"
run() {  # run NAME SECONDS CMD...: one step, its log in $logs/NAME.log, its status echoed
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$logs/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - start)) s"
}
for step in "$@"; do
  case $step in
    kernel-tests)
      nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader -l 10 \
        > "$logs/kernel_tests_gpu_util.log" 2>&1 &
      monitor=$!
      run kernel_tests 200 python3 -m pytest -v -m gpu -p no:cacheprovider \
        -o faulthandler_timeout=45 tests/test_pallas_mosaic_backward.py
      kill $monitor
      grep -E "PASSED|FAILED|Timeout|File .*xformers_zoo|File .*tests/" "$logs/kernel_tests.log" \
        | head -30
      tr '\n' ' ' < "$logs/kernel_tests_gpu_util.log"; echo
      tail -4 "$logs/kernel_tests.log" ;;
    mosaic-tests)
      run mosaic_tests 400 python3 -m pytest -v -m gpu -p no:cacheprovider \
        -o faulthandler_timeout=60 tests/test_pallas_mosaic.py tests/test_pallas_mosaic_masks.py
      grep -E "PASSED|FAILED|ERROR|Timeout" "$logs/mosaic_tests.log" | sed 's/ *\[ *[0-9]*%\]//'
      tail -2 "$logs/mosaic_tests.log" ;;
    tests)
      run tests 540 python3 -m pytest -q -m gpu -p no:cacheprovider tests \
        --ignore=tests/test_pallas_mosaic_backward.py --ignore=tests/test_pallas_mosaic.py \
        --ignore=tests/test_pallas_mosaic_masks.py
      tail -4 "$logs/tests.log" ;;
    time)
      for shape in ${SHAPES:-16384:64 4096:64 16384:128 4096:128}; do
        n=${shape%:*} d=${shape#*:}
        run "time_${n}_${d}" 100 python3 scripts/time_mosaic_backward.py --n "$n" --d "$d" \
          --plans ${PLANS:-default} ${TIME_ARGS:-}
        grep -E "relative error|^==|  " "$logs/time_${n}_${d}.log" | grep -v compiled
      done ;;
    ptxas)
      mkdir -p "$logs/ptxas"
      MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO="$logs/ptxas" run ptxas 60 python3 \
        scripts/time_mosaic_backward.py --n 1024 --d 128 --plans default serial --skip-triton
      grep -h -i "registers\|spill" "$logs"/ptxas.log "$logs"/ptxas/* 2>/dev/null \
        | sort | uniq -c | head -20 ;;
    bench)
      run bench "${BENCH_LIMIT:-1500}" xformers-zoo bench kernels --out "$out" ${BENCH_ARGS:-}
      tail -3 "$logs/bench.log"; ls "$out" ;;
    *) echo "unknown step $step" ;;
  esac
done
tar czf "$out/kernel_logs.tgz" -C "$out" r && rm -rf "$logs"
