#!/usr/bin/env bash
# Source this on a GPU machine (Python 3.12, jax/flax preinstalled) from the repository root:
# installs the carried wheels of scripts/fetch_gpu_wheels.sh and the project itself. Sourced
# again in the same environment (one GPU job starting another beside it) it only re-exports,
# so no install runs while the other job imports from /tmp/site.
if [ "${XZOO_GPU_SETUP_DONE:-}" = 1 ]; then
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  return 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-deps --no-build-isolation -e . || return 1
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 XZOO_GPU_SETUP_DONE=1
python3 -c "import jax, flax, optax, orbax.checkpoint as o, grain, tensorflow_datasets as t; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, \
'orbax', o.__version__, 'grain', grain.__version__ if hasattr(grain, '__version__') else '?', \
'tfds', t.__version__, jax.devices())"
