"""The benchmark registry: each benchmark module registers its ``main(argv) -> int`` under the
name that ``xformers-zoo bench NAME`` runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from xformers_zoo.registry import Registry

BenchmarkMain = Callable[[Sequence[str] | None], int]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A benchmark: its command-line entry point and one line for ``xformers-zoo bench -h``."""

    main: BenchmarkMain
    help: str


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def register_benchmark(name: str, help: str) -> Callable[[BenchmarkMain], BenchmarkMain]:
    """``@register_benchmark("data", help=...)`` on a module's ``main(argv) -> int`` makes it
    ``xformers-zoo bench data``."""

    def wrap(main: BenchmarkMain) -> BenchmarkMain:
        if main.__module__ == "__main__":  # the package import has registered it already
            raise SystemExit(f"run it as `xformers-zoo bench {name}` (or `python -m xformers_zoo "
                             f"bench {name}`), not as a module of its own")
        BENCHMARKS.register(name, Benchmark(main=main, help=help))
        return main

    return wrap
