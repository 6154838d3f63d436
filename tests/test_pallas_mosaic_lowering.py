"""The Mosaic GPU kernels lower to Mosaic GPU modules on any machine: tracing and lowering for
the "cuda" platform needs no GPU, and runs the kernels' layout inference, shared-memory
transforms and size checks. This catches on CPU what the ``gpu`` tests would otherwise find
first on the GPU (they check the numbers). Every case lowers with and without attention
dropout (the dropout path adds integer vectors in the accumulator layouts, a global-memory load
and, in the backward, a bigger delta slot in an already full shared memory)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xformers_zoo.kernels import pallas_attention as pallas_module
from xformers_zoo.kernels.pallas_dropout import (
    head_streams,
    keep_mask,
    keep_outer,
    position_words,
    seed_words,
)
from xformers_zoo.kernels.pallas_mosaic_backward import MosaicBackwardPlan, mosaic_backward
from xformers_zoo.kernels.pallas_mosaic_forward import HEAD_DIMS, MosaicPlan, mosaic_forward
from xformers_zoo.kernels.pallas_mosaic_mask import MosaicMask

DROPOUT_RATES = [0.0, 0.1]


def lowered_text(fn, *shapes) -> str:
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def structs(n, head_dim, dtype, lengths):
    x = jax.ShapeDtypeStruct((2, n, 2, head_dim), dtype)
    lse = jax.ShapeDtypeStruct((2, 2, n), jnp.float32)
    return x, lse, (jax.ShapeDtypeStruct((2,), jnp.int32) if lengths else None)


def stream_struct(rate):
    """Dropout stream words of the 2 x 2 (batch, head) pairs, or None without dropout."""
    return jax.ShapeDtypeStruct((4,), jnp.int32) if rate else None


@pytest.mark.parametrize("dropout_rate", DROPOUT_RATES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("lengths", [False, True])
def test_forward_lowers(head_dim, lengths, dropout_rate):
    x, _, ln = structs(256, head_dim, jnp.bfloat16, lengths)
    plan = MosaicPlan(scale=head_dim ** -0.5, mask=MosaicMask(has_lengths=lengths),
                      dropout_rate=dropout_rate)
    text = lowered_text(lambda q, k, v, ln, st: mosaic_forward(q, k, v, ln, plan, st),
                        x, x, x, ln, stream_struct(dropout_rate))
    assert "mosaic_gpu" in text


BACKWARD_CASES = [
    (16, {}), (32, dict(lengths=True)), (64, {}), (64, dict(overlap=False, lengths=True)),
    (64, dict(stagger=False)), (64, dict(stages=3)), (128, {}), (128, dict(lengths=True)),
    (128, dict(consumer_registers=232, producer_registers=40)),
]


@pytest.mark.parametrize("dropout_rate", DROPOUT_RATES)
@pytest.mark.parametrize("head_dim,options", BACKWARD_CASES,
                         ids=[f"d{d}-" + ",".join(map(str, o.items())) for d, o in BACKWARD_CASES])
def test_backward_lowers(head_dim, options, dropout_rate):
    options = dict(options)
    lengths = options.pop("lengths", False)
    x, lse, ln = structs(256, head_dim, jnp.float16, lengths)
    plan = MosaicBackwardPlan(scale=head_dim ** -0.5, mask=MosaicMask(has_lengths=lengths),
                              dropout_rate=dropout_rate, **options)
    backward = lambda q, k, v, o, lse, g, ln, st: mosaic_backward(q, k, v, o, lse, g, ln, plan,
                                                                  st)
    text = lowered_text(backward, x, x, x, x, lse, x, ln, stream_struct(dropout_rate))
    assert "mosaic_gpu" in text


def test_backward_over_shared_memory_is_refused():
    """Four query slots at D = 128 need more than the 227 KB a Hopper SM has."""
    x, lse, _ = structs(512, 128, jnp.bfloat16, False)
    plan = MosaicBackwardPlan(scale=128 ** -0.5, stages=4)
    with pytest.raises(ValueError, match="shared memory"):
        lowered_text(lambda q, k, v, o, lse, g: mosaic_backward(q, k, v, o, lse, g, None, plan),
                     x, x, x, x, lse, x)


def test_dropout_streams_must_match_the_plan():
    q = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
    lse = jnp.zeros((1, 1, 128), jnp.float32)
    streams = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="dropout streams must be given exactly"):
        mosaic_forward(q, q, q, None, MosaicPlan(scale=1.0, dropout_rate=0.1))
    with pytest.raises(ValueError, match="dropout streams must be given exactly"):
        mosaic_backward(q, q, q, q, lse, q, None, MosaicBackwardPlan(scale=1.0), streams)
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\)"):
        mosaic_backward(q, q, q, q, lse, q, None,
                        MosaicBackwardPlan(scale=1.0, dropout_rate=1.0), streams)


def test_position_words_give_the_keep_mask_bit_for_bit():
    """The words the Mosaic kernels read (queries' row words, keys' column words; the backward
    carries the row words as float32 bits beside delta) reproduce ``keep_mask`` exactly."""
    rng, rate, batch, heads, q_len, k_len = jax.random.key(7), 0.3, 2, 3, 70, 50
    rows, cols = position_words(head_streams(seed_words(rng), batch, heads), batch, heads,
                                q_len, k_len)
    assert rows.shape == (batch, heads, q_len) and cols.shape == (batch, heads, k_len)
    carried = jnp.stack([jnp.zeros(rows.shape), jax.lax.bitcast_convert_type(rows, jnp.float32)],
                        axis=2)
    rows_back = jax.lax.bitcast_convert_type(carried[:, :, 1], jnp.int32)
    np.testing.assert_array_equal(np.asarray(rows_back), np.asarray(rows))
    outer = jax.vmap(jax.vmap(lambda r, c: keep_outer(r, c, rate)))
    want = np.asarray(keep_mask(rng, rate, batch, heads, q_len, k_len))
    np.testing.assert_array_equal(np.asarray(outer(rows, cols)), want)
    # The backward's transposed tiles: column words as rows give the transposed decisions.
    np.testing.assert_array_equal(np.asarray(outer(cols, rows)), want.transpose(0, 1, 3, 2))
    assert 0.6 < want.mean() < 0.8


@pytest.mark.parametrize("kernels,dropout_rate,family", [
    (None, 0.0, "mosaic"), (None, 0.1, "triton"), ("mosaic", 0.1, "mosaic"),
    ("triton", 0.1, "triton")])
def test_dropout_takes_mosaic_only_by_name(monkeypatch, kernels, dropout_rate, family):
    """On a Hopper GPU (faked: both families lower for "cuda" on CPU), calls with dropout keep
    the Triton kernels unless ``kernels="mosaic"`` asks for the Mosaic ones (dropout is not in
    ``MOSAIC_VALIDATED`` until the GPU tests pass); the chosen family is what lowers, forward
    and backward, through padding (an unaligned length, a prefix key mask) and the custom
    VJP."""
    assert "dropout" not in pallas_module.MOSAIC_VALIDATED
    monkeypatch.setattr(pallas_module, "_compute_capability", lambda: "9.0")
    n = 200
    key_mask = jnp.arange(n)[None, :] < jnp.array([n, 150])[:, None]

    def loss(q, k, v):
        out = pallas_module.pallas_attention(
            q, k, v, key_mask=key_mask, key_mask_is_prefix=True, interpret=False,
            dropout_rate=dropout_rate, dropout_rng=jax.random.key(0) if dropout_rate else None,
            kernels=kernels)
        return out.astype(jnp.float32).sum()

    x = jax.ShapeDtypeStruct((2, n, 2, 64), jnp.bfloat16)
    text = lowered_text(jax.grad(loss, argnums=(0, 1, 2)), x, x, x)
    mosaic_calls = text.count("custom_call @mosaic_gpu_v2")
    triton_calls = text.count("custom_call @__gpu$xla.gpu.triton")
    # Mosaic: the forward and the fused backward; Triton: forward, dK/dV and dQ launches.
    assert (mosaic_calls, triton_calls) == ((2, 0) if family == "mosaic" else (0, 3))


def test_mosaic_by_name_with_dropout_names_what_it_cannot_serve(monkeypatch):
    monkeypatch.setattr(pallas_module, "_compute_capability", lambda: "9.0")
    q = jnp.zeros((1, 64, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match="Mosaic kernels cannot serve this call: dtype must be"):
        pallas_module.pallas_attention(q, q, q, causal=True, interpret=False, kernels="mosaic",
                                       dropout_rate=0.1, dropout_rng=jax.random.key(0))
