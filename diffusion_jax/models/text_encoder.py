"""CLIP text transformer in transformers' ``CLIPTextModel`` layout (SD's text encoder), Flax NNX.

``h_0 = token_embedding(ids) + position_embedding(0..L-1)``; each of the layers is a causal
pre-LayerNorm block::

    h = h + out_proj(attn(q_proj, k_proj, v_proj of layer_norm1(h)))   (causal mask)
    h = h + fc2(act(fc1(layer_norm2(h))))                               (act: quick_gelu | gelu)

and ``last_hidden_state = final_layer_norm(h_L)``. The pooled output is the state at the
end-of-text token: the position of the largest id when ``eos_token_id == 2`` (configs written
before transformers PR #24773, e.g. SD 1.x / 2.x), otherwise the first position holding
``eos_token_id`` -- as transformers does.

Shapes: ``input_ids: [B, L]`` -> states ``[B, L, hidden_size]``, pooled ``[B, hidden_size]``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.attention import dot_product_attention, layer_norm
from diffusion_jax.models.layers import Dtype

# openai/clip-vit-large-patch14 text tower (SD 1.x): 123,060,480 parameters.
CLIP_VIT_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                         num_layers=12, num_heads=12, max_positions=77, hidden_act="quick_gelu",
                         eos_token_id=2)
# OpenCLIP ViT-H/14 text tower as shipped with SD 2.x (23 of its 24 layers, gelu).
OPENCLIP_VIT_H14_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                             num_layers=23, num_heads=16, max_positions=77, hidden_act="gelu",
                             eos_token_id=2)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


class TextEncoderOutput(NamedTuple):
    """What `CLIPTextModel` returns.

    Attributes:
        last_hidden_state: ``[B, L, D]`` final-LayerNorm states of the last layer.
        pooler_output: ``[B, D]`` ``last_hidden_state`` at the end-of-text token.
        hidden_state: ``[B, L, D]`` final-LayerNorm states after layer ``num_layers - clip_skip``
            (diffusers' ``clip_skip``; equals ``last_hidden_state`` when ``clip_skip = 0``).
    """
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_state: jax.Array


class CLIPTextModel(nnx.Module):
    """CLIP text encoder ``input_ids [B, L] -> TextEncoderOutput``.

    Args:
        vocab_size, hidden_size, intermediate_size: table size, width, MLP width.
        num_layers, num_heads: transformer depth and heads.
        max_positions: length of the position table (77 for SD).
        hidden_act: "quick_gelu" (OpenAI CLIP), "gelu" (OpenCLIP) or "gelu_new".
        layer_norm_eps: LayerNorm epsilon.
        eos_token_id: selects the pooling rule (see the module docstring).
        dtype, param_dtype: compute and parameter dtypes.
        rngs: parameter RNGs.

    Raises:
        ValueError: unknown activation, or heads that do not divide the width.
    """

    def __init__(self, *, vocab_size: int = 49408, hidden_size: int = 768,
                 intermediate_size: int = 3072, num_layers: int = 12, num_heads: int = 12,
                 max_positions: int = 77, hidden_act: str = "quick_gelu",
                 layer_norm_eps: float = 1e-5, eos_token_id: int = 2, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
        if hidden_size % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.eos_token_id, self.max_positions, self.dtype = eos_token_id, max_positions, dtype
        self.embeddings = _Container()
        self.embeddings.token_embedding = _embed(vocab_size, hidden_size, ("vocab", "embed"), **kw)
        self.embeddings.position_embedding = _embed(max_positions, hidden_size, (None, "embed"),
                                                    **kw)
        self.encoder = _Container()
        self.encoder.layers = nnx.List([
            EncoderLayer(hidden_size, intermediate_size, num_heads, hidden_act, layer_norm_eps,
                         **kw) for _ in range(num_layers)])
        self.final_layer_norm = layer_norm(hidden_size, layer_norm_eps, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 clip_skip: int = 0) -> TextEncoderOutput:
        """Encodes token ids.

        Args:
            input_ids: ``[B, L]`` integer ids, ``L <= max_positions``.
            attention_mask: optional ``[B, L]`` (1 = token, 0 = padding) combined with the causal
                mask; SD pipelines pass none.
            clip_skip: take ``hidden_state`` from this many layers before the last.

        Returns:
            A `TextEncoderOutput`.

        Raises:
            ValueError: ``L`` exceeds the position table or ``clip_skip`` is out of range.
        """
        b, length = input_ids.shape
        num_layers = len(self.encoder.layers)
        if length > self.max_positions:
            raise ValueError(f"input_ids has length {length} > max_positions={self.max_positions}")
        if not 0 <= clip_skip < num_layers:
            raise ValueError(f"clip_skip={clip_skip} must be in [0, {num_layers})")
        h = self.embeddings.token_embedding(input_ids) + \
            self.embeddings.position_embedding(jnp.arange(length))[None]
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        skipped = None
        for i, layer in enumerate(self.encoder.layers):
            h = layer(h, mask)
            if i == num_layers - 1 - clip_skip:
                skipped = h
        last = self.final_layer_norm(h)
        hidden = last if clip_skip == 0 else self.final_layer_norm(skipped)
        if self.eos_token_id == 2:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(b), eos]
        f32 = lambda a: a.astype(jnp.float32)
        return TextEncoderOutput(f32(last), f32(pooled), f32(hidden))


class EncoderLayer(nnx.Module):
    """One pre-LN block (see the module docstring), causal unless ``causal=False`` (CLIP's
    vision tower). ``[B, L, D] -> [B, L, D]``."""

    def __init__(self, dim: int, mlp_dim: int, heads: int, act: str, eps: float, *,
                 dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs, causal: bool = True):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.act, self.causal = heads, ACTIVATIONS[act], causal
        self.self_attn = _Container()
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self.self_attn, name, layers.dense(dim, dim, axes=("embed", "heads"), **kw))
        self.self_attn.out_proj = layers.dense(dim, dim, axes=("heads", "embed"), **kw)
        self.layer_norm1 = layer_norm(dim, eps, **kw)
        self.mlp = _Container()
        self.mlp.fc1 = layers.dense(dim, mlp_dim, axes=("embed", "mlp"), **kw)
        self.mlp.fc2 = layers.dense(mlp_dim, dim, axes=("mlp", "embed"), **kw)
        self.layer_norm2 = layer_norm(dim, eps, **kw)

    def __call__(self, h: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, length, dim = h.shape
        u = self.layer_norm1(h)
        attn = self.self_attn
        split = lambda a: a.reshape(b, length, self.heads, dim // self.heads)
        out = dot_product_attention(split(attn.q_proj(u)), split(attn.k_proj(u)),
                                    split(attn.v_proj(u)), mask=mask, is_causal=self.causal)
        h = h + attn.out_proj(out.reshape(b, length, dim))
        return h + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(h))))


class _Container(nnx.Module):
    """A named group of submodules (mirrors transformers' module nesting)."""


def _embed(rows: int, dim: int, axes, *, dtype, param_dtype, rngs) -> nnx.Embed:
    return nnx.Embed(rows, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                     embedding_init=layers.with_axes(nnx.initializers.normal(0.02), axes))
