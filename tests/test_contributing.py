"""CONTRIBUTING.md against the code: every path it names exists, and each worked example (a
variant, a task with its data, a kernel implementation, a benchmark) loads, registers and works
(the variant passes the variant contract)."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_variant_contract as contract

import xformers_zoo as xz
from xformers_zoo.bench import BENCHMARKS
from xformers_zoo.configs import resolve_config
from xformers_zoo.data import SOURCES
from xformers_zoo.kernels import IMPLEMENTATIONS, dot_product_attention, xla_attention
from xformers_zoo.task_specs import TASK_CONFIGS

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "CONTRIBUTING.md").read_text()
# A worked example is a python block whose first line is "# <path> (new file)".
EXAMPLES = dict(re.findall(r"```python\n# (\S+) \(new file\)\n(.*?)```", DOC, flags=re.S))
REGISTRIES = (xz.VARIANTS, xz.TASKS, TASK_CONFIGS, SOURCES, IMPLEMENTATIONS, BENCHMARKS)


def test_every_path_it_names_exists():
    named = set(re.findall(r"`([\w./-]+/[\w.-]*|[\w-]+\.(?:md|toml))`", DOC))
    assert {"models/", "configs/", "xformers_zoo/variants.py"} <= named  # the pattern finds them
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"CONTRIBUTING.md names paths that do not exist: {missing}"
    assert len(EXAMPLES) == 5, sorted(EXAMPLES)
    for path in EXAMPLES:  # a new file goes into an existing package and replaces nothing
        assert (ROOT / path).parent.is_dir() and not (ROOT / path).exists(), path


@pytest.fixture
def examples(tmp_path, monkeypatch):
    """Loads every worked example as a module of its own; the registries are restored after."""
    for registry in REGISTRIES:
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    for path, source in EXAMPLES.items():
        name = "contributing_" + path.replace("/", "_").removesuffix(".py")
        file = tmp_path / f"{name}.py"
        file.write_text(source)
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)


@pytest.mark.usefixtures("examples")
def test_the_variant_example_passes_the_contract():
    assert "uniform" in xz.list_models()
    contract.test_shape_and_jit("uniform")
    contract.test_finite_gradients("uniform")
    contract.test_padding_invariance("uniform")
    contract.test_config_is_typed_and_frozen("uniform")


@pytest.mark.usefixtures("examples")
def test_the_task_example_resolves_and_makes_its_data():
    cfg = resolve_config("parity", "full", presets=["tiny"])
    assert cfg.data.task == "parity" and cfg.data.max_length == 128
    assert resolve_config("parity", "full").data.train_size == 4_000  # from the spec
    rows = list(SOURCES.get("parity").examples("validation", cfg.data))
    assert len(rows) == cfg.data.val_size
    _, example = rows[0]
    assert example["inputs"].shape == (128,) and set(np.unique(example["inputs"])) <= {1, 2}
    assert example["label"] == int((example["inputs"] == 2).sum() % 2)


@pytest.mark.usefixtures("examples")
def test_the_kernel_example_matches_the_reference():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 16, 2, 8))
    key_mask = jnp.arange(16)[None, :] < jnp.array([[10], [16]])
    got = dot_product_attention(q, k, v, key_mask=key_mask, implementation=("einsum",))
    np.testing.assert_allclose(got, xla_attention(q, k, v, key_mask=key_mask), atol=1e-5)
    reason = IMPLEMENTATIONS.get("einsum").rejects
    assert reason(attention_call(causal=True)) and reason(attention_call()) is None


def attention_call(**changes):
    from xformers_zoo.kernels import AttentionCall

    return AttentionCall(**{**dict(backend="cpu", dtype="float32", batch=1, q_len=8, k_len=8,
                                   num_heads=1, head_dim=8, has_key_mask=False,
                                   block_mask=None, causal=False, dropout_rate=0.0), **changes})


@pytest.mark.usefixtures("examples")
def test_the_benchmark_example_runs_from_the_registry(tmp_path):
    assert BENCHMARKS.get("matmul").main(["--sizes", "32", "--out", str(tmp_path / "mm")]) == 0
    (row,) = json.loads((tmp_path / "mm.json").read_text())["rows"]
    assert row["n"] == 32 and row["tflops"] > 0
    assert "| 32 |" in (tmp_path / "mm.md").read_text()
