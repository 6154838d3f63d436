#!/usr/bin/env bash
# Downloads, into .whl/, the Python 3.12 x86-64 wheels that the GPU machines lack (their image
# has jax, flax, optax, orbax-checkpoint, chex, einops, jaxtyping, tqdm, pillow, matplotlib and
# numba 0.68.0 (the Pathfinder generator's), but not the data stack). On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PACKAGES=(
  tensorflow-datasets==4.9.10 grain==0.2.18 array-record==0.8.6
  dm-tree immutabledict simple-parsing docstring-parser tensorflow-metadata
  googleapis-common-protos termcolor toml portpicker importlib_resources
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}"
# promise ships only as a source archive; it is pure Python, so a wheel built here serves.
python3 -m pip wheel -q --no-deps -w .whl promise
ls -1 .whl
