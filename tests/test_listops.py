"""ListOps: generator properties, tokenizer, official TSV reader, TFDS builder without TF."""

import random
import statistics
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from xformers_zoo.configs.base import DataConfig
from xformers_zoo.data import listops


def evaluate_string(source: str) -> int:
    """An independent evaluator of the official rendering: a stack machine over its words."""
    stack: list[list] = []
    for word in source.replace("(", " ").replace(")", " ").split():
        if word.startswith("["):
            stack.append([word])
        elif word in ("]", "X"):
            op, *args = stack.pop()
            value = {"[MIN": min, "[MAX": max, "[SM": lambda a: sum(a) % 10,
                     "[MED": lambda a: int(statistics.median(a))}[op](args)
            if not stack:
                return value
            stack[-1].append(value)
        else:
            if not stack:
                return int(word)
            stack[-1].append(int(word))
    raise AssertionError("unbalanced expression")


def test_generated_examples_respect_bounds_and_labels():
    rows = listops.generate(300, seed=1, max_length=200, workers=1)
    assert len(rows) == 300
    assert len({r[0].tobytes() for r in rows}) == 300  # no duplicates
    for tokens, label in rows:
        assert 50 < len(tokens) < 200
        text = " ".join(listops.VOCAB[t] for t in tokens)
        assert evaluate_string(text) == label


def test_official_rendering_round_trips():
    rng = random.Random(0)
    for _ in range(50):
        try:
            tree, length = listops.sample_tree(rng, 300)
        except listops._TooLongError:
            continue
        text = listops.to_official_string(tree)
        assert evaluate_string(text) == listops.evaluate(tree)
        assert len(listops.tokenize(text)) == length
    assert listops.to_official_string(("[MAX", [2, 9])) == "( ( ( [MAX 2 ) 9 ) ] )"


def test_median_is_floor_of_middle_mean():
    assert listops.evaluate(("[MED", [1, 2, 3, 4])) == 2
    assert listops.evaluate(("[MED", [9, 1, 5])) == 5
    assert listops.evaluate(("[SM", [9, 8, 7])) == 4


def test_generation_is_deterministic_and_independent_of_workers():
    a = listops.generate(200, seed=7, max_length=120, workers=1)
    b = listops.generate(200, seed=7, max_length=120, workers=2)
    c = listops.generate(200, seed=8, max_length=120, workers=1)
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c, strict=True))


def test_full_length_bounds_follow_lra():
    rows = listops.generate(20, seed=0, max_length=2000, workers=1)
    assert all(500 < len(t) < 2000 for t, _ in rows)


def test_tsv_reader_on_official_format(tmp_path):
    path = tmp_path / "basic_train.tsv"
    path.write_text("Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n"
                    "( ( ( ( [SM 3 ) ( ( [MIN 4 ) 6 ) ] ) ) 5 ) ] )\t2\n")
    rows = list(listops.read_tsv(path))
    assert [r[1] for r in rows] == [9, 2]
    assert [listops.VOCAB[t] for t in rows[0][0]] == ["[MAX", "2", "9", "]"]
    assert evaluate_string(" ".join(listops.VOCAB[t] for t in rows[1][0])) == 2


@pytest.mark.parametrize("body, message", [
    ("( [MAX 2 ] )\n", r":2: expected '<expression>\\t<digit 0-9>'"),
    ("( [MAX 2 ] )\t12\n", r":2: expected"),
    ("( [MAXX 2 ] )\t2\n", r":2: unknown ListOps token '\[MAXX'"),
])
def test_tsv_reader_rejects_malformed_lines(tmp_path, body, message):
    path = tmp_path / "basic_val.tsv"
    path.write_text("Source\tTarget\n" + body)
    with pytest.raises(ValueError, match=message):
        list(listops.read_tsv(path))
    path.write_text("Input\tOutput\n")
    with pytest.raises(ValueError, match="expected the header"):
        list(listops.read_tsv(path))


def test_missing_official_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="listops-1000/basic_test.tsv"):
        listops.official_file(str(tmp_path), "test")


def test_builder_builds_and_reads_without_tensorflow(tmp_path):
    """Builds generated and official-format ListOps and reads them back in a fresh process,
    then checks that TensorFlow was never imported."""
    manual = tmp_path / "manual" / "listops-1000"
    manual.mkdir(parents=True)
    for name in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"):
        (manual / name).write_text("Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n"
                                   "( ( ( [MIN 2 ) 9 ) ] )\t2\n")
    script = textwrap.dedent(f"""
        import sys
        from xformers_zoo.configs.base import DataConfig
        from xformers_zoo import data
        cfg = DataConfig(task="listops", data_dir={str(tmp_path / "d")!r}, train_size=40,
                         val_size=5, test_size=6, max_length=64, workers=1)
        src = data.data_source(cfg, "test")
        assert len(src) == 6 and len(data.data_source(cfg, "train")) == 40
        ex = src[0]
        assert ex["inputs"].dtype.name == "uint8" and 16 < len(ex["inputs"]) < 64
        off = DataConfig(task="listops", data_dir={str(tmp_path / "d")!r}, source="official",
                         manual_dir={str(tmp_path / "manual")!r})
        labels = sorted(int(data.data_source(off, "validation")[i]["label"]) for i in range(2))
        assert labels == [2, 9], labels
        batches = list(data.eval_batches(cfg, "test", 4))
        assert [b["weight"].sum() for b in batches] == [4.0, 2.0]
        assert batches[0]["inputs"].shape == (4, 64) and batches[0]["mask"].dtype == bool
        assert "tensorflow" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_train_iterator_state_resumes_exactly(tmp_path):
    from xformers_zoo import data

    cfg = DataConfig(task="listops", data_dir=str(tmp_path), train_size=50, val_size=5,
                     test_size=5, max_length=64, workers=1)
    it = iter(data.train_dataset(cfg, 8, seed=3))
    for _ in range(8):  # crosses an epoch boundary (50 // 8 = 6 batches an epoch)
        next(it)
    state = it.get_state()
    expected = [next(it)["inputs"] for _ in range(3)]
    fresh = iter(data.train_dataset(cfg, 8, seed=3))
    fresh.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["inputs"], want)


def test_prefetching_loader_keeps_order_and_resumes(tmp_path):
    import dataclasses

    from xformers_zoo import data

    cfg = DataConfig(task="listops", data_dir=str(tmp_path), train_size=50, val_size=5,
                     test_size=5, max_length=64, workers=1)
    plain = iter(data.train_dataset(cfg, 8, seed=3))
    want = [next(plain)["inputs"] for _ in range(5)]
    fast = iter(data.train_dataset(dataclasses.replace(cfg, loader_workers=2), 8, seed=3))
    got = [next(fast)["inputs"] for _ in range(3)]
    state = fast.get_state()
    resumed = iter(data.train_dataset(dataclasses.replace(cfg, loader_workers=2), 8, seed=3))
    resumed.set_state(state)
    got += [next(resumed)["inputs"] for _ in range(2)]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_every_process_yields_the_same_number_of_eval_batches(tmp_path, monkeypatch):
    import jax

    from xformers_zoo import data

    cfg = DataConfig(task="listops", data_dir=str(tmp_path), train_size=20, val_size=5,
                     test_size=5, max_length=64, workers=1)
    data.prepare(cfg)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    weights, lengths = [], []
    for rank in (0, 1):  # global batches of 4: rows 0, 1, 4 (+ filler) and 2, 3 (+ fillers)
        monkeypatch.setattr(jax, "process_index", lambda rank=rank: rank)
        batches = list(data.eval_batches(cfg, "validation", 4))
        lengths.append(len(batches))
        weights.append(sum(float(b["weight"].sum()) for b in batches))
    assert lengths == [2, 2] and weights == [3.0, 2.0]


def test_epoch_shuffle_orders_each_epoch_afresh():
    import grain

    from xformers_zoo.data.pipeline import EpochShuffle

    base = grain.MapDataset.source(list(range(10)))
    ds = EpochShuffle(base, seed=3)
    first, second = [ds[i] for i in range(10)], [ds[i] for i in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10))  # each epoch: every example once
    assert first != second and first != list(range(10))
    assert [EpochShuffle(base, seed=3)[i] for i in range(20)] == first + second
    assert [EpochShuffle(base, seed=4)[i] for i in range(10)] != first
    assert [ds[5:8][i] for i in range(3)] == first[5:8]  # slicing keeps the order
