"""A tiny training run on every LRA task other than ListOps (test_training covers it): official
formats from fixtures written here, Pathfinder generated, through the one trainer with no
per-task code. Pathfinder-64, Path-X and Path-256 use linear attention: full attention over 4K,
16K and 64K tokens is too slow or too large for a CPU test."""

import archive_fixtures as fixtures
import numpy as np
import pytest

from xformers_zoo.configs import resolve_config
from xformers_zoo.task_specs import TASKS
from xformers_zoo.train import run
from xformers_zoo.train.metrics import read_metrics

SMALL = {"model.num_layers": 1, "model.num_heads": 2, "model.emb_dim": 16, "model.qkv_dim": 16,
         "model.mlp_dim": 32, "train.batch_size": 4, "train.steps": 4, "train.eval_every": 4,
         "train.checkpoint_every": 4, "train.log_every": 2, "train.warmup_steps": 2,
         "data.workers": 1, "data.train_size": 16, "data.val_size": 8, "data.test_size": 8}


def write_text_fixture(root, rng):
    reviews = {part: [(fixtures.random_text(rng, 10, 120), i % 2) for i in range(n)]
               for part, n in (("train", 20), ("test", 10))}
    fixtures.write_imdb(root, reviews)


def write_retrieval_fixture(root, rng):
    fixtures.write_aan(root, {split: [(i % 2, fixtures.random_text(rng, 5, 80),
                                       fixtures.random_text(rng, 5, 80)) for i in range(n)]
                              for split, n in (("train", 20), ("validation", 8), ("test", 8))})


def write_image_fixture(root, rng):
    fixtures.write_cifar(root, rng, per_batch=4, n_test=8)  # 18 train, 2 validation, 8 test


CASES = {
    "text": (write_text_fixture, {"data.max_length": 64}),
    "retrieval": (write_retrieval_fixture, {"data.max_length": 32}),
    "image": (write_image_fixture, {"data.val_size": 2}),
    "pathfinder32": (None, {}),
    "pathfinder64": (None, {"model.variant": "linear", "data.train_size": 8, "data.val_size": 4,
                            "data.test_size": 4}),
    "pathx": (None, {"model.variant": "linear", "data.train_size": 8, "data.val_size": 4,
                     "data.test_size": 4}),
    "path256": (None, {"model.variant": "linear", "train.batch_size": 2, "data.train_size": 4,
                       "data.val_size": 2, "data.test_size": 2}),
}


def test_every_task_has_a_case():
    assert set(CASES) == set(TASKS.names()) - {"listops"}


@pytest.mark.parametrize("task", list(CASES))
def test_tiny_training(task, tmp_path):
    write_fixture, overrides = CASES[task]
    manual = tmp_path / "manual"
    manual.mkdir()
    if write_fixture is not None:
        write_fixture(manual, np.random.default_rng(0))
    values = {**SMALL, "data.data_dir": str(tmp_path / "data"), "data.manual_dir": str(manual),
              **overrides}
    config = resolve_config(task, "full", presets=["tiny"], overrides=values)
    result = run(config, tmp_path / "run", progress=False)
    assert result["steps"] == 4
    assert result["test_examples"] == values["data.test_size"]
    assert 0.0 <= result["test_accuracy"] <= 1.0 and np.isfinite(result["test_loss"])
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
              if r["split"] == "train"]
    assert len(losses) == 2 and np.isfinite(losses).all()
