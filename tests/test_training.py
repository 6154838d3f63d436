"""The trainer end to end on tiny ListOps: training, resume after SIGKILL, the NaN stop,
run-directory checks and evaluation of a saved run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xformers_zoo.configs import resolve_config
from xformers_zoo.train import (
    RunDirectoryMismatchError,
    TrainingDivergedError,
    evaluate_run,
    loop,
    run,
)
from xformers_zoo.train.checkpoint import RunCheckpoints
from xformers_zoo.train.metrics import read_metrics

TINY = {"model.num_layers": 1, "model.emb_dim": 32, "model.qkv_dim": 32, "model.mlp_dim": 64,
        "model.num_heads": 2, "model.dropout": 0.1, "data.train_size": 256,
        "data.val_size": 48, "data.test_size": 40, "data.max_length": 48, "data.workers": 1,
        "train.batch_size": 16, "train.log_every": 5, "train.checkpoint_every": 10,
        "train.eval_every": 20}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def tiny_config(data_dir, **overrides):
    values = {**TINY, "data.data_dir": data_dir, "train.steps": 40, **overrides}
    return resolve_config("listops", "full", presets=["tiny"], overrides=values)


def test_tiny_training_end_to_end(tmp_path, data_dir):
    result = run(tiny_config(data_dir), tmp_path / "run", progress=False)
    assert result["steps"] == 40 and result["test_examples"] == 40
    assert 0.0 <= result["test_accuracy"] <= 1.0 and np.isfinite(result["test_loss"])
    assert 0.0 < result["majority_rate"] <= 1.0
    assert result["best_step"] in (20, 40)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "validation"] == [20, 40]
    assert records[-1]["split"] == "test" and records[-1]["checkpoint_step"] == result["best_step"]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert all(np.isfinite(train_losses)) and len(train_losses) == 8
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["emb_dim"] == 32
    again = evaluate_run(tmp_path / "run", "test")
    assert again["step"] == result["best_step"]
    assert again["accuracy"] == pytest.approx(result["test_accuracy"])


def test_rerun_resumes_and_config_changes_are_refused(tmp_path, data_dir):
    workdir = tmp_path / "run"
    run(tiny_config(data_dir, **{"train.steps": 20}), workdir, progress=False)
    with pytest.raises(RunDirectoryMismatchError, match=r"train.lr: saved 0.05, given 0.1"):
        run(tiny_config(data_dir, **{"train.lr": 0.1}), workdir, progress=False)
    with pytest.raises(RunDirectoryMismatchError, match="train.schedule"):
        run(tiny_config(data_dir, **{"train.schedule": "cosine"}), workdir, progress=False)
    longer = run(tiny_config(data_dir, **{"train.steps": 30}), workdir, progress=False)
    assert longer["steps"] == 30
    steps = [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 30


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    compile_steps = loop.compile_steps

    def poisoned(*args, **kwargs):
        train_step, eval_step = compile_steps(*args, **kwargs)

        def step(state, batch):
            if int(state.step) >= 25:  # from here on the parameters hold NaN
                state = state._replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
            return train_step(state, batch)

        return step, eval_step

    monkeypatch.setattr(loop, "compile_steps", poisoned)
    workdir = tmp_path / "run"
    with pytest.raises(TrainingDivergedError,
                       match=r"loss became nan .*last good checkpoint is step 20"):
        run(tiny_config(data_dir), workdir, progress=False)
    checkpoints = RunCheckpoints(workdir)
    assert checkpoints.latest_step() == 20
    monkeypatch.undo()
    setup = loop._Setup(tiny_config(data_dir))
    state, _, _ = checkpoints.restore_latest(setup.state)
    checkpoints.close()
    assert int(state.step) == 20
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(state.params))


def _cli(workdir, data_dir, steps):
    overrides = {**TINY, "data.data_dir": data_dir, "train.steps": steps,
                 "train.checkpoint_every": 20, "train.eval_every": 100, "train.log_every": 10}
    return [sys.executable, "-m", "xformers_zoo", "train", "--task", "listops", "--model", "full",
            "--preset", "tiny", "--workdir", str(workdir), "--no-progress",
            *(f"{k}={v}" for k, v in overrides.items())]


def test_sigkill_then_rerun_matches_uninterrupted_run(tmp_path, data_dir):
    steps = 160
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_cli(tmp_path / "warm", data_dir, 20), check=True, env=env,
                   capture_output=True)  # builds the data once, outside the timed part
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, data_dir, steps), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [int(p.name) for p in (killed / "checkpoints").glob("*") if p.name.isdigit()]
        if any(40 <= s < steps for s in done):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.json").exists(), "the run ended before it could be killed"
    assert RunCheckpoints(killed).latest_step() < steps

    subprocess.run(_cli(killed, data_dir, steps), check=True, env=env, capture_output=True)
    subprocess.run(_cli(tmp_path / "straight", data_dir, steps), check=True, env=env,
                   capture_output=True)
    resumed = json.loads((killed / "final.json").read_text())
    straight = json.loads((tmp_path / "straight" / "final.json").read_text())
    for key in ("test_accuracy", "test_loss", "best_val_accuracy", "best_step", "steps"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6), key
    train = [[r["loss"] for r in read_metrics(Path(d) / "metrics.jsonl") if r["split"] == "train"]
             for d in (killed, tmp_path / "straight")]
    np.testing.assert_allclose(train[0], train[1], rtol=1e-6)


def test_trainer_refreshes_performer_features(tmp_path, data_dir):
    from xformers_zoo.models.performer import RandomFeatures

    config = resolve_config("listops", "performer", presets=["tiny"], overrides={
        **TINY, "data.data_dir": data_dir, "train.steps": 20,
        "model.attention.redraw_every": 10, "model.attention.num_features": 16})
    run(config, tmp_path / "run", progress=False)
    setup = loop._Setup(config)
    initial = jax.tree.leaves(nnx.state(setup.state.rest, RandomFeatures))
    checkpoints = RunCheckpoints(tmp_path / "run")
    state, _, _ = checkpoints.restore_latest(setup.state)
    checkpoints.close()
    trained = jax.tree.leaves(nnx.state(state.rest, RandomFeatures))
    assert initial and len(initial) == len(trained)
    assert all(not np.allclose(a, b) for a, b in zip(initial, trained, strict=True))
    assert setup.refresh_every == 10


def test_cosine_runs_cannot_change_their_length(tmp_path):
    config = tiny_config("unused", **{"train.schedule": "cosine"})
    loop.check_run_dir(config, tmp_path)
    longer = tiny_config("unused", **{"train.schedule": "cosine", "train.steps": 80})
    with pytest.raises(RunDirectoryMismatchError, match="train.steps: saved 40, given 80"):
        loop.check_run_dir(longer, tmp_path)
