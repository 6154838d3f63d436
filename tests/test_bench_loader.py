"""`bench loader` at a tiny scale: loader, step and fed-step rates per task in JSON and
Markdown; per-task overrides; the attention implementation it reports."""

import json

import pytest

from xformers_zoo.bench import loader as bench_loader
from xformers_zoo.configs import resolve_config
from xformers_zoo.overrides import ConfigError

TINY = ["train.batch_size=4", "model.num_layers=1", "model.num_heads=2", "model.emb_dim=16",
        "model.qkv_dim=16", "model.mlp_dim=16", "data.train_size=8", "data.workers=1"]


def test_overrides_for_every_task_and_for_one():
    shared, per_task = bench_loader.parse_overrides(
        ["model.attention_dropout=0.0", "pathx:train.grad_accum=2", "data.data_dir=/a:b"])
    assert shared == {"model.attention_dropout": "0.0", "data.data_dir": "/a:b"}
    assert per_task == {"pathx": {"train.grad_accum": "2"}}
    with pytest.raises(ConfigError, match="section.field=value"):
        bench_loader.parse_overrides(["pathx:grad_accum"])


def test_attention_path_names_the_implementation_and_why():
    config = resolve_config("pathx", "full")
    # on a CPU cuDNN steps aside; the reason names the backend
    assert bench_loader.attention_path(config).startswith("xla (cudnn skipped: needs an NVIDIA")
    assert bench_loader.attention_path(resolve_config("pathx", "linear")) == "n/a"


def test_bench_loader_writes_rates(tmp_path):
    out = tmp_path / "loader"
    argv = ["--tasks", "pathfinder32", "--loader-workers", "0", "--seconds", "0.1",
            "--min-steps", "2", "--out", str(out), *TINY, "pathfinder32:model.dropout=0.0"]
    assert bench_loader.main(argv) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    (row,) = result["tasks"]
    assert row["task"] == "pathfinder32" and row["length"] == 1024 and row["batch_size"] == 4
    assert row["loader_batches_per_s"]["0"] > 0 and row["step_per_s"] > 0
    assert row["fed_step_per_s"]["0"] > 0 and row["grad_accum"] == 1
    # the config assembles batches in 4 workers, which this run did not time
    assert row["config_loader_workers"] == 4 and row["loader_keeps_up"] is None
    assert result["overrides"]["pathfinder32"] == {"model.dropout": "0.0"}
    assert "| pathfinder32 | 1024 | 4 | 1 |" in out.with_suffix(".md").read_text()
