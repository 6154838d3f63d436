"""Bad input found before anything is written, one-line errors for it, and the small cases of
the trainer's reliability: config ranges, run and data directory errors, the override grammar of
every subcommand, the divergence message, unreadable final.json files in a table, and folders
that reading a run must not leave behind."""

import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import pytest

from xformers_zoo import cli, data
from xformers_zoo import overrides as cfglib
from xformers_zoo.configs import resolve_config
from xformers_zoo.configs.base import DataConfig
from xformers_zoo.data import listops
from xformers_zoo.train import TrainingDivergedError, evaluate_run, loop, run
from xformers_zoo.train.tables import load_results

TINY = {"model.num_layers": 1, "model.emb_dim": 16, "model.qkv_dim": 16, "model.mlp_dim": 32,
        "model.num_heads": 2, "data.train_size": 64, "data.val_size": 16, "data.test_size": 16,
        "data.max_length": 32, "data.workers": 1, "train.batch_size": 16, "train.steps": 4,
        "train.log_every": 2, "train.eval_every": 4, "train.checkpoint_every": 4}


def tiny_config(data_dir, **overrides):
    return resolve_config("listops", "full", presets=["tiny"],
                          overrides={**TINY, "data.data_dir": str(data_dir), **overrides})


@pytest.mark.parametrize("task,override,message", [
    ("listops", {"train.lr": -1}, "train.lr must be 0 or more, got -1"),
    ("listops", {"train.lr": math.nan}, "train.lr must be 0 or more"),
    ("listops", {"train.adam_eps": 0}, "train.adam_eps must be positive"),
    ("listops", {"train.grad_clip": 0}, "train.grad_clip must be positive"),
    ("listops", {"train.eval_batches": 0}, "train.eval_batches must be positive"),
    ("listops", {"train.warmup_steps": -1}, "train.warmup_steps must be 0 or more"),
    ("listops", {"train.weight_decay": -0.1}, "train.weight_decay must be 0 or more"),
    ("listops", {"train.adam_b2": 1.0}, r"train.adam_b2 must be in \[0, 1\)"),
    ("listops", {"train.steps": 0}, "train.steps must be positive"),
    ("listops", {"data.train_size": 0}, "data.train_size must be positive, got 0"),
    ("listops", {"data.test_size": -5}, "data.test_size must be positive"),
    ("listops", {"data.max_length": 4}, "data.max_length of listops must be at least 8"),
    ("listops", {"data.workers": -1}, "data.workers must be 0 or more"),
    ("listops", {"data.data_dir": " "}, "data.data_dir must name a folder"),
    ("image", {"data.max_length": 100}, "data.max_length of image must be 1024"),
])
def test_config_values_are_checked_when_the_config_is_made(task, override, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(task, "full", overrides=override)
    with pytest.raises(ValueError, match=message):  # the Python API's dataclasses too
        cfglib.replace(resolve_config(task, "full"), override)


def test_bad_value_on_the_command_line_is_one_line_and_writes_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    code = cli.main(["train", "--preset", "tiny", "--workdir", str(workdir), "train.lr=-1"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "error: train.lr must be 0 or more, got -1.0"
    assert not workdir.exists()


@pytest.mark.parametrize("layout,message", [
    ("file", "is a file; it must be a folder"),
    ("under a file", "cannot be made: .* is a file, not a folder"),
    ("read-only", "is not writable .*needs write permission"),
])
def test_unusable_run_directory_is_one_line(tmp_path, capsys, monkeypatch, layout, message):
    (tmp_path / "file").write_text("x")
    workdir = {"file": tmp_path / "file", "under a file": tmp_path / "file" / "run",
               "read-only": tmp_path / "ro" / "run"}[layout]
    if layout == "read-only":
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        if os.geteuid() == 0:  # root may write anywhere: have the check see what others would
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(
                tmp_path / "ro") else real(p, mode))
    code = cli.main(["train", "--preset", "tiny", "--workdir", str(workdir),
                     f"data.data_dir={tmp_path / 'data'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(workdir) in err
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "data").exists()


def test_official_rows_longer_than_max_length_leave_the_run_dir_unclaimed(tmp_path):
    manual = tmp_path / "manual" / "listops-1000"
    manual.mkdir(parents=True)
    long_row = listops.to_official_string(("[MAX", list(range(10))))  # 12 tokens
    for name in listops.OFFICIAL_FILES.values():
        (manual / name).write_text("Source\tTarget\n" + f"{long_row}\t9\n" * 20)
    workdir = tmp_path / "run"
    overrides = {"data.source": "official", "data.manual_dir": str(tmp_path / "manual"),
                 "data.max_length": 8, "data.train_size": 20, "data.val_size": 20,
                 "data.test_size": 20}
    with pytest.raises(ValueError, match=r"listops train example train-\d+ has 12 tokens, more "
                                         r"than data.max_length=8"):
        run(tiny_config(tmp_path / "data", **overrides), workdir, progress=False)
    assert not (workdir / "config.json").exists()
    assert not list((tmp_path / "data").rglob("incomplete.*"))
    # the corrected command claims the directory
    loop.check_run_dir(tiny_config(tmp_path / "data", **{**overrides, "data.max_length": 16}),
                       workdir)
    assert (workdir / "config.json").exists()


def test_divergence_before_any_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    compile_steps = loop.compile_steps

    def poisoned(*args, **kwargs):
        train_step, eval_step = compile_steps(*args, **kwargs)

        def step(state, batch):
            state = state._replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
            return train_step(state, batch)

        return step, eval_step

    monkeypatch.setattr(loop, "compile_steps", poisoned)
    with pytest.raises(TrainingDivergedError, match="by step 2; stopped. There is no "
                                                    "checkpoint yet.") as caught:
        run(tiny_config(tmp_path / "data"), tmp_path / "run", progress=False)
    assert "None" not in str(caught.value)


def test_reading_a_run_leaves_no_empty_checkpoint_folders(tmp_path):
    source = tmp_path / "source"
    loop.check_run_dir(tiny_config(tmp_path / "data"), source)  # a run with no checkpoint yet
    with pytest.raises(FileNotFoundError, match="has no best checkpoint yet"):
        evaluate_run(source, "test")
    target = tmp_path / "target"
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        run(tiny_config(tmp_path / "data", **{"train.init_from": str(source)}), target,
            progress=False)
    assert sorted(p.name for p in source.iterdir()) == ["config.json"]
    assert not target.exists()


def test_every_subcommand_takes_overrides_anywhere(tmp_path, capsys):
    args = cli.parse_args(["train", "a.b=1", "--preset", "tiny", "c.d=2", "--no-progress"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.preset == ["tiny"]
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "--preset", "tiny", "stray"])
    with pytest.raises(SystemExit):
        cli.parse_args(["models", "a.b=1"])  # takes no overrides
    capsys.readouterr()
    code = cli.main(["data", "prepare", "listops", "--preset", "tiny", "data.train_size=30",
                     f"data.data_dir={tmp_path}", "data.val_size=5", "data.test_size=6",
                     "data.workers=1", "data.max_length=32"])
    assert code == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):]) == {"train": 30, "validation": 5, "test": 6}
    # a build says how long each split took to generate
    assert "listops train: 30 examples generated in" in out and "listops: built in" in out


def test_verbose_logs_at_info_level(tmp_path, capsys):
    # a warning logged while the parser was built must not turn --verbose into a no-op
    logging.warning("a library logging before the command line is parsed")
    code = cli.main(["-v", "data", "prepare", "listops", "--preset", "tiny",
                     "data.train_size=20", f"data.data_dir={tmp_path}", "data.val_size=5",
                     "data.test_size=5", "data.workers=1", "data.max_length=32"])
    assert code == 0
    assert "INFO xformers_zoo.data: preparing listops/" in capsys.readouterr().err


def test_table_skips_an_unreadable_final_json_naming_it(tmp_path, caplog):
    good, cut = tmp_path / "good", tmp_path / "cut"
    good.mkdir()
    cut.mkdir()
    record = {"task": "listops", "variant": "full", "test_accuracy": 0.5}
    (good / "final.json").write_text(json.dumps(record))
    (cut / "final.json").write_text(json.dumps(record)[:20])
    with caplog.at_level("WARNING", logger="xformers_zoo.train"):
        assert load_results([good, cut]) == [record]
    assert any(str(cut / "final.json") in r.getMessage() for r in caplog.records)


def test_a_killed_builds_incomplete_folder_is_removed_by_the_next(tmp_path):
    config = DataConfig(task="listops", data_dir=str(tmp_path), train_size=20, val_size=5,
                        test_size=5, max_length=32, workers=1)
    builder = data.dataset_builder(config)
    stale = builder.data_path.parent / "incomplete.ABC123_1.0.0"
    (stale / "partial").mkdir(parents=True)
    data.prepare(config)
    assert not stale.exists() and builder.is_prepared()
