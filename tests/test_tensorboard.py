"""TensorBoard event files beside metrics.jsonl (through tensorboardX, when installed)."""

import struct

import pytest

from xformers_zoo.train.metrics import MetricsLog

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")


def read_scalars(logdir):
    """(tag, step, value) of every scalar in the event files under ``logdir`` (TFRecord framing:
    length, its CRC, the Event proto, its CRC)."""
    out = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_metrics_log_writes_scalars_beside_the_jsonl(tmp_path, monkeypatch):
    monkeypatch.delenv("XFORMERS_ZOO_TENSORBOARD", raising=False)
    log = MetricsLog(tmp_path / "metrics.jsonl", resume_step=None)
    log.write("train", 10, loss=2.5, accuracy=0.25, steps_per_sec=3.0)
    log.write("validation", 20, accuracy=0.5, examples=48)
    log.close()
    scalars = read_scalars(tmp_path)
    assert ("train/loss", 10, 2.5) in scalars and ("validation/accuracy", 20, 0.5) in scalars
    assert ("validation/examples", 20, 48.0) in scalars
    assert not any(tag.endswith(("/time", "/step")) for tag, _, _ in scalars)


def test_tensorboard_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("XFORMERS_ZOO_TENSORBOARD", "0")
    log = MetricsLog(tmp_path / "metrics.jsonl", resume_step=None)
    log.write("train", 10, loss=2.5)
    log.close()
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
