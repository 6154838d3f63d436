#!/usr/bin/env bash
# Trains every registered variant on tiny ListOps on one GPU and writes a Markdown table.
# Usage (repository root, GPU machine, after `source scripts/gpu_setup.sh`):
#   bash scripts/gpu_variants_tiny.sh OUTDIR [steps]
set -uo pipefail
out=${1:?output folder}; steps=${2:-600}
python3 -m xformers_zoo data prepare listops --preset tiny data.data_dir=/tmp/data-tiny \
  data.workers=16 > "$out/variants_prepare.txt" 2>&1
runs=()
for v in $(python3 -c "import xformers_zoo as x; print(' '.join(x.list_models()))"); do
  start=$(date +%s)
  python3 -m xformers_zoo train --task listops --model "$v" --preset tiny --no-progress \
    --workdir "/tmp/runs/tiny-$v" data.data_dir=/tmp/data-tiny train.steps="$steps" \
    model.dtype=bfloat16 > "$out/tiny-$v.txt" 2>&1 \
    && runs+=("/tmp/runs/tiny-$v") || echo "FAILED $v (see tiny-$v.txt)"
  echo "$v $(( $(date +%s) - start ))s $(tail -1 "$out/tiny-$v.txt")"
done
python3 -m xformers_zoo table "${runs[@]}" | tee "$out/variants_tiny.md"
mkdir -p "$out/finals"
for r in "${runs[@]}"; do cp "$r/final.json" "$out/finals/$(basename "$r").json"; done
