"""Attention implementations without a partitioning rule (the Pallas kernels, in interpret mode
here) under a jit whose batch is sharded over 8 simulated CPU devices (kernels/batch_shards.py):
each device runs the kernels on its own rows, no q, k, v are gathered, and the output, the
gradients and the dropout decisions are the unsharded call's. The device count is fixed when JAX
starts, so the sharded calls run in a child process."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from xformers_zoo.kernels.batch_shards import batch_axes

CASES = r"""
import json, os, re
os.environ["XFORMERS_ZOO_PALLAS_INTERPRET"] = "1"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from xformers_zoo.kernels import dot_product_attention
from xformers_zoo.kernels import predicates as pred

jax.config.update("jax_default_matmul_precision", "highest")
DEVICES = np.array(jax.devices())
MESHES = {"data": Mesh(DEVICES, ("data",)),
          "data_x_seq": Mesh(DEVICES.reshape(4, 2), ("data", "seq"))}


def case(mesh_name, batch):
    # Gradients of sum(out * d_out) through the Pallas kernels with a key mask and dropout.
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, d_out = (jax.random.normal(x, (batch, 64, 2, 16)) for x in keys)
    lengths = jnp.array([64, 30, 64, 7, 64, 50, 64, 64, 64, 64][:batch])
    mask = jnp.arange(64)[None] < lengths[:, None]

    def loss(q, k, v, d_out, mask, rng):
        out = dot_product_attention(q, k, v, key_mask=mask, implementation=("pallas",),
                                    dropout_rate=0.2, dropout_rng=rng, key_mask_is_prefix=True)
        return (out * d_out).sum(), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    rng = jax.random.key(3)
    (_, want), want_grads = step(q, k, v, d_out, mask, rng)
    mesh = MESHES[mesh_name]
    # The rows over every mesh axis (as the kernels will run), or replicated when they do not split.
    rows = NamedSharding(mesh, P(mesh.axis_names) if batch % mesh.size == 0 else P())
    args = [jax.device_put(x, rows) for x in (q, k, v, d_out, mask)]
    with jax.set_mesh(mesh):
        (_, out), grads = step(*args, rng)
        hlo = step.lower(*args, rng).compile().as_text()
    return {
        "differences": [float(jnp.abs(a - b).max())
                        for a, b in zip((out, *grads), (want, *want_grads), strict=True)],
        "all_gather": "all-gather" in hlo,
        "q_shapes": sorted(set(re.findall(r"f32\[(\d+),64,2,16\]", hlo))),
    }


def refusal():
    # A predicate of the batch index would see each device's local indices.
    q = jax.device_put(jnp.ones((8, 64, 2, 16)), NamedSharding(MESHES["data"], P("data")))
    by_row = pred.MaskPredicate(lambda b, h, i, j: j <= i + b)
    with jax.set_mesh(MESHES["data"]):
        try:
            jax.jit(lambda q: dot_product_attention(q, q, q, implementation=("pallas",),
                                                    mask_predicate=by_row))(q)
        except ValueError as e:
            return str(e)
    return None


print(json.dumps({"data": case("data", 8), "data_x_seq": case("data_x_seq", 8),
                  "uneven": case("data", 6), "refusal": refusal()}))
"""


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", CASES], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["data", "data_x_seq"])
def test_pallas_runs_on_each_devices_rows(results, mesh):
    """8 rows over 8 devices (every mesh axis splits the batch): the compiled program holds q,
    k, v and gradients of one row only (the whole batch's shape appears nowhere) and gathers
    nothing; output and q, k, v gradients are the unsharded call's, dropout included."""
    got = results[mesh]
    assert got["q_shapes"] == ["1"]
    assert not got["all_gather"]
    assert max(got["differences"]) < 2e-5, got["differences"]


def test_a_batch_the_devices_do_not_split_runs_whole(results):
    """6 rows over 8 devices: replicated, the unsharded result."""
    assert max(results["uneven"]["differences"]) < 2e-5


def test_a_predicate_of_the_batch_index_is_refused(results):
    assert results["refusal"] == (
        "attention: the mask predicate reads the batch index, which differs per device when "
        "mesh axes ('data',) split the batch; accepted: predicates of (head, query, key) only")


def test_batch_axes_are_those_that_divide_the_batch():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "seq"))
    assert batch_axes(mesh, 8) == ()  # size-1 axes split nothing
    abstract = jax.sharding.AbstractMesh((4, 2), ("data", "seq"))
    assert batch_axes(abstract, 8) == ("data", "seq")
    assert batch_axes(abstract, 8, exclude=("seq",)) == ("data",)
    assert batch_axes(abstract, 6) == ()
