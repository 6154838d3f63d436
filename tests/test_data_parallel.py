"""Data parallelism on simulated CPU devices: the same loss curve, evaluation and checkpoints
on 1, 2, 4 and 8 devices and on two processes, and a run resumed on another device count
continuing the curve it would have had uninterrupted.

The test session itself runs on one device and JAX fixes its device count when it starts, so
the multi-device runs happen in child processes (``--xla_force_host_platform_device_count``).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from xformers_zoo import data
from xformers_zoo.configs.base import DataConfig
from xformers_zoo.train.metrics import read_metrics

# Evaluation every 6 steps scores 48 validation and 44 test examples in global batches of 16:
# the last test batch holds 12 real rows, which do not split over 8 devices.
TINY = {"model.num_layers": 1, "model.emb_dim": 32, "model.qkv_dim": 32, "model.mlp_dim": 64,
        "model.num_heads": 2, "model.dropout": 0.1, "data.train_size": 96,
        "data.val_size": 48, "data.test_size": 44, "data.max_length": 48, "data.workers": 1,
        "train.batch_size": 16, "train.log_every": 1, "train.checkpoint_every": 6,
        "train.eval_every": 6, "train.steps": 12}
DEVICES = 8
# Sequence-parallel runs (data x seq devices) and their one-device reference: mean pooling, so
# that the encoder length (48) splits over the seq axis, and no attention dropout, whose ring
# decisions are not the unsharded ones; 6 steps.
RING = ":model.pooling=mean:model.attention_dropout=0:train.steps=6"
SEQUENCE_PARALLEL = {"8:train.sequence_parallel=2": (4, 2), "8:train.sequence_parallel=8": (1, 8)}
SEQUENCE_PARALLEL_REFUSED = {
    "8:train.sequence_parallel=2": "train.sequence_parallel 2 does not divide the encoder length "
                                   "49 (48 tokens + CLS): use model.pooling=mean (CLS pooling "
                                   "adds a token) and a data.max_length that is a multiple of 2",
    f"8:train.sequence_parallel=3{RING}": "train.sequence_parallel 3 does not divide the 8 "
                                          "devices: use a divisor of 8",
    f"8:train.sequence_parallel=2:model.variant=linear{RING}": (
        "train.sequence_parallel 2: variant 'linear' has no ring attention; accepted: local, "
        "longformer, bigbird, sparse-transformer, full, flash"),
}
# Compiling dominates these runs: XLA's cheapest CPU compilation halves it (every run compared
# is compiled alike).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# Trains the tiny config on the first n of the simulated devices for each run named on the
# command line and writes what each recorded: the metrics (every step) and the final results.
# A run "a+b" trains to step 6 on a devices ("first": its metrics), then resumes in the same
# directory on b devices.
RUNS = """
import importlib, json, sys
import jax
from xformers_zoo.configs import resolve_config
from xformers_zoo.train import loop, run, sharding
from xformers_zoo.train.metrics import read_metrics

# Counts the traced ring attention calls, to tell which runs shard their sequences.
ring_module = importlib.import_module("xformers_zoo.kernels.ring_attention")
ring_calls = [0]
plain_ring = ring_module.ring_attention
def counted_ring(*args, **kwargs):
    ring_calls[0] += 1
    return plain_ring(*args, **kwargs)
ring_module.ring_attention = counted_ring

tmp, cache, overrides, names = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
# Runs on the same devices compile the same steps: compile them once.
jax.config.update("jax_compilation_cache_dir", cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

def train(devices, workdir, **extra):
    loop.data_mesh = lambda **kw: sharding.data_mesh(jax.devices()[:devices], **kw)
    config = resolve_config("listops", "full", presets=["tiny"], overrides={**overrides, **extra})
    return run(config, workdir, progress=False)

out = {}
for name in names:
    workdir, spec = f"{tmp}/{name}", name.split(":")
    counts, extra = [int(n) for n in spec[0].split("+")], dict(a.split("=") for a in spec[1:])
    first, ring_calls[0] = None, 0
    if len(counts) == 2:
        train(counts[0], workdir, **{**extra, "train.steps": 6})
        first = read_metrics(f"{workdir}/metrics.jsonl")
    try:
        final = train(counts[-1], workdir, **extra)
    except ValueError as e:
        out[name] = {"error": str(e)}
        continue
    out[name] = {"final": final, "metrics": read_metrics(f"{workdir}/metrics.jsonl"),
                 "first": first, "ring_calls": ring_calls[0]}
print(json.dumps(out))
"""


def _run_simulated(tmp_path, shared: str, names: list[str]) -> dict:
    """The runs ``names`` (see ``RUNS``) in run directories under ``tmp_path``, with the data
    and the compilation cache in ``shared``."""
    env = {**os.environ,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES} {FAST_COMPILE}"}
    overrides = json.dumps({**TINY, "data.data_dir": f"{shared}/data"})
    out = subprocess.run([sys.executable, "-c", RUNS, str(tmp_path), f"{shared}/cache",
                          overrides, *names],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs compared below, in one child process with 8 simulated devices."""
    tmp = tmp_path_factory.mktemp("dp")
    names = ["1", "2", "4", "8", "8:train.grad_accum=2", "1:train.grad_accum=2",
             "2+1", "8:train.batch_size=12", "8:train.batch_size=16:train.grad_accum=4",
             *(f"{n}{RING}" for n in ("1", *SEQUENCE_PARALLEL)),
             *SEQUENCE_PARALLEL_REFUSED]
    return {"shared": str(tmp), **_run_simulated(tmp, str(tmp), names)}


def _curve(records: list[dict]) -> list[tuple]:
    """(split, step) and the numbers recorded for it, without timings."""
    keys = ("loss", "accuracy", "grad_norm", "lr", "examples", "majority_rate")
    return [((r["split"], r["step"]), [r[k] for k in keys if k in r]) for r in records]


def assert_same_run(got: dict, want: dict) -> None:
    """The same metrics at every step and the same final results, to float32 rounding."""
    got_curve, want_curve = _curve(got["metrics"]), _curve(want["metrics"])
    assert [k for k, _ in got_curve] == [k for k, _ in want_curve]
    for (where, a), (_, b) in zip(got_curve, want_curve, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=str(where))
    for key in ("test_loss", "test_accuracy", "test_examples", "best_step", "best_val_accuracy",
                "steps"):
        assert got["final"][key] == pytest.approx(want["final"][key], rel=2e-5), key


@pytest.mark.parametrize("devices", ["2", "4", "8"])
def test_data_parallel_gives_the_one_device_curve(runs, devices):
    assert runs[devices]["final"]["devices"] == int(devices)
    assert runs[devices]["final"]["test_examples"] == TINY["data.test_size"]
    assert_same_run(runs[devices], runs["1"])


def test_micro_batches_split_over_the_devices(runs):
    assert_same_run(runs["8:train.grad_accum=2"], runs["1:train.grad_accum=2"])


def test_two_device_checkpoint_resumes_on_one_device(runs):
    resumed = runs["2+1"]
    assert resumed["final"]["devices"] == 1
    # The records of the 2-device steps are kept as written (a restart would rewrite them).
    kept = [r for r in resumed["first"] if r["split"] != "test"]
    assert resumed["metrics"][:len(kept)] == kept and kept[-1]["step"] == 6
    assert [r["step"] for r in resumed["metrics"] if r["split"] == "train"] == list(range(1, 13))
    assert_same_run(resumed, runs["1"])


def test_batches_that_do_not_split_are_refused_in_one_line(runs):
    error = runs["8:train.batch_size=12"]["error"]
    assert error == ("train.batch_size 12 does not split over the 8 devices: use a multiple "
                     "of 8")
    error = runs["8:train.batch_size=16:train.grad_accum=4"]["error"]
    assert "16 / train.grad_accum 4 = 4 rows per micro-batch" in error and "\n" not in error


@pytest.mark.parametrize("name", SEQUENCE_PARALLEL)
def test_sequence_parallel_gives_the_one_device_curve(runs, name):
    """Ring attention over a seq axis inside the trainer's step, the batch over data."""
    got, want = runs[name + RING], runs["1" + RING]
    assert got["final"]["devices"] == DEVICES
    assert got["final"]["mesh"] == dict(zip(("data", "seq"), SEQUENCE_PARALLEL[name], strict=True))
    assert got["ring_calls"] > 0 and want["ring_calls"] == 0
    assert_same_run(got, want)


def test_sequence_parallel_refusals_name_the_fix(runs):
    for name, message in SEQUENCE_PARALLEL_REFUSED.items():
        assert runs[name]["error"] == message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_on_one(runs, tmp_path):
    """Two processes of two devices each (``jax.distributed`` through the environment) train
    to step 6; one process of one device resumes to step 12: the one-device curve."""
    workdir = tmp_path / "1"  # where the one-device run below resumes
    overrides = {**TINY, "data.data_dir": f"{runs['shared']}/data", "train.steps": 6}
    command = [sys.executable, "-m", "xformers_zoo", "train", "--task", "listops", "--model",
               "full", "--preset", "tiny", "--workdir", str(workdir), "--no-progress",
               *(f"{k}={v}" for k, v in overrides.items())]
    port = _free_port()
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={
                                  **os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                                  "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(rank),
                                  "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                                               + FAST_COMPILE})
             for rank in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert '"processes": 2' in logs[0] and "test accuracy" not in logs[1]
    assert json.loads((workdir / "final.json").read_text())["devices"] == 4
    kept = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] != "test"]
    resumed = _run_simulated(tmp_path, runs["shared"], ["1"])["1"]
    assert resumed["final"]["devices"] == 1
    assert resumed["metrics"][:len(kept)] == kept and kept[-1]["step"] == 6
    assert_same_run(resumed, runs["1"])


def test_each_process_reads_its_rows_of_the_same_global_batches(tmp_path, monkeypatch):
    cfg = DataConfig(task="listops", data_dir=str(tmp_path), train_size=40, val_size=5,
                     test_size=11, max_length=64, workers=1)
    data.prepare(cfg)

    def per_process(processes: int, read) -> list[list[dict]]:
        monkeypatch.setattr(jax, "process_count", lambda: processes)
        out = []
        for rank in range(processes):
            monkeypatch.setattr(jax, "process_index", lambda rank=rank: rank)
            out.append(read())
        return out

    def train_batches():
        it = iter(data.train_dataset(cfg, 8, seed=1))
        return [next(it) for _ in range(7)]  # crosses an epoch (5 batches)

    def test_batches():
        return list(data.eval_batches(cfg, "test", 8))

    for read in (train_batches, test_batches):
        (whole,) = per_process(1, read)
        for processes in (2, 4):
            parts = per_process(processes, read)
            assert {len(p) for p in parts} == {len(whole)}
            for step, batch in enumerate(whole):
                for key, value in batch.items():
                    joined = np.concatenate([p[step][key] for p in parts])
                    np.testing.assert_array_equal(joined, value, err_msg=f"{key} {step}")
    weights = np.concatenate([b["weight"] for b in per_process(1, test_batches)[0]])
    assert weights.tolist() == [1.0] * 11 + [0.0] * 5
