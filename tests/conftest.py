"""Shared test setup: CPU-friendly defaults and the ``gpu`` marker."""

import os

import jax
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests compare float32 results with float64 references: GPUs would otherwise run float32
# matrix products in TF32 and land near 1e-3 relative error.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
