"""The LRA classifier: embeddings, the shared encoder with a variant's attention, pooling and
the classifier head; two-sequence tasks (Retrieval) run one shared encoder on both sequences and
classify [u, v, u*v, u-v] (Tay et al. 2020). For self-pretraining (Amos et al. 2024) the same
model predicts masked tokens instead: its embedding holds one more row, the mask token, and a
per-token head over the vocabulary replaces the classifier head."""

from __future__ import annotations

import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from xformers_zoo.configs.base import ModelConfig
from xformers_zoo.layers.embeddings import make_positions
from xformers_zoo.layers.encoder import Encoder
from xformers_zoo.layers.heads import ClassifierHead, MaskedTokenHead, dual_features, pool
from xformers_zoo.task_specs import TaskSpec
from xformers_zoo.variants import VARIANTS

# Names a config may give ``model.dtype``, with the dtype each stands for.
COMPUTE_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
# What the model is trained to output (``train.objective``): the task's labels, or the tokens
# hidden by masking.
OBJECTIVES = ("classify", "masked")


def encoder_length(config: ModelConfig, max_length: int) -> int:
    """Tokens the encoder attends over: ``max_length``, plus the CLS token with CLS pooling."""
    return max_length + (config.pooling == "cls")


class Classifier(nnx.Module):
    """Sequence classifier for any registered variant.

    Args:
      config: the model section; ``config.attention`` must already hold the variant's config
        (``xformers_zoo.configs.resolve_model_config`` fills it).
      task: the task's metadata (vocabulary, classes, image shape, one or two inputs).
      max_length: tokens per input sequence (the task's length unless overridden).
      rngs: parameter initialisation keys.
      objective: "classify" (logits over classes) or "masked" (logits over the vocabulary at
        every token; token id ``task.vocab_size`` is the mask token).
    """

    def __init__(self, config: ModelConfig, task: TaskSpec, *, max_length: int, rngs: nnx.Rngs,
                 objective: str = "classify"):
        spec = VARIANTS.get(config.variant)
        dtype = COMPUTE_DTYPES[config.dtype]
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; accepted: {', '.join(OBJECTIVES)}")
        if objective == "masked" and task.two_inputs:
            raise ValueError(f"the masked objective is not supported for the two-input task "
                             f"{task.name}; accepted there: classify")
        self.config, self.task, self.max_length = config, task, max_length
        self.objective = objective
        masked = objective == "masked"
        # Unit-variance token embeddings as in the public LRA code: flax's default (std
        # 1/sqrt(width), 0.044 at width 512) leaves tokens 20x fainter than the sinusoidal
        # positions, and the public ListOps config then does not learn.
        self.embed = nnx.Embed(task.vocab_size + masked, config.emb_dim, dtype=dtype,
                               param_dtype=jnp.float32,
                               embedding_init=nnx.initializers.normal(stddev=1.0), rngs=rngs)
        self.positions = make_positions(config.positional, max_length, config.emb_dim,
                                        image_shape=task.image_shape, rngs=rngs)
        # CLS pooling reads a learned token prepended after positions are added, so that image
        # grids keep their 2-D layout.
        self.cls = (nnx.Param(jnp.zeros((config.emb_dim,), jnp.float32))
                    if config.pooling == "cls" else None)
        length = encoder_length(config, max_length)
        spec.check(config.attention, max_length=length, num_heads=config.num_heads,
                   head_dim=config.head_dim)
        self.encoder = Encoder(
            spec, config.attention, num_layers=config.num_layers, emb_dim=config.emb_dim,
            qkv_dim=config.qkv_dim, mlp_dim=config.mlp_dim, num_heads=config.num_heads,
            max_length=length, dropout=config.dropout,
            attention_dropout=config.attention_dropout, dtype=dtype, remat=config.remat,
            rngs=rngs, reversible=config.reversible, ff_chunks=config.ff_chunks)
        self.dropout = nnx.Dropout(config.dropout)
        head_in = config.emb_dim * (4 if task.two_inputs else 1)
        # Distinct names for the two heads, so that a warm start tells them apart by path.
        self.head = None if masked else ClassifierHead(head_in, config.mlp_dim, task.num_classes,
                                                       dtype=dtype, rngs=rngs)
        self.token_head = (MaskedTokenHead(config.emb_dim, task.vocab_size, dtype=dtype,
                                           rngs=rngs) if masked else None)

    @property
    def head_name(self) -> str:
        """The attribute of this objective's head ("head" or "token_head")."""
        return "token_head" if self.objective == "masked" else "head"

    def encode(self, tokens: Int[Array, "b l"], mask: Bool[Array, "b l"], *,
               deterministic: bool, rngs: nnx.Rngs | None = None) -> Float[Array, "b e"]:
        """One pooled vector per sequence."""
        x, mask = self.encode_tokens(tokens, mask, deterministic=deterministic, rngs=rngs)
        return pool(x, mask, self.config.pooling)

    def encode_tokens(self, tokens: Int[Array, "b l"], mask: Bool[Array, "b l"], *,
                      deterministic: bool, rngs: nnx.Rngs | None = None,
                      ) -> tuple[Float[Array, "b n e"], Bool[Array, "b n"]]:
        """The encoder's output at every position and the mask of real positions; with CLS
        pooling position 0 is the CLS token (n = l + 1), else n = l."""
        if tokens.shape[1] > self.max_length:
            raise ValueError(f"inputs have {tokens.shape[1]} tokens; this model was built for "
                             f"at most {self.max_length} (set data.max_length to change it)")
        x = self.embed(tokens)
        if self.positions is not None:
            x = self.positions(x)
        if self.cls is not None:
            cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (x.shape[0], 1, x.shape[2]))
            x = jnp.concatenate([cls, x], axis=1)
            mask = jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1)
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        # Tasks without padding pass no key mask, so attention can run unmasked (variants.py).
        key_mask = mask if self.task.has_padding else None
        return self.encoder(x, key_mask, deterministic=deterministic, rngs=rngs), mask

    def __call__(self, tokens: Int[Array, "b *n l"], mask: Bool[Array, "b *n l"], *,
                 deterministic: bool = True, rngs: nnx.Rngs | None = None,
                 ) -> Float[Array, "b c"] | Float[Array, "b l v"]:
        """Logits ``[batch, classes]``; two-input tasks take ``[batch, 2, length]`` inputs. The
        masked objective gives logits ``[batch, length, vocabulary]`` at every input token."""
        if self.token_head is not None:
            x, _ = self.encode_tokens(tokens, mask, deterministic=deterministic, rngs=rngs)
            return self.token_head(x[:, 1:] if self.cls is not None else x)
        if self.task.two_inputs:
            if tokens.ndim != 3 or tokens.shape[1] != 2:
                raise ValueError(f"{self.task.name} takes [batch, 2, length] inputs, got "
                                 f"{tokens.shape}")
            pooled = self.encode(rearrange(tokens, "b n l -> (b n) l"),
                                 rearrange(mask, "b n l -> (b n) l"),
                                 deterministic=deterministic, rngs=rngs)
            u, v = rearrange(pooled, "(b n) e -> n b e", n=2)
            features = dual_features(u, v)
        else:
            features = self.encode(tokens, mask, deterministic=deterministic, rngs=rngs)
        return self.head(features)
