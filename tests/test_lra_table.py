"""The LRA accuracy table of a sweep directory, built from fixture runs: seeds aggregated, the
published numbers beside each cell, half-written and unfinished runs left out and named, tasks
without data pointing at the command; CSV/JSON outputs, learning curves and the LRA chart."""

import json

import pytest

from xformers_zoo.cli import main
from xformers_zoo.configs.published_lra import LRA_ACCURACY, published
from xformers_zoo.train import lra_table


def fixture_run(root, name, task, variant, seed, accuracy, steps=100, final=True):
    workdir = root / name
    workdir.mkdir(parents=True)
    config = {"data": {"task": task}, "model": {"variant": variant},
              "train": {"seed": seed, "steps": steps}}
    (workdir / "config.json").write_text(json.dumps(config))
    records = [{"split": "train", "step": s, "loss": 2.0 - s / 100} for s in (50, 100)]
    records += [{"split": "validation", "step": s, "accuracy": accuracy - 0.05 + s / 2000}
                for s in (50, 100)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records)
                                           + '{"split": "tr')  # a line cut short by a kill
    if final:
        (workdir / "final.json").write_text(json.dumps({
            "test_accuracy": accuracy, "best_val_accuracy": accuracy, "steps": steps,
            "best_step": steps, "steps_per_sec": 10.0, "peak_memory_bytes": 2**30}))
    return workdir


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "sweep"
    for seed, acc in enumerate((0.36, 0.38, 0.37)):
        fixture_run(root, f"listops-full-seed{seed}", "listops", "full", seed, acc)
    fixture_run(root, "pathfinder32-full-seed0", "pathfinder32", "full", 0, 0.70)
    fixture_run(root, "listops-performer-seed0", "listops", "performer", 0, 0.18)
    half = fixture_run(root, "pathfinder32-performer-seed0", "pathfinder32", "performer", 0, 0.9)
    (half / "final.json").write_text('{"test_accuracy": 0.9, "ste')  # cut short
    fixture_run(root, "listops-linear-seed0", "listops", "linear", 0, 0.2, final=False)
    short = fixture_run(root, "listops-linear-seed1", "listops", "linear", 1, 0.2, steps=200)
    final = json.loads((short / "final.json").read_text())
    (short / "final.json").write_text(json.dumps({**final, "steps": 150}))
    (root / "sweep.json").write_text(json.dumps({"cells": [
        {"name": "listops-full-seed0"}, {"name": "listops-sinkhorn-seed0"}]}))
    return root


def test_table_aggregates_seeds_and_leaves_out_unfinished_runs(sweep_dir):
    runs, ignored = lra_table.collect(sweep_dir)
    table = lra_table.build_table(runs, ignored, str(sweep_dir))
    rows = {r["variant"]: r for r in table["rows"]}
    assert list(rows) == ["full", "performer"]
    listops = rows["full"]["cells"]["listops"]
    assert listops["mean"] == pytest.approx(37.0) and listops["std"] == pytest.approx(1.0)
    assert listops["n"] == 3 and listops["seeds"] == [0, 1, 2]
    assert listops["paper"] == LRA_ACCURACY["full"]["listops"] == 36.37
    average = rows["full"]["average"]
    assert average["tasks"] == ["listops", "pathfinder32"]
    assert average["mean"] == pytest.approx((37.0 + 70.0) / 2)
    assert average["paper"] == pytest.approx((36.37 + 71.40) / 2)
    assert rows["performer"]["cells"]["pathfinder32"].get("mean") is None
    notes = "\n".join(table["ignored"])
    assert "pathfinder32-performer-seed0: final.json incomplete" in notes
    assert "listops-linear-seed0: no final.json" in notes
    assert "listops-linear-seed1: final.json at step 150 of 200" in notes
    assert "listops-sinkhorn-seed0: no run yet" in notes
    assert set(table["needs_data"]) == {"text", "retrieval", "image"}
    assert "data.manual_dir=/path/holding/aclImdb_v1.tar.gz" in table["needs_data"]["text"]
    text = lra_table.markdown(table)
    assert "| full | 37.00 ± 1.00 (n=3) / 36.37 | needs data.manual_dir |" in text
    assert "pathfinder32-performer-seed0" in text


def test_published_numbers_fall_back_to_flashattention():
    assert published("performer", "pathfinder32") == 77.05
    assert published("flash", "listops") == 37.6 and published("flash", "pathx") == 61.4
    assert published("nystromformer", "listops") is None


def test_table_command_writes_outputs_curves_and_chart(sweep_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    speed = {"device": "test", "batch_size": 32, "rows": [
        {"variant": "full", "length": 4096, "status": "ok", "steps_per_sec": 2.0,
         "peak_bytes": 8 * 2**30},
        {"variant": "performer", "length": 4096, "status": "ok", "steps_per_sec": 9.0,
         "peak_bytes": 2**30},
        {"variant": "linear", "length": 4096, "status": "oom"}]}
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    out = tmp_path / "out" / "lra"
    assert main(["table", str(sweep_dir), "--out", str(out), "--curves", str(tmp_path / "c"),
                 "--speed", str(tmp_path / "speed.json"), "--chart",
                 str(tmp_path / "chart.png")]) == 0
    assert "| variant | listops |" in capsys.readouterr().out
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["variant"] for r in saved["rows"]] == ["full", "performer"]
    csv_lines = out.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0] == "variant,task,mean,std,n,seeds,paper"
    assert "full,listops,37.0,1.0,3,0 1 2,36.37" in csv_lines
    assert out.with_suffix(".md").read_text().startswith("| variant |")
    for png in (tmp_path / "c" / "curves_listops.png", tmp_path / "c" / "curves_pathfinder32.png",
                tmp_path / "chart.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no variant has both"):
        from xformers_zoo.train.lra_plots import lra_chart

        lra_chart(saved, speed, 1024, tmp_path / "none.png")


def test_run_directories_still_give_the_per_run_table(sweep_dir, capsys):
    assert main(["table", str(sweep_dir / "listops-full-seed0")]) == 0
    assert "| task | variant |" in capsys.readouterr().out
