"""`bench data` end to end at a tiny scale: it times generation and the pipeline and writes
JSON and Markdown with the machine and command."""

import json

import archive_fixtures as fixtures
import numpy as np
import pytest

from xformers_zoo import cli
from xformers_zoo.bench import BENCHMARKS, Benchmark
from xformers_zoo.bench import data as bench_data


def test_bench_data_writes_results(tmp_path):
    out = tmp_path / "bench"
    manual = tmp_path / "manual"
    manual.mkdir()
    fixtures.write_cifar(manual, np.random.default_rng(0), per_batch=100, n_test=50)
    argv = ["--sizes", "32", "--scale", "0.02", "--workers", "1", "--tasks", "image",
            "--manual-dir", str(manual), "--seconds", "0.2", "--out", str(out)]
    assert bench_data.main(argv) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    (gen,) = result["generation"]
    assert gen["size"] == 32 and gen["one_core_images_per_s"] > 0
    assert gen["full_set_minutes_extrapolated"] > 0 and "all_cores_images_per_s" not in gen
    (pipe,) = result["pipeline"]
    assert pipe["task"] == "image" and pipe["length"] == 1024 and pipe["examples_per_s"] > 0
    assert result["machine"]["cores"] >= 1 and "--scale 0.02" in result["command"]
    # builds of n = 64 and 2n training images, each with 8 + 8 validation and test images;
    # the rate is nan when the two builds are too noisy to tell apart, never negative
    assert gen["build_images"] == 3 * 64 + 32 and "build_startup_s" in gen
    assert not gen["build_images_per_s"] <= 0
    assert "| 32 | 1024 |" in out.with_suffix(".md").read_text()


def test_pipeline_tasks_leave_out_those_without_their_files(tmp_path, capsys):
    default = ["listops", "image", "pathfinder32"]
    assert bench_data.pipeline_tasks(None, default, None) == ["listops", "pathfinder32"]
    assert "skipping image" in capsys.readouterr().out
    assert bench_data.pipeline_tasks(None, default, tmp_path) == default
    assert bench_data.pipeline_tasks(["image"], default, None) == ["image"]
    with pytest.raises(ValueError, match="image reads its official files; pass --manual-dir"):
        bench_data.pipeline_config("image", tmp_path, None)


def test_cli_bench_runs_the_registered_benchmark(monkeypatch, capsys):
    seen = []
    monkeypatch.setitem(BENCHMARKS._entries, "memory",
                        Benchmark(main=lambda argv: seen.append(list(argv)) or 0, help="stand-in"))
    assert cli.main(["bench", "memory", "--variant", "full"]) == 0
    assert seen == [["--variant", "full"]]
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'; known: data, kernels, loader, memory, speed" in (
        capsys.readouterr().err)
