"""``bench speed`` on a CPU: two variants at a tiny length, each in its own process, written as
JSON and Markdown with speeds relative to the dense XLA Transformer; plus the timing helper and
the out-of-memory classification."""

import json

import numpy as np
import pytest

from xformers_zoo.bench import speed as bench_speed
from xformers_zoo.configs import resolve_config
from xformers_zoo.train.step_timing import is_out_of_memory, synthetic_batch


def test_synthetic_batch_matches_the_task_shapes():
    config = resolve_config("retrieval", "full", overrides={"data.max_length": 16})
    batch = synthetic_batch(config, 4)
    assert batch["inputs"].shape == batch["mask"].shape == (4, 2, 16)
    assert batch["inputs"].dtype == np.int32 and batch["mask"].all()
    assert batch["label"].shape == batch["weight"].shape == (4,)
    assert batch["inputs"].min() > 0 and batch["inputs"].max() < 257


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying"))
    assert not is_out_of_memory(ValueError("bad shape"))


def test_ratios_are_per_length():
    rows = [{"variant": "full-xla", "length": 64, "status": "ok", "steps_per_sec": 2.0},
            {"variant": "linear", "length": 64, "status": "ok", "steps_per_sec": 5.0},
            {"variant": "linear", "length": 128, "status": "oom"}]
    bench_speed.add_ratios(rows)
    assert rows[1]["vs_xla"] == 2.5 and rows[1]["vs_full"] is None
    assert rows[2]["vs_xla"] is None


@pytest.mark.slow
def test_bench_speed_runs_two_variants_on_cpu(tmp_path):
    out = tmp_path / "speed"
    assert bench_speed.main(["--variants", "full-xla", "linear", "--lengths", "32",
                             "--preset", "tiny", "--batch", "2", "--steps", "2", "--seconds", "0",
                             "--out", str(out), "model.num_layers=1"]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"full-xla", "linear"} and result["lengths"] == [32]
    for row in rows.values():
        assert row["status"] == "ok" and row["steps_per_sec"] > 0 and row["length"] == 32
        assert row["compiled_bytes"] > 0 and row["peak_bytes"] is None  # CPU: no statistics
    assert rows["full-xla"]["attention"] == "xla" and rows["full-xla"]["vs_xla"] == 1.0
    assert rows["linear"]["vs_xla"] == pytest.approx(
        rows["linear"]["steps_per_sec"] / rows["full-xla"]["steps_per_sec"])
    markdown = out.with_suffix(".md").read_text()
    assert "| full-xla | " in markdown and "| linear | " in markdown and "(compiled)" in markdown
