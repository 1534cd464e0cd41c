"""Tests of the attention kernel selection and the chunked (online-softmax) attention."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models import attention
from diffusion_jax.models.attention import Transformer2D

F32_MAX = float(np.finfo(np.float32).max)


def _reference(q, k, v, mask=None, is_causal=False):
    """softmax(q k^T / sqrt(d)) v in float64 numpy; masked scores -> -0.7 * float32 max."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = np.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(q.shape[-1])
    keep = np.ones(scores.shape, bool)
    if mask is not None:
        keep &= np.asarray(mask, bool)
    if is_causal:
        keep &= np.tril(np.ones(scores.shape[2:], bool))
    scores = np.where(keep, scores, -0.7 * F32_MAX)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", weights, v)


def _qkv(b, t, s, n, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype)
               for shape in ((b, t, n, d), (b, s, n, d), (b, s, n, d)))
    return q, k, v


def _key_padding(b, s, seed=1):
    keep = np.random.default_rng(seed).random((b, s)) > 0.3
    keep[:, 0] = True
    return jnp.asarray(keep)[:, None, None, :]               # [B, 1, 1, S]


CASES = [
    # name, (B, T, S, N, d), mask kind, causal
    ("self_odd", (2, 37, 37, 3, 8), None, False),
    ("cross_L_ne_N", (2, 37, 11, 2, 16), None, False),
    ("key_padding", (3, 29, 23, 2, 8), "keys", False),
    ("causal", (2, 31, 31, 2, 8), None, True),
    ("causal_and_padding", (2, 19, 19, 4, 8), "keys", True),
    ("full_mask", (1, 13, 17, 2, 8), "full", False),
]


@pytest.mark.parametrize("name,shape,mask_kind,causal,dtype,tol",
                         [c + (jnp.float32, 1e-5) for c in CASES] +
                         [c + (jnp.bfloat16, 1e-2) for c in CASES[1:4]],
                         ids=[c[0] + "-f32" for c in CASES] + [c[0] + "-bf16" for c in CASES[1:4]])
def test_chunked_equals_softmax_attention(name, shape, mask_kind, causal, dtype, tol):
    b, t, s, n, d = shape
    q, k, v = _qkv(b, t, s, n, d, dtype)
    mask = None
    if mask_kind == "keys":
        mask = _key_padding(b, s)
    elif mask_kind == "full":
        mask = jnp.asarray(np.random.default_rng(2).random((b, n, t, s)) > 0.5)
    out = jax.jit(lambda q, k, v, m: attention.chunked_attention(
        q, k, v, mask=m, is_causal=causal, query_chunk=5, key_chunk=4))(q, k, v, mask)
    assert out.shape == (b, t, n, d) and out.dtype == dtype
    ref = _reference(q, k, v, mask, causal)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol, rtol=tol)


def test_fully_masked_row_matches_plain_path():
    """A query row with every key masked averages all keys on both paths."""
    q, k, v = _qkv(1, 9, 7, 1, 8, jnp.float32)
    mask = jnp.ones((1, 1, 9, 7), bool).at[0, 0, 3].set(False)
    out = attention.chunked_attention(q, k, v, mask=mask, query_chunk=4, key_chunk=3)
    plain = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(out, plain, atol=1e-6)
    np.testing.assert_allclose(out[0, 3], v[0].mean(0), atol=1e-6)


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "causal_and_padding"])
def test_chunked_gradients_equal_plain(masked):
    causal = True
    q, k, v = _qkv(2, 21, 21, 2, 8, jnp.float32)
    mask = _key_padding(2, 21) if masked else None
    weights = jnp.asarray(np.random.default_rng(3).standard_normal((2, 21, 2, 8)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(weights * fn(q, k, v))

    chunked = jax.grad(loss(lambda q, k, v: attention.chunked_attention(
        q, k, v, mask=mask, is_causal=causal, query_chunk=4, key_chunk=6)), argnums=(0, 1, 2))
    plain = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal)), argnums=(0, 1, 2))
    for got, want in zip(jax.jit(chunked)(q, k, v), jax.jit(plain)(q, k, v)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["auto", "xla", "chunked"])
def test_dot_product_attention_upcast_and_dispatch(implementation):
    """Every implementation gives the same numbers; upcast computes bf16 inputs in float32."""
    q, k, v = _qkv(2, 33, 33, 2, 8, jnp.bfloat16)
    with attention.options(implementation=implementation, query_chunk=8, key_chunk=16):
        out = attention.dot_product_attention(q, k, v, upcast=True)
        jaxpr = str(jax.make_jaxpr(lambda *a: attention.dot_product_attention(*a))(q, k, v))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _reference(q, k, v), atol=1e-2)
    # "auto" on CPU with a 33-token sequence: the score matrix fits the budget -> plain path.
    assert ("scan" in jaxpr) == (implementation == "chunked")


def test_auto_chunks_when_the_score_matrix_exceeds_the_budget():
    q, k, v = _qkv(1, 40, 40, 2, 8, jnp.float32)
    budget = 4 * 2 * 40 * 40 - 1                    # one byte short of the [B, N, T, S] matrix
    with attention.options(budget_bytes=budget):
        jaxpr = str(jax.make_jaxpr(attention.dot_product_attention)(q, k, v))
        out = attention.dot_product_attention(q, k, v)
    assert "scan" in jaxpr
    np.testing.assert_allclose(out, _reference(q, k, v), atol=1e-5)


@pytest.mark.parametrize("b,n,t,s,budget", [(1, 8, 4096, 4096, 16 * 2**20),
                                            (16, 8, 4096, 77, 2**20),
                                            (2, 8, 4095, 4097, 3 * 2**20),
                                            (64, 16, 1000, 1000, 1000)])
def test_chunk_sizes_fit_the_budget(b, n, t, s, budget):
    cq, ck = attention.chunk_sizes(b, n, t, s, budget_bytes=budget)
    assert 1 <= cq <= t and 1 <= ck <= s
    assert 4 * b * n * cq * ck <= max(budget, 4 * b * n)
    # Evened out: padding to whole chunks wastes less than one chunk of each.
    assert math.ceil(t / cq) * cq - t < cq and math.ceil(s / ck) * ck - s < ck


def test_options_validate_and_restore():
    with pytest.raises(ValueError, match="implementation"):
        attention.set_options(implementation="flash")
    with pytest.raises(ValueError, match="budget_bytes"):
        attention.set_options(budget_bytes=0)
    before = attention.get_options()
    with attention.options(implementation="chunked", key_chunk=3):
        assert attention.get_options().key_chunk == 3
    assert attention.get_options() == before
    with attention.options(implementation="cudnn"), pytest.raises(ValueError, match="cudnn"):
        attention.dot_product_attention(*_qkv(1, 4, 4, 1, 8, jnp.bfloat16))


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_compiled_memory_stays_far_below_the_score_matrix():
    """T = S = 4096, 8 heads of 40 (SD-1.5's first level at 512x512): the score matrix alone
    is 512 MiB in float32; the chunked forward and its gradient need a fraction of it."""
    shape = jax.ShapeDtypeStruct((1, 4096, 8, 40), jnp.float32)
    scores = 4 * 8 * 4096 * 4096
    # A fresh lambda per option: jax.jit caches traces per function, and the choice is made
    # when tracing.
    with attention.options(implementation="chunked"):
        fwd = _temp_bytes(lambda q, k, v: attention.dot_product_attention(q, k, v),
                          shape, shape, shape)
        grad = _temp_bytes(jax.grad(lambda q, k, v: attention.dot_product_attention(q, k, v).sum(),
                                    argnums=(0, 1, 2)), shape, shape, shape)
    with attention.options(implementation="xla"):
        plain = _temp_bytes(lambda q, k, v: attention.dot_product_attention(q, k, v),
                            shape, shape, shape)
    assert plain >= scores                      # the plain path does form it
    assert fwd < scores / 4, fwd
    assert grad < scores / 2, grad


def test_sd15_transformer_block_compiled_memory_bound():
    """SD-1.5's first spatial transformer (320 channels, 8 heads of 40, depth 1) on a 64x64
    latent with CFG (2 rows) and 77 text tokens, bf16: XLA's temporaries stay under 256 MiB
    (the self-attention's score matrix alone would be 2 x 8 x 4096^2 x 4 B = 1 GiB)."""
    block = nnx.eval_shape(lambda: Transformer2D(320, 8, 40, 768, dtype=jnp.bfloat16,
                                                 param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(block)
    x = jax.ShapeDtypeStruct((2, 64, 64, 320), jnp.bfloat16)
    text = jax.ShapeDtypeStruct((2, 77, 768), jnp.bfloat16)
    temp = _temp_bytes(lambda s, x, c: nnx.merge(graphdef, s)(x, c), state, x, text)
    assert temp < 256 * 2**20, temp
