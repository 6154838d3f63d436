"""``xformers-zoo sweep`` on tiny ListOps: finished cells are skipped, a killed cell resumes to
the same result as an uninterrupted one, a failing cell does not stop the others, and the dry
run probes each cell; plus the cell grid, GPU detection and the schedule estimate."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from xformers_zoo.overrides import ConfigError
from xformers_zoo.train import sweep_cells
from xformers_zoo.train.sweep_plan import cell_seconds, makespan
from xformers_zoo.train.sweep_runner import Job, detect_gpus, gpu_groups, job_env, run_jobs

TINY = ["model.num_layers=1", "model.emb_dim=32", "model.qkv_dim=32", "model.mlp_dim=64",
        "model.num_heads=2", "data.train_size=256", "data.val_size=48", "data.test_size=40",
        "data.max_length=48", "data.workers=1", "train.batch_size=16", "train.log_every=10"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "XFORMERS_ZOO_TENSORBOARD": "0"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def sweep(sweep_dir, data_dir, *args, steps=40, **popen):
    command = [sys.executable, "-m", "xformers_zoo", "sweep", "--tasks", "listops", "--preset",
               "tiny", "--dir", str(sweep_dir), "--status-every", "2", *args, *TINY,
               f"data.data_dir={data_dir}", f"train.steps={steps}", "train.eval_every=20",
               "train.checkpoint_every=20"]
    if popen:
        return subprocess.Popen(command, env=ENV, **popen)
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)


def test_make_cells_scopes_overrides_and_names_run_dirs(tmp_path):
    cells = sweep_cells.make_cells(tmp_path, ["listops", "pathfinder32"], ["full", "performer"],
                                   [0, 1], ["tiny"], ["train.steps=7", "listops:train.lr=0.1",
                                                      "performer:model.attention.num_features=8"])
    assert len(cells) == 8 and cells[0].workdir == tmp_path / "listops-full-seed0"
    by_name = {c.name: c for c in cells}
    assert by_name["listops-performer-seed1"].overrides == (
        "train.steps=7", "train.lr=0.1", "model.attention.num_features=8", "train.seed=1")
    assert by_name["pathfinder32-full-seed0"].overrides == ("train.steps=7", "train.seed=0")
    config = by_name["listops-performer-seed1"].config()
    assert (config.train.seed, config.train.lr, config.model.attention.num_features) == (1, 0.1, 8)
    with pytest.raises(ConfigError, match="'nosuch' is neither a task"):
        sweep_cells.make_cells(tmp_path, ["listops"], ["full"], [0], [], ["nosuch:train.lr=1"])


def test_half_written_final_json_is_not_finished(tmp_path):
    (tmp_path / "final.json").write_text('{"test_accuracy": 0.5, "steps"')
    assert sweep_cells.read_final(tmp_path) is None
    (tmp_path / "final.json").write_text(json.dumps(
        {"test_accuracy": 0.5, "steps": 10, "best_val_accuracy": 0.4}))
    assert sweep_cells.read_final(tmp_path)["steps"] == 10


def test_gpu_detection_and_memory_share(monkeypatch):
    assert detect_gpus("0") == [] and detect_gpus("3") == ["0", "1", "2"]
    assert detect_gpus("1,3") == ["1", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert detect_gpus() == ["4", "5"]
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    env = job_env("5", 4)
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.225"
    assert "CUDA_VISIBLE_DEVICES" not in job_env(None, 2)


def test_each_cell_sees_its_own_group_of_gpus(tmp_path):
    assert gpu_groups(["0", "1", "2", "3"], 2) == ["0,1", "2,3"]
    assert gpu_groups(["0", "1"], 1) == ["0", "1"] and gpu_groups([], 1) == []
    with pytest.raises(ValueError, match=r"--gpus-per-cell 2 does not divide the 3 GPUs"):
        gpu_groups(["0", "1", "2"], 2)
    with pytest.raises(ValueError, match="needs GPUs, and none were found"):
        gpu_groups([], 2)
    show = [sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"]
    jobs = run_jobs([Job(f"j{i}", show, tmp_path / f"j{i}.log") for i in range(3)],
                    gpu_groups(["0", "1", "2", "3"], 2), 1, poll=0.05)
    seen = [job.log.read_text().splitlines()[-1] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0]
    assert sorted(seen[:2]) == ["0,1", "2,3"] and seen[2] in ("0,1", "2,3")


def test_gpus_per_cell_that_does_not_divide_is_refused(tmp_path, capsys):
    from xformers_zoo.train.sweep import main

    code = main(["--tasks", "listops", "--models", "full", "--dir", str(tmp_path), "--gpus",
                 "3", "--gpus-per-cell", "2"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --gpus-per-cell 2 does not divide the 3 GPUs (0,1,2): use a divisor of 3 or "
        "name the GPUs with --gpus")


def test_schedule_estimate():
    assert makespan([4, 3, 2, 1], 2) == 5 and makespan([5, 1], 4) == 5
    probe = {"train_steps": 100, "steps_per_sec": 10.0, "eval_every": 50,
             "eval_batches_per_eval": 4, "test_batches": 2, "seconds_per_eval_batch": 0.5}
    # 50 steps left: 5 s of training, 2 evaluations of 4 batches and the test's 2 batches
    assert cell_seconds(probe, 50) == pytest.approx(5 + (8 + 2) * 0.5)


@pytest.mark.slow
def test_failing_cell_is_isolated_and_finished_cells_are_skipped(tmp_path, data_dir):
    args = ["--models", "full", "performer", "--parallel", "2",
            "performer:train.init_from=/nonexistent/run"]
    first = sweep(tmp_path, data_dir, *args)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "FAILED listops-performer-seed0: exit code 2" in first.stdout
    assert "/nonexistent/run" in first.stdout  # the end of the failed cell's log
    assert "1 of 2 cells not finished: listops-performer-seed0" in first.stdout
    final = json.loads((tmp_path / "listops-full-seed0" / "final.json").read_text())
    assert final["steps"] == 40
    log = (tmp_path / "listops-full-seed0" / "train.log").read_text()

    again = sweep(tmp_path, data_dir, "--models", "full")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "listops-full-seed0                       finished" in again.stdout
    assert "start listops-full-seed0" not in again.stdout
    assert (tmp_path / "listops-full-seed0" / "train.log").read_text() == log
    manifest = json.loads((tmp_path / "sweep.json").read_text())  # cells of both commands
    assert [c["name"] for c in manifest["cells"]] == ["listops-full-seed0",
                                                       "listops-performer-seed0"]
    assert len(manifest["commands"]) == 2


def _checkpoint_steps(workdir):
    return [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]


@pytest.mark.slow
def test_killed_cell_resumes_to_the_uninterrupted_result(tmp_path, data_dir):
    steps = 100
    killed = tmp_path / "killed"
    cell = killed / "listops-full-seed0"
    proc = sweep(killed, data_dir, "--models", "full", steps=steps, start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(40 <= s < steps for s in _checkpoint_steps(cell)):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its training process
    proc.wait()
    assert not (cell / "final.json").exists(), "the cell ended before it could be killed"

    resumed = sweep(killed, data_dir, "--models", "full", steps=steps)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (cell / "train.log").read_text().count("=== ") == 2  # the same run dir, rerun
    straight = sweep(tmp_path / "straight", data_dir, "--models", "full", steps=steps)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    a = json.loads((cell / "final.json").read_text())
    b = json.loads((tmp_path / "straight" / "listops-full-seed0" / "final.json").read_text())
    for key in ("test_accuracy", "test_loss", "best_val_accuracy", "best_step", "steps"):
        assert a[key] == pytest.approx(b[key], rel=1e-6), key


@pytest.mark.slow
def test_dry_run_lists_cells_and_estimates_time(tmp_path, data_dir):
    result = sweep(tmp_path, data_dir, "--models", "full", "linear", "--dry-run",
                   "--probe-steps", "2", "--probe-seconds", "0", "--parallel", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("listops-full-seed0", "listops-linear-seed0"):
        assert f"  {name}" in result.stdout
        row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {name} |"))
        steps_left, rate = row.split("|")[2:4]
        assert int(steps_left) == 40 and float(rate) > 0
    assert "2 cells:" in result.stdout and "at --parallel 2" in result.stdout
    assert not (tmp_path / "listops-full-seed0").exists()  # nothing trained


def test_time_limit_stops_before_starting(tmp_path, data_dir, capsys):
    from xformers_zoo.train.sweep import main

    code = main(["--tasks", "listops", "--models", "full", "--preset", "tiny", "--dir",
                 str(tmp_path), "--stop-after", "0", f"data.data_dir={data_dir}"])
    out = capsys.readouterr().out
    assert code == 3, out
    assert "listops-full-seed0                       stopped: time limit reached" in out
    assert not (tmp_path / "listops-full-seed0").exists()
