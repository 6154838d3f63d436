"""Activation memory of the shared encoder's training step: plain, ``remat``, reversible
residual layers and chunked feed-forward (Kitaev et al. 2020, "Reformer: The Efficient
Transformer"), read from XLA's compiled memory analysis of the gradient function (nothing is run,
so any backend works, including CPU).

For each layer count it compiles ``grad(loss)`` of an encoder over one batch and reports the
compiled program's temporary buffer size (activations and workspace; parameters, inputs and
outputs are counted separately by XLA). Reversible layers should keep that roughly flat as
layers grow, where plain layers grow linearly. Runs as
``xformers-zoo bench memory`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
from flax import nnx

from xformers_zoo.bench.registry import register_benchmark
from xformers_zoo.configs import ModelConfig, resolve_model_config
from xformers_zoo.layers.encoder import Encoder
from xformers_zoo.variants import VARIANTS

# name -> Encoder keyword overrides
MODES = {
    "plain": {},
    "remat": {"remat": True},
    "reversible": {"reversible": True},
    "ff_chunks": {"ff_chunks": 8},
    "reversible+ff_chunks": {"reversible": True, "ff_chunks": 8},
}


def temp_bytes(args: argparse.Namespace, layers: int, mode: str) -> int:
    """Compiled temporary memory of one gradient evaluation of the encoder."""
    cfg = resolve_model_config(ModelConfig(variant=args.variant))
    enc = Encoder(VARIANTS.get(args.variant), cfg.attention, num_layers=layers,
                  emb_dim=args.emb, qkv_dim=args.emb, mlp_dim=args.mlp, num_heads=args.heads,
                  max_length=args.length, dropout=0.0, attention_dropout=0.0,
                  dtype=jnp.float32, rngs=nnx.Rngs(0), **{"remat": False, **MODES[mode]})
    graphdef, params, rest = nnx.split(enc, nnx.Param, ...)
    x = jax.ShapeDtypeStruct((args.batch, args.length, args.emb), jnp.float32)
    mask = jax.ShapeDtypeStruct((args.batch, args.length), jnp.bool_)

    def loss(params, x, mask):
        out = nnx.merge(graphdef, params, rest)(x, mask, deterministic=True)
        return jnp.mean(out ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(params, x, mask).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


@register_benchmark("memory", help="activation memory: plain, remat, reversible, chunked FFN")
def main(argv: list[str] | None = None) -> int:
    """Prints a Markdown table of compiled temp memory (MiB) per mode and layer count."""
    parser = argparse.ArgumentParser(prog="xformers-zoo bench memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="full")
    parser.add_argument("--layers", default="1,2,4,8", help="comma-separated layer counts")
    parser.add_argument("--modes", default=",".join(MODES), help=f"any of {', '.join(MODES)}")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--emb", type=int, default=128)
    parser.add_argument("--mlp", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args(argv)
    layer_counts = [int(n) for n in args.layers.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")

    print(f"JAX {jax.__version__}, backend {jax.default_backend()} "
          f"({jax.devices()[0].device_kind}), {platform.processor() or platform.machine()}")
    print(f"variant {args.variant}, batch {args.batch}, length {args.length}, emb {args.emb}, "
          f"mlp {args.mlp}, heads {args.heads}, float32; compiled temp memory of grad, MiB\n")
    print("| mode | " + " | ".join(f"{n} layers" for n in layer_counts) + " |")
    print("|---|" + "---:|" * len(layer_counts))
    for mode in modes:
        sizes = [temp_bytes(args, n, mode) / 2**20 for n in layer_counts]
        print(f"| {mode} | " + " | ".join(f"{s:.1f}" for s in sizes) + " |", flush=True)
    return 0

