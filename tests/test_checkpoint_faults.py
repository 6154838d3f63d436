"""Crash consistency of the checkpoints: a trainer stopped at every phase of a checkpoint write
(as SIGKILL would stop it) and then resumed reports and scores the same best checkpoint as an
uninterrupted run; a damaged latest checkpoint is named and the newest good one used."""

import json
import subprocess
import sys

import pytest

from xformers_zoo.configs import resolve_config
from xformers_zoo.train import run
from xformers_zoo.train.checkpoint import RunCheckpoints

# Validation improves at steps 10, 20 and 40 with this config (30 ties): step 20 writes a new
# best checkpoint and a latest one, step 30 only a latest one, step 40 is the last.
TINY = {"model.num_layers": 1, "model.emb_dim": 32, "model.qkv_dim": 32, "model.mlp_dim": 64,
        "model.num_heads": 2, "data.train_size": 256, "data.val_size": 48, "data.test_size": 40,
        "data.max_length": 48, "data.workers": 1, "train.batch_size": 16, "train.log_every": 5,
        "train.checkpoint_every": 10, "train.eval_every": 10, "train.steps": 40}
# Every phase of a save with a new best ("latest:before" is "best:after" there).
PHASES = ("best:before", "best:during", "best:after", "latest:during", "latest:after",
          "prune:after")
COMPARED = ("test_accuracy", "test_loss", "best_step", "best_val_accuracy", "steps")

# Runs the trainer and exits with status 9 at the named phase of the save at the given step,
# as SIGKILL would (no cleanup). "<kind>:during" stops once orbax has written the files of
# that checkpoint, before it commits them (renames the temporary folder).
KILLER = """
import json, os, sys
from xformers_zoo.configs import resolve_config
from xformers_zoo.train import checkpoint, run

phase, at, workdir, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])

def hook(name, step):
    if step != at:
        return
    if name == phase:
        os._exit(9)
    if phase.endswith(":during") and name == phase.replace(":during", ":before"):
        from orbax.checkpoint._src.path import atomicity
        atomicity.AtomicRenameTemporaryPath.finalize = lambda self: os._exit(9)

checkpoint.fault_hook = hook
run(resolve_config("listops", "full", presets=["tiny"], overrides=overrides), workdir,
    progress=False)
sys.exit(3)
"""


def tiny_config(data_dir):
    return resolve_config("listops", "full", presets=["tiny"],
                          overrides={**TINY, "data.data_dir": data_dir})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (it also builds the data the other runs share)."""
    data_dir = str(tmp_path_factory.mktemp("data"))
    workdir = tmp_path_factory.mktemp("reference")
    result = run(tiny_config(data_dir), workdir, progress=False)
    assert result["best_step"] == 40
    return data_dir, result, _steps(workdir)


def _steps(workdir):
    checkpoints = RunCheckpoints(workdir)
    steps = checkpoints.latest.all_steps(), checkpoints.best.all_steps()
    checkpoints.close()
    return steps


def _compare(result, expected):
    for key in COMPARED:
        assert result[key] == pytest.approx(expected[key], rel=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("phase,step", [
    # step 40 holds the run's last new best: a kill there must not leave an older one scored
    *((phase, 40) for phase in PHASES),
    # a best that a later one replaces, and a save without a new best
    ("best:during", 20), ("latest:after", 20), ("latest:during", 30)])
def test_kill_at_every_checkpoint_phase_then_resume(reference, tmp_path, phase, step):
    data_dir, expected, expected_steps = reference
    workdir = tmp_path / "run"
    overrides = {**TINY, "data.data_dir": data_dir}
    killed = subprocess.run([sys.executable, "-c", KILLER, phase, str(step), str(workdir),
                             json.dumps(overrides)], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert not (workdir / "final.json").exists()
    if phase.endswith(":during"):  # stopped inside the write: its temporary folder remains
        folder = workdir / ("best" if phase.startswith("best") else "checkpoints")
        assert any("tmp" in p.name for p in folder.iterdir()), list(folder.iterdir())
    result = run(tiny_config(data_dir), workdir, progress=False)
    _compare(result, expected)
    assert json.loads((workdir / "final.json").read_text()) == result
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    tests = [r for r in records if r["split"] == "test"]
    assert len(tests) == 1 and tests[0]["checkpoint_step"] == expected["best_step"]
    assert _steps(workdir) == expected_steps


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    else:  # flip the bits of a run of bytes in the middle
        middle = len(data) // 3
        run_length = max(1, min(16, len(data) // 4))
        damaged = bytearray(data)
        for i in range(middle, middle + run_length):
            damaged[i] ^= 0x5A
        path.write_bytes(bytes(damaged))


def _largest(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# Each kind of file in a checkpoint: the arrays' data (the largest file), the arrays' metadata,
# the array store's manifest, the best-step record and the data-iterator state.
FILES = {"array data": lambda step: _largest(step / "state"),
         "array metadata": lambda step: step / "state" / "_METADATA",
         "array manifest": lambda step: step / "state" / "manifest.ocdbt",
         "best record": lambda step: step / "meta" / "metadata",
         "iterator state": lambda step: step / "data" / "metadata"}


@pytest.fixture(scope="module")
def finished(reference, tmp_path_factory):
    """A finished run's directory and a target state to restore into."""
    from xformers_zoo.train import loop

    data_dir = reference[0]
    workdir = tmp_path_factory.mktemp("finished")
    run(tiny_config(data_dir), workdir, progress=False)
    return workdir, loop._Setup(tiny_config(data_dir)).state


@pytest.mark.parametrize("how", ["truncate", "garble"])
@pytest.mark.parametrize("kind", list(FILES))
def test_damaged_latest_checkpoint_is_named_and_the_older_one_used(finished, tmp_path, caplog,
                                                                    kind, how):
    import shutil

    source, target = finished
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    step_dir = workdir / "checkpoints" / "40"
    item = FILES[kind](step_dir).relative_to(step_dir).parts[0]
    _damage(FILES[kind](step_dir), how)
    checkpoints = RunCheckpoints(workdir)
    with caplog.at_level("WARNING", logger="xformers_zoo.train"):
        state, _, meta = checkpoints.restore_latest(target, repair=True)
    assert int(state.step) == 30 and meta["best"]["step"] == 20
    assert checkpoints.latest.all_steps() == [30] and checkpoints.best.all_steps() == [20]
    checkpoints.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(step_dir / item) in w and "corrupt" in w for w in warnings), warnings
    assert any("newest good checkpoint, step 30" in w for w in warnings), warnings
    assert (workdir / "corrupt" / "checkpoints-40" / item).is_dir()


def test_damaged_best_checkpoint_is_named_never_replaced(finished, tmp_path):
    import shutil

    from xformers_zoo.train import evaluate_run
    from xformers_zoo.train.checkpoint import CheckpointError

    source, _ = finished
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    _damage(_largest(workdir / "best" / "40" / "state"), "garble")
    with pytest.raises(CheckpointError, match=str(workdir / "best" / "40" / "state")):
        evaluate_run(workdir, "test")


@pytest.mark.slow
def test_resume_past_a_damaged_latest_checkpoint_matches_uninterrupted_run(finished, reference,
                                                                             tmp_path):
    import shutil

    source, _ = finished
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    (workdir / "final.json").unlink()
    _damage(_largest(workdir / "checkpoints" / "40" / "state"), "garble")
    result = run(tiny_config(reference[0]), workdir, progress=False)
    _compare(result, reference[1])
