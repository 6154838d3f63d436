"""Warm-starting from another run (``train.init_from``): parameters move by key path, a learned
2-D grid grows by whole factors, other differences are refused by name, and a run started from
a Pathfinder-32 run begins with its best checkpoint's weights."""

import json
import logging

import numpy as np
import pytest
from flax import nnx

from xformers_zoo import overrides as cfglib
from xformers_zoo.api import create_model
from xformers_zoo.configs import TrainConfig, resolve_config
from xformers_zoo.train import run
from xformers_zoo.train.warm_start import WarmStartError, load_run_model, transfer_params

NARROW = {"preset": "tiny", "num_layers": 1, "num_heads": 2, "emb_dim": 16, "qkv_dim": 16,
          "mlp_dim": 32}


def flat_params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(v[...])
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_copies_equal_shapes_and_upsamples_the_2d_grid():
    source = create_model("full", "pathfinder32", seed=0, positional="learned_2d", **NARROW)
    target = create_model("full", "pathfinder64", seed=1, positional="learned_2d", **NARROW)
    moved = transfer_params(source, target)
    assert moved.upsampled == ["positions.table (32, 32, 16) -> (64, 64, 16)"]
    before, after = flat_params(source), flat_params(target)
    nnx.update(target, moved.params)
    got = flat_params(target)
    assert sorted(moved.copied) == sorted(set(got) - {"positions.table"})
    for name in moved.copied:
        np.testing.assert_array_equal(got[name], before[name])
        assert not np.array_equal(after[name], before[name]) or after[name].std() == 0
    grid = before["positions.table"]
    # Each source position covers a 2x2 block of the larger image.
    np.testing.assert_array_equal(got["positions.table"], grid.repeat(2, 0).repeat(2, 1))
    np.testing.assert_array_equal(got["positions.table"][4:6, 8:10], np.broadcast_to(
        grid[2, 4], (2, 2, 16)))


@pytest.mark.parametrize("source, target, expected", [
    (("pathfinder32", {"num_layers": 2}), ("pathfinder32", {}),
     [r"model.num_layers: source 2, this run 1\n",
      r"architecture with: model.num_layers=2 \(or train the source",
      r"encoder.blocks.1.attention.key.kernel: source \(16, 16\), missing in this run"]),
    (("pathfinder32", {}), ("pathfinder32", {"num_heads": 4}),
     [r"model.num_heads: source 2, this run 4\n", r"with: model.num_heads=2 \("]),
    (("pathfinder64", {}), ("pathfinder32", {}),
     [r"positions.table: source \(64, 64, 16\), this run \(32, 32, 16\)"]),
    (("listops", {"positional": "learned", "max_length": 64}),
     ("text", {"positional": "learned", "max_length": 128}),
     [r"embed.embedding: source \(16, 16\), this run \(257, 16\)",
      r"positions.table: source \(64, 16\), this run \(128, 16\)",
      r"task: source listops \(vocabulary 16, 10 classes\), this run text"]),
])
def test_mismatches_are_refused_by_path_with_both_shapes(source, target, expected):
    def build(task, overrides, seed):
        return create_model("full", task, seed=seed,
                            **{**NARROW, "positional": "learned_2d", **overrides})

    with pytest.raises(WarmStartError) as caught:
        transfer_params(build(*source, 0), build(*target, 1), source_name="runs/a")
    message = str(caught.value)
    assert message.startswith("runs/a cannot initialise this model")
    assert "2-D learned positions (model.positional=learned_2d) may differ" in message
    for pattern in expected:
        assert caught.match(pattern), message


def test_source_run_must_exist_and_hold_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no run"):
        load_run_model(tmp_path)
    config = resolve_config("listops", "full", presets=["tiny"])
    (tmp_path / "config.json").write_text(json.dumps(cfglib.to_dict(config)))
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        load_run_model(tmp_path)


def test_init_from_must_name_a_directory():
    with pytest.raises(ValueError, match="train.init_from must name a run directory"):
        TrainConfig(init_from=" ")
    assert resolve_config("pathx", overrides={"train.init_from": "none"}).train.init_from is None


# Linear attention: full attention over Pathfinder-64's 4096 tokens is slow on a CPU.
SMALL = {"model.num_layers": 1, "model.num_heads": 2, "model.emb_dim": 16, "model.qkv_dim": 16,
         "model.mlp_dim": 32, "model.positional": "learned_2d", "train.batch_size": 4,
         "train.log_every": 2, "data.workers": 1, "data.val_size": 4, "data.test_size": 4}


def test_a_run_starts_from_the_source_runs_best_checkpoint(tmp_path, caplog):
    def config(task, **overrides):
        values = {**SMALL, "data.data_dir": str(tmp_path / "data"), **overrides}
        return resolve_config(task, "linear", presets=["tiny"], overrides=values)

    source_dir, target_dir = tmp_path / "p32", tmp_path / "p64"
    run(config("pathfinder32", **{"train.steps": 4, "train.eval_every": 2,
                                  "train.checkpoint_every": 2, "data.train_size": 16}),
        source_dir, progress=False)
    # A zero learning rate keeps the warm-started weights through the run's only steps, so its
    # checkpoint shows the weights it started from.
    target = {"train.steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2,
              "train.lr": 0.0, "train.schedule": "constant", "train.warmup_steps": 0,
              "train.init_from": str(source_dir), "data.train_size": 8}
    with pytest.raises(WarmStartError, match=r"model.num_layers: source 1, this run 2"):
        run(config("pathfinder64", **target, **{"model.num_layers": 2}), target_dir,
            progress=False)
    assert not (target_dir / "config.json").exists()  # the corrected command may take it
    with caplog.at_level(logging.INFO, logger="xformers_zoo.train"):
        run(config("pathfinder64", **target), target_dir, progress=False)
    source, step, which = load_run_model(source_dir)
    best = json.loads((source_dir / "final.json").read_text())["best_step"]
    assert (which, step) == ("best", best)
    target, target_step, _ = load_run_model(target_dir)
    assert target_step == 2
    want, got = flat_params(source), flat_params(target)
    assert want.keys() == got.keys()
    for name in want.keys() - {"positions.table"}:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_array_equal(got["positions.table"],
                                  want["positions.table"].repeat(2, 0).repeat(2, 1))
    assert f"initialised from {source_dir}, best checkpoint at step {best}" in caplog.text
    assert "upsampled: positions.table (32, 32, 16) -> (64, 64, 16)" in caplog.text
