"""The masked-token self-pretraining objective (Amos et al. 2024): span masking, the masked
loss, a tiny pretraining run, and fine-tuning a classifier from it with train.init_from."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xformers_zoo import overrides as cfglib
from xformers_zoo.api import build_model
from xformers_zoo.configs import resolve_config
from xformers_zoo.task_specs import TASKS
from xformers_zoo.train import run
from xformers_zoo.train.loop import RunDirectoryMismatchError, _Setup, compare_run_config
from xformers_zoo.train.metrics import read_metrics
from xformers_zoo.train.objectives import MaskedDenoising, make_objective, span_mask
from xformers_zoo.train.warm_start import (
    WarmStartError,
    load_run_model,
    transfer_params,
    warm_start,
)

TINY = {"model.num_layers": 1, "model.emb_dim": 32, "model.qkv_dim": 32, "model.mlp_dim": 64,
        "model.num_heads": 2, "data.train_size": 256, "data.val_size": 32, "data.test_size": 32,
        "data.max_length": 48, "data.workers": 1, "train.batch_size": 16, "train.log_every": 5,
        "train.warmup_steps": 10}


def runs_of(row: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of True in a 1-D boolean array."""
    edges = np.diff(np.concatenate([[0], row.astype(int), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return list(zip(starts, ends - starts, strict=True))


@pytest.mark.parametrize("span", [1, 4])
def test_span_mask_rate_spans_padding_and_determinism(span):
    lengths = np.arange(100, 500, 2)  # one real length per row, the rest padding
    valid = jnp.asarray(np.arange(500)[None, :] < lengths[:, None])
    hidden = np.asarray(span_mask(jax.random.key(3), valid, 0.15, span))
    assert not (hidden & ~np.asarray(valid)).any()  # padding is never masked
    assert hidden[np.asarray(valid)].mean() == pytest.approx(0.15, abs=0.01)
    for row, length in zip(hidden, lengths, strict=True):
        for start, size in runs_of(row):
            # Whole spans, unless padding cuts the last one.
            assert size >= span or start + size == length, (start, size)
    np.testing.assert_array_equal(hidden, span_mask(jax.random.key(3), valid, 0.15, span))
    assert not np.array_equal(hidden, span_mask(jax.random.key(4), valid, 0.15, span))


def test_corrupt_hides_the_masked_tokens_behind_a_new_id():
    objective = make_objective("masked", TASKS.get("listops"), mask_rate=0.5, mask_span=2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 16, (4, 64)), jnp.int32)
    mask = jnp.ones((4, 64), bool).at[:, 50:].set(False)
    batch = {"inputs": tokens.at[:, 50:].set(0), "mask": mask, "weight": jnp.ones((4,))}
    out = objective.corrupt(batch, jax.random.key(0))
    hidden = np.asarray(out["predict"])
    assert hidden.any() and not hidden[:, 50:].any()
    np.testing.assert_array_equal(np.asarray(out["inputs"])[hidden], 16)  # the vocabulary's size
    np.testing.assert_array_equal(np.asarray(out["inputs"])[~hidden],
                                  np.asarray(batch["inputs"])[~hidden])
    np.testing.assert_array_equal(out["targets"], batch["inputs"])


def test_masked_loss_equals_a_hand_computation():
    objective = MaskedDenoising(vocab_size=3, rate=0.15, span=1)
    logits = jnp.asarray([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0]],
                          [[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]]])
    batch = {"targets": jnp.asarray([[0, 2, 1], [1, 1, 1]]),
             "predict": jnp.asarray([[True, True, False], [True, False, True]]),
             # The second example is padding of a last batch: it must not count.
             "weight": jnp.asarray([1.0, 0.0])}
    loss, sums = objective.loss_and_metrics(logits, batch)
    # Masked positions of example 0: target 0 under logits (2, 0, 0), target 2 under (0, 1, 0).
    first = -np.log(np.exp(2.0) / (np.exp(2.0) + 2.0))
    second = -np.log(1.0 / (2.0 + np.exp(1.0)))
    assert float(loss) == pytest.approx((first + second) / 2, rel=1e-6)
    assert float(sums["count"]) == 2.0 and float(sums["correct"]) == 1.0
    np.testing.assert_allclose(objective.label_counts(logits, batch), [1.0, 0.0, 1.0])


def test_config_refuses_two_input_tasks_and_bad_values():
    with pytest.raises(ValueError, match="train.objective=masked is not supported for the "
                                         "two-input task retrieval"):
        resolve_config("retrieval", overrides={"train.objective": "masked"})
    with pytest.raises(ValueError, match=r"train.mask_rate must be in \(0, 1\), got 1.0"):
        resolve_config("listops", overrides={"train.mask_rate": 1.0})
    with pytest.raises(ValueError, match="TrainConfig.objective: 'denoise' is not accepted"):
        resolve_config("listops", overrides={"train.objective": "denoise"})


def config(data_dir, **overrides):
    values = {**TINY, "data.data_dir": str(data_dir), **overrides}
    return resolve_config("listops", "full", presets=["tiny"], overrides=values)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("masked")
    workdir = root / "pretrain"
    result = run(config(root / "data", **{
        "train.objective": "masked", "train.mask_rate": 0.2, "train.mask_span": 2,
        "train.steps": 40, "train.eval_every": 20, "train.checkpoint_every": 20}),
        workdir, progress=False)
    return root, workdir, result


def test_masked_pretraining_trains_and_reports_masked_accuracy(pretrained):
    _, workdir, result = pretrained
    final = json.loads((workdir / "final.json").read_text())
    assert final == result and final["objective"] == "masked"
    assert 0.0 < final["test_accuracy"] <= 1.0 and final["best_step"] in (20, 40)
    # Counts are masked tokens: about 20% of the real tokens of 32 examples, not 32.
    assert final["test_examples"] > 32
    losses = [r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.15, losses


def test_fine_tune_copies_the_pretrained_encoder(pretrained):
    root, source_dir, _ = pretrained
    tune = config(root / "data", **{"train.init_from": str(source_dir), "train.steps": 4,
                                    "train.eval_every": 4, "train.checkpoint_every": 4})
    setup = _Setup(tune)
    fresh = nnx.merge(setup.graphdef, setup.state.params, setup.state.rest)
    fresh_head = np.asarray(fresh.head.logits.kernel[...])
    state = warm_start(setup.state, setup.graphdef, str(source_dir), setup.mesh)
    source, _, _ = load_run_model(source_dir)
    model = nnx.merge(setup.graphdef, state.params, state.rest)
    # Before any update: the encoder is the pretrained one, the head this run's own.
    np.testing.assert_array_equal(model.encoder.blocks[0].attention.query.kernel[...],
                                  source.encoder.blocks[0].attention.query.kernel[...])
    np.testing.assert_array_equal(model.embed.embedding[...], source.embed.embedding[...][:-1])
    np.testing.assert_array_equal(model.head.logits.kernel[...], fresh_head)
    assert model.token_head is None and model.embed.embedding.shape == (16, 32)
    result = run(tune, root / "tune", progress=False)
    assert result["objective"] == "classify" and result["steps"] == 4
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["test_examples"] == 32


def build(task, objective, length=32):
    cfg = resolve_config(task, "full", presets=["tiny"], overrides={
        "model.num_layers": 1, "model.emb_dim": 16, "model.qkv_dim": 16, "model.mlp_dim": 32,
        "model.num_heads": 2, "model.positional": "learned", "data.max_length": length})
    return build_model(cfg.model, task, max_length=length, objective=objective)


def test_transfer_from_masked_drops_head_and_mask_row():
    moved = transfer_params(build("listops", "masked"), build("listops", "classify"))
    assert moved.trimmed == ["embed.embedding (17, 16) -> (16, 16)"]
    assert moved.fresh and all(p.startswith("head.") for p in moved.fresh)
    assert moved.dropped and all(p.startswith("token_head.") for p in moved.dropped)


@pytest.mark.parametrize("source, target, expected", [
    # A masked run of another vocabulary: the embedding cannot be mapped.
    (("listops", "masked"), ("text", "classify"),
     r"embed.embedding: source \(17, 16\), this run \(257, 16\)"),
    # A classifier has no mask-token row to give a masked run.
    (("listops", "classify"), ("listops", "masked"),
     r"embed.embedding: source \(16, 16\), this run \(17, 16\)"),
    # Pretrained at another length: the 1-D positions do not map.
    (("listops", "masked", 64), ("listops", "classify"),
     r"positions.table: source \(64, 16\), this run \(32, 16\)"),
])
def test_unmappable_checkpoints_are_refused_naming_the_parameter(source, target, expected):
    with pytest.raises(WarmStartError, match=expected) as caught:
        transfer_params(build(*source), build(*target), source_name="runs/masked")
    assert str(caught.value).startswith("runs/masked cannot initialise this model")
    assert "masked-pretrained source (train.objective=masked)" in str(caught.value)


def test_runs_saved_before_the_objective_fields_still_resume(tmp_path):
    cfg = config(tmp_path / "data", **{"train.steps": 4})
    saved = json.loads(json.dumps(cfglib.to_dict(cfg)))
    for name in ("objective", "mask_rate", "mask_span"):
        del saved["train"][name]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert compare_run_config(cfg, tmp_path)
    masked = config(tmp_path / "data", **{"train.steps": 4, "train.objective": "masked"})
    with pytest.raises(RunDirectoryMismatchError,
                       match="train.objective: saved 'classify', given 'masked'"):
        compare_run_config(masked, tmp_path)
