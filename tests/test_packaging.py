"""The distribution: a wheel built from the tree installs every subpackage inside xformers_zoo
and nothing at the top level but xformers_zoo."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["xformers_zoo", "xformers_zoo.models", "xformers_zoo.kernels",
               "xformers_zoo.train", "xformers_zoo.configs", "xformers_zoo.data",
               "xformers_zoo.layers", "xformers_zoo.bench", "xformers_zoo.recipes"]


@pytest.mark.slow
def test_wheel_installs_and_imports_every_subpackage(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("xformers_zoo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"xformers_zoo"}, top
    assert "xformers_zoo/models/full.py" in names and "xformers_zoo/kernels/dispatch.py" in names
    assert "xformers_zoo/bench/kernels.py" in names
    assert not [n for n in names if "fixtures" in n], "test fixtures belong under tests/"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "xformers-zoo = xformers_zoo.cli:main" in zipfile.ZipFile(wheel).read(
        entry_points).decode()
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, capture_output=True)
    script = (
        "import importlib, sys\n"
        f"for name in {SUBPACKAGES!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(site)!r}), (name, module.__file__)\n"
        "import xformers_zoo\n"
        "assert 'full' in xformers_zoo.list_models()\n"
        # every registry is filled by importing its package, from the installed files
        "from xformers_zoo.bench import BENCHMARKS\n"
        "from xformers_zoo.data import SOURCES\n"
        "from xformers_zoo.kernels import IMPLEMENTATIONS\n"
        "assert {'data', 'kernels', 'speed'} <= set(BENCHMARKS), BENCHMARKS.names()\n"
        "assert set(IMPLEMENTATIONS) == {'xla', 'cudnn', 'pallas'}, IMPLEMENTATIONS.names()\n"
        "assert set(SOURCES) == set(xformers_zoo.TASKS), SOURCES.names()\n"
        "from xformers_zoo.recipes import RECIPES\n"
        "assert {'curriculum', 'self-pretrain'} <= set(RECIPES), RECIPES.names()\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"
