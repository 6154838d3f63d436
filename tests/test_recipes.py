"""Recipes (``train --recipe``): the stages' configs and who gets each override, then tiny runs:
a later stage starts from the earlier one's best checkpoint, a rerun reuses finished stages
and resumes a stopped one, and a stage whose config changed is refused naming the field."""

import json
import logging
import shutil

import numpy as np
import pytest
from flax import nnx

from xformers_zoo import cli
from xformers_zoo.overrides import ConfigError
from xformers_zoo.recipes import (
    StageConflictError,
    check_stages,
    describe_stages,
    plan_recipe,
    run_stages,
)
from xformers_zoo.registry import UnknownNameError
from xformers_zoo.train import checkpoint
from xformers_zoo.train.warm_start import load_run_model


def flat_params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(v[...])
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_unknown_recipe_lists_the_known_ones(tmp_path, capsys):
    with pytest.raises(UnknownNameError, match=r"unknown recipe 'warmup'; known: curriculum, "
                                               r"self-pretrain"):
        plan_recipe("warmup", "pathx", "full", [], [], tmp_path)
    assert cli.main(["train", "--task", "pathx", "--recipe", "warmup"]) == 2
    assert "known: curriculum, self-pretrain" in capsys.readouterr().err


def test_recipes_refuse_tasks_they_cannot_serve(tmp_path):
    with pytest.raises(ValueError, match=r"two-input task retrieval does not support; tasks it "
                                         r"serves: listops, text, image"):
        plan_recipe("self-pretrain", "retrieval", "full", [], [], tmp_path)
    with pytest.raises(ValueError, match=r"larger than pathfinder64 \(pathx, path256\).*got "
                                         r"--task pathfinder32"):
        plan_recipe("curriculum", "pathfinder32", "full", [], [], tmp_path)


def test_curriculum_stages_share_the_final_tasks_shape(tmp_path):
    stages = plan_recipe("curriculum", "path256", "bigbird", ["lra"], [
        "train.steps=7", "pathfinder64:train.steps=3", "data.train_size=100",
        "model.dropout=0.05"], tmp_path)
    assert [(s.name, s.task, s.workdir.name) for s in stages] == [
        ("pathfinder64", "pathfinder64", "stage1-pathfinder64"), ("pathx", "pathx", "stage2-pathx"),
        ("path256", "path256", "stage3-path256")]
    models = [s.config.model for s in stages]
    # Path-64's base is 4 layers x 4 heads; every stage takes Path-256's 1 x 2.
    assert {(m.variant, m.num_layers, m.num_heads, m.positional, m.dropout) for m in models} == {
        ("bigbird", 1, 2, "learned_2d", 0.05)}
    assert [s.config.train.steps for s in stages] == [3, 500_000, 7]
    assert [s.config.data.train_size for s in stages] == [100] * 3
    assert [s.config.train.init_from for s in stages] == [
        None, str(tmp_path / "stage1-pathfinder64"), str(tmp_path / "stage2-pathx")]
    assert "train.init_from=" + str(tmp_path / "stage1-pathfinder64") in stages[1].command
    # The Path-X stages of a Path-X and a Path-256 curriculum are one run.
    pathx = plan_recipe("curriculum", "pathx", "bigbird", ["lra"], [
        "pathfinder64:train.steps=3", "data.train_size=100", "model.dropout=0.05"], tmp_path)
    assert [s.config for s in pathx] == [s.config for s in stages[:2]]


def test_overrides_the_recipe_fixes_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"stage 1 \(pathfinder64\): model.positional=learned "
                                          r"cannot be given: the recipe sets it to 'learned_2d'"):
        plan_recipe("curriculum", "pathx", "full", [], ["model.positional=learned"], tmp_path)
    with pytest.raises(ConfigError, match=r"stage 2 \(finetune\): train.init_from=runs/a cannot"):
        plan_recipe("self-pretrain", "listops", "full", [], ["train.init_from=runs/a"], tmp_path)
    with pytest.raises(ConfigError, match=r"'pathx64' is not a stage of this recipe "
                                          r"\(pathfinder64, pathx\)"):
        plan_recipe("curriculum", "pathx", "full", [], ["pathx64:train.steps=3"], tmp_path)


def test_self_pretrain_routes_masking_to_its_pretraining_stage(tmp_path):
    pretrain, finetune = plan_recipe("self-pretrain", "listops", "full", ["tiny"], [
        "train.mask_rate=0.3", "train.lr=0.01", "pretrain:train.steps=9"], tmp_path)
    assert (pretrain.config.train.objective, pretrain.config.train.mask_rate,
            pretrain.config.train.lr, pretrain.config.train.steps) == ("masked", 0.3, 0.05, 9)
    assert (finetune.config.train.objective, finetune.config.train.mask_rate,
            finetune.config.train.lr, finetune.config.train.init_from) == (
        "classify", 0.15, 0.01, str(pretrain.workdir))


def test_dry_run_prints_the_stages_and_trains_nothing(tmp_path, capsys):
    workdir = tmp_path / "recipe"
    assert cli.main(["train", "--task", "pathx", "--recipe", "curriculum", "--dry-run",
                     "--workdir", str(workdir), "train.steps=1000"]) == 0
    out = capsys.readouterr().out
    assert "stage 1 pathfinder64: to train" in out and "stage 2 pathx: to train" in out
    assert f"workdir  {workdir / 'stage2-pathx'}" in out
    assert "full: 1 layer x 2 heads" in out and "1000 steps of batch 64" in out
    assert f"from the best checkpoint of {workdir / 'stage1-pathfinder64'}" in out
    assert not workdir.exists()


# Listops at a few hundred short examples: each stage trains in seconds.
TINY = ["model.num_layers=1", "model.emb_dim=32", "model.qkv_dim=32", "model.mlp_dim=64",
        "model.num_heads=2", "data.train_size=128", "data.val_size=32", "data.test_size=32",
        "data.max_length=48", "data.workers=1", "train.batch_size=16", "train.log_every=2",
        "train.checkpoint_every=2", "train.eval_every=2", "train.steps=4",
        "pretrain:train.steps=4", "pretrain:train.eval_every=2", "pretrain:train.log_every=2",
        "pretrain:train.checkpoint_every=2",
        # The fine-tune keeps the weights it starts from (lr 0) and starts another seed, so
        # that its checkpoint shows where it began.
        "train.lr=0", "train.schedule=constant", "train.warmup_steps=0", "train.seed=1"]


def plan(workdir, data_dir, *extra):
    return plan_recipe("self-pretrain", "listops", "full", ["tiny"],
                       [*TINY, f"data.data_dir={data_dir}", *extra], workdir)


@pytest.fixture(scope="module")
def chained(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    stages = plan(root / "run", root / "data")
    results = run_stages(stages, progress=False, echo=lambda line: None)
    return root, stages, results


def test_the_second_stage_starts_from_the_firsts_best_checkpoint(chained):
    _, (pretrain, finetune), (first, second) = chained
    assert (first["objective"], second["objective"]) == ("masked", "classify")
    assert second["steps"] == 4
    source, step, which = load_run_model(pretrain.workdir)
    assert (which, step) == ("best", first["best_step"])
    tuned, _, _ = load_run_model(finetune.workdir)
    want, got = flat_params(source), flat_params(tuned)
    encoder = [k for k in got if k.startswith(("encoder.", "norm"))]
    assert encoder and all(k in want for k in encoder)
    for name in encoder:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # The embedding less the masked run's mask-token row.
    np.testing.assert_array_equal(got["embed.embedding"], want["embed.embedding"][:-1])


def test_a_rerun_reuses_finished_stages_without_training(chained, capsys):
    root, stages, results = chained
    before = {s.name: (s.workdir / "metrics.jsonl").read_bytes() for s in stages}
    again = plan(root / "run", root / "data")
    assert [s.state for s in check_stages(again)] == ["done", "done"]
    assert run_stages(again, progress=False) == results
    assert {s.name: (s.workdir / "metrics.jsonl").read_bytes() for s in again} == before
    assert "stage 2 (finetune): done, reused" in capsys.readouterr().out


def test_the_command_reuses_finished_stages_and_prints_the_final_result(chained, capsys):
    root, stages, results = chained
    assert cli.main(["train", "--task", "listops", "--recipe", "self-pretrain", "--preset",
                     "tiny", "--workdir", str(root / "run"), *TINY,
                     f"data.data_dir={root / 'data'}"]) == 0
    out = capsys.readouterr().out
    assert "stage 1 pretrain (listops): done, reused (test masked-token accuracy" in out
    assert f"self-pretrain ({stages[1].workdir}): test accuracy " in out
    assert json.loads(out[out.index("\n{") + 1:out.rindex("}") + 1]) == results[1]


def test_a_stage_whose_config_changed_is_refused_naming_the_field(chained):
    root, _, _ = chained
    changed = plan(root / "run", root / "data", "pretrain:train.mask_rate=0.3")
    with pytest.raises(StageConflictError, match=r"stage 1 \(pretrain\): .*holds a run of a "
                                                 r"different config \(train.mask_rate: saved "
                                                 r"0.15, given 0.3\)"):
        check_stages(changed)
    with pytest.raises(StageConflictError, match=r"stage 2 \(finetune\).*model.dropout"):
        check_stages(plan(root / "run", root / "data", "finetune:model.dropout=0.2"))
    # More steps for a finished first stage would leave the second started from old weights.
    with pytest.raises(StageConflictError, match=r"stage 2 \(finetune\) in .* already started "
                                                 r"from stage 1 \(pretrain\)"):
        check_stages(plan(root / "run", root / "data", "pretrain:train.steps=6"))


class Stopped(BaseException):
    """Stands for a kill after a checkpoint was written."""


def test_a_stopped_stage_resumes_from_its_checkpoint(chained, monkeypatch, caplog):
    root, stages, results = chained
    workdir = root / "stopped"
    shutil.copytree(stages[0].workdir, workdir / stages[0].workdir.name)
    resumed = plan(workdir, root / "data")

    def stop(phase, step):
        if (phase, step) == ("prune:after", 2):
            raise Stopped

    monkeypatch.setattr(checkpoint, "fault_hook", stop)
    with pytest.raises(Stopped):
        run_stages(resumed, progress=False, echo=lambda line: None)
    monkeypatch.setattr(checkpoint, "fault_hook", None)
    statuses = check_stages(resumed)
    assert [(s.state, s.step) for s in statuses] == [("done", 4), ("resume", 2)]
    assert "stage 2 finetune (listops): resumes from its step-2 checkpoint" in describe_stages(
        "self-pretrain", resumed, statuses)
    with caplog.at_level(logging.INFO, logger="xformers_zoo.train"):
        first, second = run_stages(resumed, progress=False, echo=lambda line: None)
    assert f"resumed {resumed[1].workdir} at step 2" in caplog.text
    assert "initialised from" not in caplog.text
    assert first == results[0] and second["steps"] == 4
    assert json.loads((resumed[1].workdir / "final.json").read_text()) == second


@pytest.mark.slow
def test_the_curriculum_upsamples_pathfinder64s_grid_into_pathx(tmp_path):
    # Linear attention and a handful of images: full attention over Path-X's 16K tokens is
    # slow on a CPU. Path-X trains at lr 0, so its checkpoint holds the weights it started from.
    stages = plan_recipe("curriculum", "pathx", "linear", ["tiny"], [
        "model.num_layers=1", "model.num_heads=2", "model.emb_dim=16", "model.qkv_dim=16",
        "model.mlp_dim=32", "train.batch_size=4", "train.steps=2", "train.eval_every=2",
        "train.checkpoint_every=2", "train.log_every=2", "data.workers=1", "data.train_size=8",
        "data.val_size=4", "data.test_size=4", f"data.data_dir={tmp_path / 'data'}",
        "pathfinder64:train.steps=4", "pathfinder64:train.eval_every=2",
        "pathfinder64:train.batch_size=4", "pathfinder64:train.log_every=2",
        "pathfinder64:train.checkpoint_every=2", "train.lr=0", "train.schedule=constant",
        "train.warmup_steps=0", "train.seed=1"], tmp_path / "run")
    first, second = run_stages(stages, progress=False, echo=lambda line: None)
    assert (first["task"], second["task"], second["steps"]) == ("pathfinder64", "pathx", 2)
    source, step, _ = load_run_model(stages[0].workdir)
    assert step == first["best_step"]
    want, got = flat_params(source), flat_params(load_run_model(stages[1].workdir)[0])
    assert want.keys() == got.keys()
    for name in want.keys() - {"positions.table"}:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert want["positions.table"].shape == (64, 64, 16)
    np.testing.assert_array_equal(got["positions.table"],
                                  want["positions.table"].repeat(2, 0).repeat(2, 1))
