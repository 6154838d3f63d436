"""Honest baselines. cuDNN is called plainly without a key mask and with sequence lengths for a
mask or for lengths it must pad; checked on CPU through the dispatcher, with
``jax.nn.dot_product_attention``'s cuDNN call replaced by its XLA implementation of the same
arguments. The ``full`` variant reaches the plain call for tasks without padding; the bench names
both cuDNN rows, and its PyTorch peers are skipped with a reason where PyTorch is missing."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xformers_zoo.bench.torch_peers import (
    DENSE_PEERS,
    SPARSE_PEER,
    run_peers,
    window_global_visible,
)
from xformers_zoo.kernels import (
    AttentionCall,
    describe_choice,
    dot_product_attention,
    masks,
    xla_attention,
)


def gpu_call(**changes) -> AttentionCall:
    facts = dict(backend="gpu", dtype="bfloat16", batch=2, q_len=256, k_len=256, num_heads=2,
                 head_dim=64, has_key_mask=False, block_mask=None, causal=False,
                 dropout_rate=0.0, key_mask_is_prefix=True)
    return AttentionCall(**(facts | changes))


@pytest.mark.parametrize("changes,form", [
    ({}, "plain"),
    (dict(causal=True), "plain"),
    (dict(has_key_mask=True), "lengths"),
    (dict(q_len=200, k_len=200), "lengths"),  # padded to 256: the padding is masked by lengths
    (dict(k_len=320), "plain"),
])
def test_dispatcher_names_the_cudnn_form(changes, form):
    assert describe_choice(gpu_call(**changes), ("cudnn", "xla")) == f"cudnn ({form})"


def test_dispatcher_passes_over_cudnn_for_what_it_cannot_serve():
    assert describe_choice(gpu_call(dropout_rate=0.1), ("cudnn", "xla")) == "xla"
    assert describe_choice(gpu_call(backend="cpu"), ("cudnn", "xla")) == "xla"


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
    """Makes the dispatcher see a GPU and records every cuDNN call's keyword arguments, running
    it with JAX's XLA implementation instead."""
    calls = []
    real = jax.nn.dot_product_attention

    def recorded(*args, implementation=None, **kwargs):
        assert implementation == "cudnn"
        calls.append(kwargs)
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", recorded)
    return calls


def inputs(n, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (2, n, 2, 32), jnp.float32).astype(jnp.bfloat16) for k in keys]


@pytest.mark.parametrize("n,masked,with_lengths", [(128, False, False), (128, True, True),
                                                   (100, False, True), (100, True, True)])
def test_cudnn_call_form_and_result(cudnn_on_cpu, n, masked, with_lengths):
    q, k, v = inputs(n)
    key_mask = (jnp.arange(n)[None, :] < jnp.array([n, n // 3])[:, None]) if masked else None
    got = dot_product_attention(q, k, v, key_mask=key_mask, implementation=("cudnn",),
                                key_mask_is_prefix=True)
    (kwargs,) = cudnn_on_cpu
    assert ("key_value_seq_lengths" in kwargs) == with_lengths
    assert ("query_seq_lengths" in kwargs) == with_lengths
    want = xla_attention(q, k, v, key_mask=key_mask)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-2)


def classifier(task_name: str):
    from xformers_zoo.configs.base import ModelConfig
    from xformers_zoo.models.classifier import Classifier
    from xformers_zoo.models.full import FullConfig
    from xformers_zoo.task_specs import TASKS

    config = ModelConfig(variant="full", attention=FullConfig(implementation=("cudnn", "xla")),
                         num_layers=1, emb_dim=32, qkv_dim=32, mlp_dim=32, num_heads=2,
                         dtype="bfloat16", pooling="mean", positional="sinusoidal")
    return Classifier(config, TASKS.get(task_name), max_length=64, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("task,with_lengths", [("image", False), ("text", True)])
def test_full_variant_calls_cudnn_plainly_without_padding(cudnn_on_cpu, task, with_lengths):
    """Image tasks have no padding: the full variant gets no key mask and cuDNN no lengths.
    Text is padded: lengths."""
    model = classifier(task)
    tokens = jnp.ones((2, 64), jnp.int32)
    model(tokens, jnp.ones((2, 64), bool))
    assert cudnn_on_cpu and all(("key_value_seq_lengths" in c) == with_lengths
                                for c in cudnn_on_cpu)


def test_cores_without_no_mask_support_get_an_all_true_mask():
    from xformers_zoo.layers.attention import MultiHeadAttention
    from xformers_zoo.variants import VARIANTS

    seen = []
    for name, wants_none in (("full", True), ("linear", False)):
        spec = VARIANTS.get(name)
        layer = MultiHeadAttention(spec, spec.config_cls(), emb_dim=16, qkv_dim=16, num_heads=2,
                                   max_length=8, dropout=0.0, dtype=jnp.float32,
                                   rngs=nnx.Rngs(0))
        core = layer.core

        def spy(q, k, v, key_mask, *, deterministic, rngs=None, core=core):
            seen.append(key_mask)
            return core(q, k, v, key_mask, deterministic=deterministic, rngs=rngs)

        layer.core = spy
        layer(jnp.ones((2, 8, 16)), None, deterministic=True)
        assert (seen[-1] is None) == wants_none
        if not wants_none:
            assert seen[-1].shape == (2, 8) and bool(seen[-1].all())


def test_bench_rows_name_both_cudnn_calls():
    from xformers_zoo.bench.kernel_impls import IMPLS

    assert {"cudnn", "cudnn-lengths"} <= set(IMPLS)
    assert DENSE_PEERS == ("torch-cudnn", "torch-flex") and SPARSE_PEER == "torch-flex-sparse"


def test_bench_times_mosaic_dropout_beside_triton_dropout():
    """``--dropout-rate`` adds a Mosaic-kernel dropout row beside pallas's (Triton) one; without
    dropout the by-name Mosaic row would repeat ``pallas`` and is left out."""
    from xformers_zoo.bench.kernels import _variants, parse_args

    impls = ["pallas", "pallas_mosaic", "cudnn"]
    plain = _variants(parse_args(["--impls", *impls]))
    assert plain == [("pallas", 0.0), ("cudnn", 0.0)]
    dropped = _variants(parse_args(["--impls", *impls, "--dropout-rate", "0.1"]))
    assert dropped == plain + [("pallas", 0.1), ("pallas_mosaic", 0.1)]


def test_bench_times_mosaic_block_sparse_beside_triton():
    """The block-sparse table times the Mosaic kernels by name beside ``pallas`` (which gives
    block masks to the Triton kernels until the Mosaic mask path is validated on a GPU)."""
    from xformers_zoo.bench.kernels import _sparse_variants, parse_args

    rows = _sparse_variants(parse_args(["--impls", "pallas", "pallas_mosaic"]))
    assert rows == [("pallas", None, 0.0), ("pallas_mosaic", None, 0.0)]
    assert _sparse_variants(parse_args(["--impls", "pallas"])) == [("pallas", None, 0.0)]


@pytest.mark.parametrize("window", [128, 512, 2048])
def test_flex_mask_mod_is_the_bench_pattern(window):
    n, block = 2048, 128
    want = masks.union(masks.sliding_window(n, window, block),
                       masks.global_tokens(n, 2, block)).to_dense(n, n)
    idx = np.arange(n)
    got = window_global_visible(idx[:, None], idx[None, :], window=window, block=block,
                                global_tiles=2)
    np.testing.assert_array_equal(got, np.asarray(want).reshape(n, n))


def test_torch_peers_skip_with_a_reason_when_torch_is_absent(tmp_path):
    """A Python where ``import torch`` fails: no rows, no crash, the reason is returned."""
    blocker = tmp_path / "torch.py"
    blocker.write_text("raise ImportError('torch blocked for this test')\n")
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={tmp_path} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    rows, about, reason = run_peers([(1024, 64, 16, 16)], sparse_shape=(16384, 64, 1, 16),
                                    windows=[512], python=str(python), timeout=60)
    assert rows == [] and about is None
    assert "PyTorch is not importable" in reason and "blocked for this test" in reason


def test_bench_report_says_why_torch_rows_are_missing(tmp_path):
    from xformers_zoo.bench.kernel_report import write_markdown

    row = dict(n=1024, d=64, batch=16, heads=16, impl="cudnn", fwd_ms=1.0, fwd_tflops=1.0,
               fwd_bwd_ms=3.0, fwd_bwd_tflops=1.0)
    report = dict(device="cpu", jax=jax.__version__, command="bench", dtype="bfloat16",
                  ceilings=dict(matmul_tflops=1.0, copy_gbps=1.0), dense=[row], sparse=[],
                  torch=dict(about=None, skipped="PyTorch is not importable (no torch)"))
    write_markdown(report, tmp_path / "r.md")
    assert "PyTorch peer rows skipped: PyTorch is not importable" in (tmp_path / "r.md").read_text()
    report["torch"] = dict(about=dict(torch="2.11", cuda="12.8", cudnn=91000), skipped=None)
    report["dense"].append(row | {"impl": "torch-cudnn"})
    write_markdown(report, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "PyTorch 2.11, CUDA 12.8" in text and "| torch-cudnn |" in text



def test_torch_peer_rows_land_beside_their_shape(monkeypatch):
    """Peer rows come back as seconds and bytes; the bench turns them into rows like the JAX
    ones and puts each after the rows of its shape (dense) or window (block-sparse)."""
    from xformers_zoo.bench import kernels as bench_kernels

    def fake_run_peers(shapes, *, peers, sparse_shape, windows, **_):
        rows = [dict(impl=p, n=n, d=d, batch=b, heads=h, fwd_seconds=1e-3, fwd_bytes=1 << 20,
                     fwd_bwd_error="RuntimeError: no kernel")
                for n, d, b, h in shapes for p in peers]
        rows += [dict(impl=SPARSE_PEER, n=sparse_shape[0], d=sparse_shape[1],
                      batch=sparse_shape[2], heads=sparse_shape[3], window=w,
                      fwd_seconds=1e-4, fwd_bytes=1, fwd_bwd_seconds=3e-4, fwd_bwd_bytes=2)
                 for w in windows]
        return rows, dict(torch="2.11"), None

    monkeypatch.setattr(bench_kernels, "run_peers", fake_run_peers)
    args = bench_kernels.parse_args(["--seq-lens", "1024", "2048", "--head-dims", "64",
                                     "--windows", "512", "1024", "--torch-windows", "512",
                                     "1024"])
    ceil = dict(matmul_tflops=100.0, copy_gbps=100.0)
    report = dict(
        dense=[dict(impl="cudnn", n=n, d=64, batch=16384 // n, heads=16) for n in (1024, 2048)],
        sparse=[dict(impl="pallas-sparse", n=16384, d=64, batch=1, heads=16, window=w,
                     density=w / 16384) for w in (512, 1024)])
    bench_kernels.add_torch_peers(args, ceil, report)
    assert [(r["n"], r["impl"]) for r in report["dense"]] == [
        (1024, "cudnn"), (1024, "torch-cudnn"), (1024, "torch-flex"),
        (2048, "cudnn"), (2048, "torch-cudnn"), (2048, "torch-flex")]
    assert [(r["window"], r["impl"]) for r in report["sparse"]] == [
        (512, "pallas-sparse"), (512, SPARSE_PEER), (1024, "pallas-sparse"), (1024, SPARSE_PEER)]
    flex = report["dense"][2]
    assert flex["fwd_ms"] == pytest.approx(1.0) and flex["fwd_bytes"] == 1 << 20
    assert "fwd_bwd_ms" not in flex and flex["fwd_bwd_error"].startswith("RuntimeError")
    sparse = report["sparse"][1]
    # TFLOP/s of block-sparse rows count the computed tiles only, as for the pallas rows.
    assert sparse["fwd_tflops"] == pytest.approx(4 * 16 * 16384**2 * 64 * 512 / 16384 / 1e-4
                                                 / 1e12)
    assert report["torch"] == dict(about=dict(torch="2.11"), skipped=None)


@pytest.mark.gpu
@pytest.mark.parametrize("n,masked", [(1024, False), (1024, True), (1000, False)])
def test_gpu_cudnn_forms_match_the_float64_reference(n, masked):
    """Both cuDNN calls, forward and gradients, on the GPU."""
    from test_pallas_attention import reference, rel_err

    from xformers_zoo.kernels.cudnn import cudnn_attention

    q, k, v, d_out = inputs(n) + inputs(n, seed=1)[:1]
    key_mask = (jnp.arange(n)[None, :] < jnp.array([n, n // 3])[:, None]) if masked else None
    attend = lambda q, k, v: cudnn_attention(q, k, v, key_mask=key_mask)
    out, vjp = jax.vjp(attend, q, k, v)
    want_out, want_grads = reference(q, k, v, d_out, key_mask=key_mask)
    assert rel_err(out, want_out) < 2e-2
    for name, got, want in zip("qkv", vjp(d_out), want_grads, strict=True):
        assert rel_err(got, want) < 2e-2, f"d{name}"
