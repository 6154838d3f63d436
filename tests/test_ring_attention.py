"""Ring attention (kernels/ring_attention.py). Against unsharded attention on 8 simulated CPU
devices, forward and q, k, v gradients in float32: dense, key padding (a sequence whose last
device blocks are all padding), causal, a block mask, Longformer- and BigBird-style predicates
(with random tiles), attention dropout, the Pallas kernels in interpret mode, and a whole model
with the option set; the ring with the Triton kernels lowered for CUDA; and the refusals. Those
run in subprocesses (tests/ring_attention_cases.py) because the device count is fixed when JAX
starts. In this process: which device block pairs are skipped, the blockwise passes of each
implementation, and the model option's plumbing on a one-device ``seq`` mesh."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from xformers_zoo.kernels import IMPLEMENTATIONS, BlockMask, dot_product_attention, masks
from xformers_zoo.kernels import predicates as pred
from xformers_zoo.kernels.mask_predicate import dense_mask
from xformers_zoo.kernels.ring_blocks import pair_blocks
from xformers_zoo.overrides import ConfigError
from xformers_zoo.variants import VARIANTS

CASES = Path(__file__).with_name("ring_attention_cases.py")
GROUPS = {
    "core": ["dense", "key_padding_data_parallel", "causal", "block_mask", "lowered_for_cuda",
             "refuse_length",
             "refuse_no_seq_axis", "refuse_tiles", "refuse_cudnn_only"],
    "sparse": ["longformer_predicate", "bigbird_predicate_tiles", "dropout_data_parallel"],
    "pallas_and_model": ["pallas_key_padding", "pallas_longformer_predicate",
                         "model_longformer"],
}
TOLERANCE = 2e-5  # float32 with the matmul precision at highest
_results: dict[str, dict] = {}


def run_group(group: str) -> dict:
    """The case results of one group, computed once per session in a subprocess."""
    if group not in _results:
        proc = subprocess.run([sys.executable, str(CASES), *GROUPS[group]], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _results[group] = json.loads(proc.stdout.strip().splitlines()[-1])
    return _results[group]


def check_close(result: dict) -> None:
    for name, difference in result.items():
        assert difference < TOLERANCE, f"{name} differs by {difference}"


@pytest.mark.parametrize("case", ["dense", "key_padding_data_parallel", "causal", "block_mask"])
def test_ring_equals_unsharded(case):
    check_close(run_group("core")[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", GROUPS["sparse"])
def test_ring_equals_unsharded_with_patterns_and_dropout(case):
    check_close(run_group("sparse")[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", GROUPS["pallas_and_model"])
def test_ring_on_pallas_kernels_and_in_a_model(case):
    check_close(run_group("pallas_and_model")[case])


def test_ring_lowers_for_cuda_with_one_kernel_trio_per_distinct_pair():
    """The Triton-family kernels inside the ring lower for CUDA: n - 1 key/value/mask hops
    forward, as many backward plus n dK/dV hops, and kernels only for the non-empty pairs."""
    result = run_group("core")["lowered_for_cuda"]
    shards = 4
    assert result["transfers"] == 3 * (shards - 1) * 2 + 2 * shards
    assert result["kernels"] == result["expected_kernels"]
    assert result["skipped_pairs"] > 0


@pytest.mark.parametrize("case, message", [
    ("refuse_length", "query length 100 is not divisible by the 8 devices of mesh axis 'seq'; "
                      "accepted: multiples of 8"),
    ("refuse_no_seq_axis", "needs a mesh with a 'seq' axis"),
    ("refuse_tiles", "64x64-token tiles must divide each device's block of 16x16 tokens"),
    ("refuse_cudnn_only", "cudnn: needs an NVIDIA GPU"),
])
def test_ring_refusals(case, message):
    assert message in run_group("core")[case]


def dense_blocks(visible: np.ndarray, shards: int) -> np.ndarray:
    """[shards, shards] of "skip" / "dense" / "partial" from a [q, k] element mask."""
    blocks = visible.reshape(shards, visible.shape[0] // shards, shards, -1).transpose(0, 2, 1, 3)
    seen, full = blocks.any((2, 3)), blocks.all((2, 3))
    return np.where(~seen, "skip", np.where(full, "dense", "partial"))


def kind(pair) -> str:
    if pair.skip:
        return "skip"
    dense = pair.block_mask is None and pair.mask_predicate is None and not pair.causal
    return "dense" if dense else "partial"


@pytest.mark.parametrize("pattern", ["longformer", "bigbird", "block_mask", "causal"])
def test_pairs_skip_exactly_the_empty_device_blocks(pattern):
    length, shards = 512, 8
    predicate = block_mask = None
    causal = pattern == "causal"
    if pattern == "longformer":
        predicate = pred.union(pred.sliding_window(40), pred.global_tokens(16))
    if pattern == "bigbird":
        predicate = pred.union(pred.block_window(32, 1), pred.global_tokens(32)).with_tiles(
            masks.random_blocks(length, 1, 32, seed=0))
    if pattern == "block_mask":
        block_mask = BlockMask(np.random.default_rng(1).random((16, 16)) < 0.1, 32, 32)
    pairs = pair_blocks(shards, length, length, batch=1, heads=1, causal=causal,
                        block_mask=block_mask, predicate=predicate)
    if predicate is not None:
        visible = np.asarray(dense_mask(predicate, 1, 1, length, length))[0, 0]
    elif block_mask is not None:
        visible = block_mask.to_dense(length, length)[0]
    else:
        visible = np.tril(np.ones((length, length), bool))
    want = dense_blocks(visible, shards)
    got = np.array([[kind(p) for p in row] for row in pairs])
    np.testing.assert_array_equal(got, want)
    assert (want == "skip").sum() >= shards  # the pattern does leave blocks out


@pytest.mark.parametrize("name", ["xla", "pallas"])
def test_blockwise_passes_over_two_key_blocks_give_the_whole_gradients(name, monkeypatch):
    """An implementation's forward over two key halves, merged by LSE, and its backward on each
    half given the merged output and LSE, equal attention over all keys and its gradients."""
    monkeypatch.setenv("XFORMERS_ZOO_PALLAS_INTERPRET", "1")
    blockwise = IMPLEMENTATIONS.get(name).blockwise
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, d_out = (jax.random.normal(x, (2, 32, 2, 16), jnp.float32) for x in keys)
    key_mask = jnp.arange(32)[None] < jnp.array([32, 11])[:, None]  # second half empty in row 1
    halves = [slice(0, 16), slice(16, 32)]

    @jax.jit
    def by_halves(q, k, v, d_out):
        parts = [blockwise.forward(q, k[:, s], v[:, s], key_mask=key_mask[:, s])
                 for s in halves]
        lse = jnp.logaddexp(parts[0][1], parts[1][1])
        out = sum(o * jnp.exp(part - lse).transpose(0, 2, 1)[..., None] for o, part in parts)
        grads = [blockwise.backward(q, k[:, s], v[:, s], out, lse, d_out,
                                    key_mask=key_mask[:, s]) for s in halves]
        d_k, d_v = (jnp.concatenate([g[i] for g in grads], axis=1) for i in (1, 2))
        return out, grads[0][0] + grads[1][0], d_k, d_v

    want, vjp = jax.vjp(lambda q, k, v: dot_product_attention(
        q, k, v, key_mask=key_mask, implementation=("xla",)), q, k, v)
    for got, expected in zip(by_halves(q, k, v, d_out), (want, *vjp(d_out)), strict=True):
        np.testing.assert_allclose(got, expected, atol=2e-5)


@pytest.mark.parametrize("variant", ["full", "flash", "local", "longformer", "bigbird",
                                     "sparse-transformer"])
def test_variants_take_the_option_and_need_the_seq_axis(variant):
    """A variant's core with ``sequence_axis`` set, on a one-device ``seq`` mesh (the ring is
    one block), equals the core without it; without such a mesh the call is refused."""
    spec = VARIANTS.get(variant)
    extra = {} if variant in ("full", "flash") else {"block": 16}
    cores = [spec.core(spec.config_cls(implementation=("xla",), sequence_axis=axis, **extra),
                       num_heads=2, head_dim=16, max_length=64, dropout=0.0, rngs=nnx.Rngs(0))
             for axis in ("seq", None)]
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(x, (2, 64, 2, 16), jnp.float32) for x in keys)
    key_mask = jnp.arange(64)[None] < jnp.array([64, 40])[:, None]
    with jax.set_mesh(Mesh(np.array(jax.devices()[:1]), ("seq",))):
        got = cores[0](q, k, v, key_mask, deterministic=True)
    np.testing.assert_allclose(got, cores[1](q, k, v, key_mask, deterministic=True), atol=1e-5)
    with pytest.raises(ValueError, match="needs a mesh with a 'seq' axis"):
        cores[0](q, k, v, key_mask, deterministic=True)


def test_variants_without_the_option_refuse_it():
    from xformers_zoo.configs import resolve_config

    with pytest.raises(ConfigError, match="unknown field 'sequence_axis' in LinformerConfig"):
        resolve_config("listops", "linformer", overrides={"model.attention.sequence_axis": "seq"})
    with pytest.raises(ConfigError, match="sequence_axis must name a mesh axis"):
        resolve_config("listops", "full", overrides={"model.attention.sequence_axis": " "})
