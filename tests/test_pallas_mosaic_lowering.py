"""The Mosaic GPU kernels lower to Mosaic GPU modules on any machine: tracing and lowering for
the "cuda" platform needs no GPU, and runs the kernels' layout inference, shared-memory
transforms and size checks. This catches on CPU what the ``gpu`` tests would otherwise find
first on the GPU (they check the numbers)."""

import jax
import jax.numpy as jnp
import pytest

from xformers_zoo.kernels.pallas_mosaic_backward import MosaicBackwardPlan, mosaic_backward
from xformers_zoo.kernels.pallas_mosaic_forward import HEAD_DIMS, MosaicPlan, mosaic_forward


def lowered_text(fn, *shapes) -> str:
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def structs(n, head_dim, dtype, lengths):
    x = jax.ShapeDtypeStruct((2, n, 2, head_dim), dtype)
    lse = jax.ShapeDtypeStruct((2, 2, n), jnp.float32)
    return x, lse, (jax.ShapeDtypeStruct((2,), jnp.int32) if lengths else None)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("lengths", [False, True])
def test_forward_lowers(head_dim, lengths):
    x, _, ln = structs(256, head_dim, jnp.bfloat16, lengths)
    plan = MosaicPlan(scale=head_dim ** -0.5, has_lengths=lengths)
    text = lowered_text(lambda q, k, v, ln: mosaic_forward(q, k, v, ln, plan), x, x, x, ln)
    assert "mosaic_gpu" in text


BACKWARD_CASES = [
    (16, {}), (32, dict(lengths=True)), (64, {}), (64, dict(overlap=False, lengths=True)),
    (64, dict(stagger=False)), (64, dict(stages=3)), (128, {}), (128, dict(lengths=True)),
    (128, dict(consumer_registers=232, producer_registers=40)),
]


@pytest.mark.parametrize("head_dim,options", BACKWARD_CASES,
                         ids=[f"d{d}-" + ",".join(map(str, o.items())) for d, o in BACKWARD_CASES])
def test_backward_lowers(head_dim, options):
    options = dict(options)
    lengths = options.pop("lengths", False)
    x, lse, ln = structs(256, head_dim, jnp.float16, lengths)
    plan = MosaicBackwardPlan(scale=head_dim ** -0.5, has_lengths=lengths, **options)
    backward = lambda q, k, v, o, lse, g, ln: mosaic_backward(q, k, v, o, lse, g, ln, plan)
    text = lowered_text(backward, x, x, x, x, lse, x, ln)
    assert "mosaic_gpu" in text


def test_backward_over_shared_memory_is_refused():
    """Four query slots at D = 128 need more than the 227 KB a Hopper SM has."""
    x, lse, _ = structs(512, 128, jnp.bfloat16, False)
    plan = MosaicBackwardPlan(scale=128 ** -0.5, stages=4)
    with pytest.raises(ValueError, match="shared memory"):
        lowered_text(lambda q, k, v, o, lse, g: mosaic_backward(q, k, v, o, lse, g, None, plan),
                     x, x, x, x, lse, x)
