"""`bench data` end to end at a tiny scale: it times generation and the pipeline and writes
JSON and Markdown with the machine and command."""

import json

from xformers_zoo.train import bench_data


def test_bench_data_writes_results(tmp_path):
    out = tmp_path / "bench"
    argv = ["--sizes", "32", "--scale", "0.02", "--workers", "1", "--tasks", "image",
            "--seconds", "0.2", "--out", str(out)]
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
