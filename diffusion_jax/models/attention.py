"""Attention: one scaled dot-product kernel for every model, and the attention layers (Flax NNX).

Every model's attention (the DDPM/ADM UNet and the VAE mid-block through `AttentionBlock`, the
conditional UNet through `Attention`, the CLIP text and vision towers) calls
`dot_product_attention`, which picks how to compute ``softmax(q k^T / sqrt(d)) v`` when the
function is traced:

* **cuDNN** (``implementation="cudnn"``, tried first on a GPU for bf16 / f16 inputs):
  ``jax.nn.dot_product_attention(..., implementation="cudnn")``, the fused flash kernel. Where
  cuDNN rejects the shapes at trace time (a head width it does not support, say) the rules below
  apply.
* **plain** (``"xla"``): ``jax.nn.dot_product_attention``'s XLA path, which forms the
  ``[B, N, T, S]`` score matrix. Used when that float32 matrix fits ``budget_bytes``, so small
  models run exactly as before.
* **chunked** (``"chunked"``, and the fallback for long sequences on any backend): queries in
  blocks of ``Cq`` rows (``lax.map``) and keys in blocks of ``Ck`` (``lax.scan``) with the online
  ("flash") softmax; no array larger than one ``[B, N, Cq, Ck]`` block of scores is formed.
  Each block's body is under ``jax.checkpoint``, so the gradient is memory-bounded too. Chunk
  sizes come from `chunk_sizes` (a bytes budget) unless ``query_chunk`` / ``key_chunk`` are set.

The choice is a process-wide setting read at trace time (models know no config): change it
with `set_options` or, for one traced call, the `options` context manager, e.g.::

    with attention.options(budget_bytes=16 * 2**20):
        compiled = jax.jit(step).lower(*args).compile()

A function already compiled keeps the choice it was traced with.

Module and parameter names of the layers follow diffusers' ``Attention`` /
``BasicTransformerBlock`` / ``Transformer2DModel`` so a checkpoint maps onto them by name.
Shapes: sequences are ``[B, T, D]``; images are NHWC ``[B, H, W, C]``. Parameters carry the
logical axis names of ``layers.LOGICAL_AXIS_NAMES``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.layers import Dtype

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn")

# Score-block budgets by backend. On this project's 2-core CPU (2026-12-03, T = S = 4096, 8 heads
# of 40; a loaded shared host, so no ratio is quoted) the chunked forward in blocks of 8-16 MiB
# was faster than the plain path and no slower at 256 tokens, so CPU chunks early; elsewhere
# XLA's plain path is kept up to 1 GiB.
DEFAULT_BUDGET_BYTES = {"cpu": 16 * 2**20}
_OTHER_BACKENDS_BUDGET = 2**30


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """How `dot_product_attention` computes (see the module docstring).

    Attributes:
        implementation: ``"auto"`` (cuDNN on a GPU where it applies, else plain while the score
            matrix fits the budget, else chunked), ``"xla"`` (always plain), ``"chunked"``
            (always chunked) or ``"cudnn"`` (cuDNN or an error).
        budget_bytes: the largest float32 score array ``[B, N, rows, keys]`` one attention call may
            form: the plain path while the whole matrix fits, else the size of one chunk.
            None: `DEFAULT_BUDGET_BYTES` of the backend.
        query_chunk, key_chunk: fixed chunk sizes for the chunked path (None: from the budget).
    """
    implementation: str = "auto"
    budget_bytes: int | None = None
    query_chunk: int | None = None
    key_chunk: int | None = None

    def __post_init__(self):
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation={self.implementation!r} must be one of "
                             f"{IMPLEMENTATIONS}")
        if self.budget_bytes is not None and self.budget_bytes < 1:
            raise ValueError(f"budget_bytes={self.budget_bytes} must be >= 1")
        for name in ("query_chunk", "key_chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1 or None")


_OPTIONS = AttentionOptions()


def get_options() -> AttentionOptions:
    """The options in force."""
    return _OPTIONS


def set_options(**changes) -> AttentionOptions:
    """Replaces fields of the process-wide `AttentionOptions`; returns the previous options.

    Raises:
        ValueError: an unknown implementation or a non-positive size.
    """
    global _OPTIONS
    previous = _OPTIONS
    _OPTIONS = dataclasses.replace(_OPTIONS, **changes)
    return previous


@contextlib.contextmanager
def options(**changes) -> Iterator[AttentionOptions]:
    """`set_options` for the duration of a ``with`` block (for tracing / compiling there)."""
    previous = set_options(**changes)
    try:
        yield _OPTIONS
    finally:
        set_options(**dataclasses.asdict(previous))


def score_budget() -> int:
    """The score-block budget in force: the options' or the default backend's."""
    if _OPTIONS.budget_bytes is not None:
        return _OPTIONS.budget_bytes
    return DEFAULT_BUDGET_BYTES.get(jax.default_backend(), _OTHER_BACKENDS_BUDGET)


def chunk_sizes(batch: int, heads: int, q_len: int, kv_len: int, *,
                budget_bytes: int | None = None, query_chunk: int | None = None,
                key_chunk: int | None = None, max_key_chunk: int = 1024) -> tuple[int, int]:
    """Query / key chunk sizes ``(Cq, Ck)`` whose float32 score block fits the budget.

    With ``E = budget_bytes / (4 B N)`` score entries allowed per block:
    ``Ck = min(S, max_key_chunk, E)`` and ``Cq = min(T, max(1, E // Ck))``; then each size is
    evened out over its number of chunks (``ceil(T / ceil(T / Cq))``) so the last chunk wastes
    few padded rows. Fixed ``query_chunk`` / ``key_chunk`` replace the computed sizes.

    Args:
        batch, heads: B and N.
        q_len, kv_len: T queries and S keys.
        budget_bytes: bytes of one ``[B, N, Cq, Ck]`` float32 block (default: `score_budget`).

    Returns:
        ``(Cq, Ck)`` with ``1 <= Cq <= T`` and ``1 <= Ck <= S``.
    """
    opts = _OPTIONS
    budget = score_budget() if budget_bytes is None else budget_bytes
    entries = max(budget // (4 * batch * heads), 1)
    ck = key_chunk or opts.key_chunk or min(kv_len, max_key_chunk, entries)
    cq = query_chunk or opts.query_chunk or max(1, entries // ck)
    ck, cq = min(ck, kv_len), min(cq, q_len)
    even = lambda n, c: -(-n // -(-n // c))  # ceil(n / ceil(n / c))
    return even(q_len, cq), even(kv_len, ck)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, is_causal: bool = False,
                          upcast: bool = False) -> jax.Array:
    """Multi-head scaled dot-product attention ``softmax(q k^T / sqrt(d)) v``.

    Scores and softmax are float32 whatever the input dtype; the probabilities meet ``v`` in
    ``v``'s dtype (as ``jax.nn.dot_product_attention``). Masked scores are set to a large
    negative number, so a row with every key masked averages all keys, as the plain path does.
    Which kernel runs is decided by the `AttentionOptions` in force (module docstring).

    Args:
        q: ``[B, T, N, d]`` queries (N heads of width d).
        k, v: ``[B, S, N, d]`` keys and values.
        mask: optional boolean mask broadcastable to ``[B, N, T, S]`` (True = attend).
        is_causal: also mask key positions after the query position (key ``j`` is seen by
            query ``i`` when ``j <= i``).
        upcast: compute in float32 whatever the input dtype (diffusers' ``upcast_attention``).

    Returns:
        ``[B, T, N, d]`` in the dtype of ``v``.
    """
    dtype = v.dtype
    if upcast:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    opts = _OPTIONS
    b, t, n, _ = q.shape
    s = k.shape[1]
    if opts.implementation in ("auto", "cudnn"):
        out = _try_cudnn(q, k, v, mask, is_causal, required=opts.implementation == "cudnn")
        if out is not None:
            return out.astype(dtype)
    plain_fits = 4 * b * n * t * s <= score_budget()
    if opts.implementation == "xla" or (opts.implementation != "chunked" and plain_fits):
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    else:
        cq, ck = chunk_sizes(b, n, t, s)
        out = chunked_attention(q, k, v, mask=mask, is_causal=is_causal, query_chunk=cq,
                                key_chunk=ck)
    return out.astype(dtype)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, query_chunk: int,
                      key_chunk: int, mask: jax.Array | None = None,
                      is_causal: bool = False) -> jax.Array:
    """``softmax(q k^T / sqrt(d)) v`` in ``[B, N, Cq, Ck]`` blocks with the online softmax.

    For each block of ``Cq`` queries (``lax.map``), over blocks ``j`` of ``Ck`` keys
    (``lax.scan``), with scores ``s_j = q k_j^T / sqrt(d)`` (float32, masked entries set to
    ``-0.7 * float32_max`` as in ``jax.nn.dot_product_attention``)::

        m_j   = max(m_{j-1}, rowmax(s_j))
        l_j   = l_{j-1} exp(m_{j-1} - m_j) + rowsum(exp(s_j - m_j))
        acc_j = acc_{j-1} exp(m_{j-1} - m_j) + exp(s_j - m_j) v_j
        out   = acc_last / l_last

    T and S are padded up to whole chunks; padded keys get ``-inf`` (weight exactly 0) and
    padded query rows are dropped. Both loop bodies are under ``jax.checkpoint``: the backward
    pass recomputes each block's scores rather than storing ``[B, N, T, S]``.

    Args:
        q: ``[B, T, N, d]``; k, v: ``[B, S, N, d]``.
        query_chunk, key_chunk: ``Cq`` and ``Ck``.
        mask: boolean, broadcastable to ``[B, N, T, S]`` (True = attend).
        is_causal: key ``j`` is seen by query ``i`` only when ``j <= i``.

    Returns:
        ``[B, T, N, d]`` in ``v``'s dtype.
    """
    b, t, n, d = q.shape
    s = k.shape[1]
    cq, ck = query_chunk, key_chunk
    nq, nk = -(-t // cq), -(-s // ck)
    scale = 1.0 / math.sqrt(d)
    neg = -0.7 * float(np.finfo(np.float32).max)
    blocks = lambda a, c, m: _pad_to(a, 1, c * m).reshape(b, m, c, n, d).swapaxes(0, 1)
    qb, kb, vb = blocks(q, cq, nq), blocks(k, ck, nk), blocks(v, ck, nk)  # [chunks, B, C, N, d]
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        if mask.shape[2] > 1:
            mask = _pad_to(mask, 2, cq * nq)
        if mask.shape[3] > 1:
            mask = _pad_to(mask, 3, ck * nk)

    def query_block(i, qc):
        rows = i * cq + jnp.arange(cq)
        mrows = None if mask is None or mask.shape[2] == 1 else \
            jax.lax.dynamic_slice_in_dim(mask, i * cq, cq, axis=2)
        mrows = mask if mrows is None else mrows

        def key_block(carry, xs):
            m, l, acc = carry                          # [B, N, Cq], [B, N, Cq], [B, Cq, N, d]
            j, kc, vc = xs
            cols = j * ck + jnp.arange(ck)
            scores = jnp.einsum("bqnd,bknd->bnqk", qc, kc,
                                preferred_element_type=jnp.float32) * scale
            keep = None
            if mrows is not None:
                keep = mrows if mrows.shape[3] == 1 else \
                    jax.lax.dynamic_slice_in_dim(mrows, j * ck, ck, axis=3)
            if is_causal:
                causal = cols[None, :] <= rows[:, None]
                keep = causal if keep is None else keep & causal
            if keep is not None:
                scores = jnp.where(keep, scores, neg)
            scores = jnp.where(cols < s, scores, -jnp.inf)
            m_new = jax.lax.stop_gradient(jnp.maximum(m, scores.max(axis=-1)))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(scores - m_new[..., None])
            l = l * alpha + p.sum(axis=-1)
            pv = jnp.einsum("bnqk,bknd->bqnd", p.astype(vc.dtype), vc,
                            preferred_element_type=jnp.float32)
            acc = acc * alpha.transpose(0, 2, 1)[..., None] + pv
            return (m_new, l, acc), None

        init = (jnp.full((b, n, cq), -jnp.inf, jnp.float32), jnp.zeros((b, n, cq), jnp.float32),
                jnp.zeros((b, cq, n, d), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(jax.checkpoint(key_block, prevent_cse=False), init,
                                      (jnp.arange(nk), kb, vb))
        return (acc / l.transpose(0, 2, 1)[..., None]).astype(v.dtype)

    out = jax.lax.map(jax.checkpoint(lambda xs: query_block(*xs), prevent_cse=False),
                      (jnp.arange(nq), qb))                               # [nq, B, Cq, N, d]
    return out.swapaxes(0, 1).reshape(b, nq * cq, n, d)[:, :t]


def _pad_to(a: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero- (False-) pads ``a`` at the end of ``axis`` up to ``size``."""
    extra = size - a.shape[axis]
    if extra == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


def _try_cudnn(q, k, v, mask, is_causal, *, required: bool) -> jax.Array | None:
    """cuDNN's fused attention on a GPU for bf16 / f16 inputs, else None (or an error if
    ``required``)."""
    reason = None
    if jax.default_backend() != "gpu":
        reason = f"the backend is {jax.default_backend()!r}, not 'gpu'"
    elif q.dtype not in (jnp.bfloat16, jnp.float16):
        reason = f"cuDNN attention needs bfloat16 or float16 inputs, got {q.dtype}"
    else:
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                                implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError, TypeError) as e:
            reason = f"cuDNN rejected the call: {e}"
    if required:
        raise ValueError(f"implementation='cudnn' is not available: {reason}")
    return None


def layer_norm(dim: int, eps: float, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis with scale and bias annotated ("norm",); exact variance."""
    return nnx.LayerNorm(
        dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
        scale_init=layers.with_axes(nnx.initializers.ones_init(), ("norm",)),
        bias_init=layers.with_axes(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)


class Attention(nnx.Module):
    """diffusers ``Attention``: ``to_out(attn(to_q(x), to_k(c), to_v(c)))`` with N heads.

    ``q = x W_q``, ``k = c W_k``, ``v = c W_v`` (``c = x`` for self-attention), split into
    ``heads`` heads of width ``head_dim``;
    ``out = concat_heads(softmax(q k^T / sqrt(d)) v) W_o + b_o``.

    Shapes: ``x: [B, T, query_dim]``, ``context: [B, S, context_dim]`` -> ``[B, T, query_dim]``.

    Args:
        query_dim: width of x.
        context_dim: width of the context (None = self-attention, ``query_dim``).
        heads, head_dim: number and width of the heads.
        qkv_bias: biases on the q/k/v projections (False in SD's UNet).
        upcast: attention in float32.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, head_dim: int, *,
                 qkv_bias: bool = False, upcast: bool = False, dtype: Dtype,
                 param_dtype: Dtype, rngs: nnx.Rngs):
        inner = heads * head_dim
        kv_dim = context_dim or query_dim
        self.heads, self.head_dim, self.upcast = heads, head_dim, upcast
        qkv = lambda din: _linear(din, inner, ("embed", "heads"), qkv_bias, dtype, param_dtype,
                                  rngs)
        self.to_q, self.to_k, self.to_v = qkv(query_dim), qkv(kv_dim), qkv(kv_dim)
        self.to_out = nnx.List([_linear(inner, query_dim, ("heads", "embed"), True, dtype,
                                        param_dtype, rngs)])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.head_dim)
        out = dot_product_attention(split(self.to_q(x)), split(self.to_k(context)),
                                    split(self.to_v(context)), upcast=self.upcast)
        return self.to_out[0](out.reshape(x.shape[0], x.shape[1], -1))


class GEGLU(nnx.Module):
    """``proj(x) = [h, g]``; returns ``h * gelu(g)`` (exact erf GELU); ``[B, T, D] -> [B, T, F]``.
    """

    def __init__(self, dim: int, inner: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.proj = _linear(dim, 2 * inner, ("embed", "mlp"), True, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net[2](net[0](x))``, inner width ``4 * dim``."""

    def __init__(self, dim: int, *, mult: int = 4, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        inner = mult * dim
        # net[1] is diffusers' dropout (no parameters): a placeholder keeps the indices aligned.
        self.net = nnx.List([
            GEGLU(dim, inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
            None,
            _linear(inner, dim, ("mlp", "embed"), True, dtype, param_dtype, rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-LN block: ``x += attn1(norm1(x)); x += attn2(norm2(x), text); x += ff(norm3(x))``.

    Shapes: ``x: [B, T, dim]``, ``context: [B, S, context_dim]`` -> ``[B, T, dim]``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, *,
                 norm_eps: float = 1e-5, upcast: bool = False, dtype: Dtype,
                 param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(dim, norm_eps, **kw)
        self.attn1 = Attention(dim, None, heads, head_dim, upcast=upcast, **kw)
        self.norm2 = layer_norm(dim, norm_eps, **kw)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, upcast=upcast, **kw)
        self.norm3 = layer_norm(dim, norm_eps, **kw)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nnx.Module):
    """diffusers ``Transformer2DModel`` on continuous inputs (SD's spatial transformer).

    ``h = proj_in(GroupNorm(x))`` over the H*W positions, ``depth`` x `BasicTransformerBlock`
    with cross-attention to ``context``, then ``out = x + proj_out(h)``. ``proj_in`` /
    ``proj_out`` are per-position dense layers: a 1x1 convolution (``use_linear_projection=False``)
    is the same map, and the converter reshapes its ``[out, in, 1, 1]`` kernel.

    Shapes: ``x: [B, H, W, C]``, ``context: [B, S, context_dim]`` -> ``[B, H, W, C]``.

    Args:
        channels: C; the inner width is ``heads * head_dim``.
        heads, head_dim: attention heads and their width.
        context_dim: width of the text states.
        depth: number of transformer blocks.
        num_groups: GroupNorm groups (epsilon 1e-6 as diffusers).
        upcast: attention in float32.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int, *,
                 depth: int = 1, num_groups: int = 32, norm_eps: float = 1e-5,
                 upcast: bool = False, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * head_dim
        self.norm = layers.group_norm(channels, num_groups, 1e-6, **kw)
        self.proj_in = _linear(channels, inner, ("embed", "mlp"), True, dtype, param_dtype, rngs)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, head_dim, context_dim, norm_eps=norm_eps,
                                  upcast=upcast, **kw) for _ in range(depth)])
        self.proj_out = _linear(inner, channels, ("mlp", "embed"), True, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = self.proj_in(self.norm(x).reshape(b, hgt * wid, c))
        context = context.astype(h.dtype)
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h).reshape(b, hgt, wid, c)


class AttentionBlock(nnx.Module):
    """Multi-head self-attention over the H*W positions with a residual connection (the
    DDPM/ADM UNet's attention and the VAE mid-block's).

    ``u = norm(x)`` reshaped to ``[B, HW, C]``; ``q, k, v = u W_q, u W_k, u W_v`` split into
    ``num_heads`` heads of width ``d = C / num_heads``;
    ``out = x + proj_out(softmax(q k^T / sqrt(d)) v)`` (softmax in float32).

    Shapes: ``x: [B, H, W, C] -> [B, H, W, C]``.
    """

    def __init__(self, channels: int, num_heads: int, *, num_groups: int, eps: float,
                 dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must be >= 1 and divide the channel count "
                             f"{channels}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = num_heads
        self.norm = layers.group_norm(channels, num_groups, eps, **kw)
        self.q = layers.dense(channels, channels, axes=("embed", "heads"), **kw)
        self.k = layers.dense(channels, channels, axes=("embed", "heads"), **kw)
        self.v = layers.dense(channels, channels, axes=("embed", "heads"), **kw)
        self.proj_out = layers.dense(channels, channels, axes=("heads", "embed"), zero_init=True,
                                     **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        u = self.norm(x).reshape(b, hgt * wid, c)
        # [B, T, N, d]
        split = lambda a: a.reshape(b, hgt * wid, self.num_heads, c // self.num_heads)
        q, k, v = split(self.q(u)), split(self.k(u)), split(self.v(u))
        out = dot_product_attention(q, k, v).reshape(b, hgt * wid, c)
        return x + self.proj_out(out).reshape(b, hgt, wid, c)


def _linear(din: int, dout: int, axes, bias: bool, dtype, param_dtype, rngs) -> nnx.Linear:
    """A dense layer with logical axes ``axes`` on its kernel (and ``axes[1]`` on its bias)."""
    if bias:
        return layers.dense(din, dout, axes=axes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return nnx.Linear(din, dout, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=layers.with_axes(nnx.initializers.lecun_normal(), axes),
                      rngs=rngs)
