"""Benchmarks of the kernels, the data layer, the loader, memory and training speed: one module
each, registered by ``@register_benchmark`` and run as ``xformers-zoo bench NAME`` (or
``python -m xformers_zoo bench NAME``); ``report`` holds what they all write beside their
figures."""

from xformers_zoo.bench.registry import BENCHMARKS, Benchmark, register_benchmark
from xformers_zoo.registry import import_submodules

import_submodules(__name__)

__all__ = ["BENCHMARKS", "Benchmark", "register_benchmark"]
