"""Closed-form optimal denoisers and scores for Gaussian and Gaussian-mixture data (test oracle).

For data ``x0 ~ sum_k w_k N(mu_k, Sigma_k)`` in ``R^D`` and a noisy ``x = a x0 + s n``,
``n ~ N(0, I)``, the noisy density is the mixture ``sum_k w_k N(a mu_k, C_k)`` with
``C_k = a^2 Sigma_k + s^2 I``, so everything is closed form:

    score(x) = grad log p(x) = -sum_k r_k(x) C_k^{-1} (x - a mu_k),   r_k = posterior weight of k,
    E[n | x]  = -s score(x),                      (the optimal eps prediction)
    E[x0 | x] = (x + s^2 score(x)) / a.           (Tweedie; the optimal x0 prediction)

The VP (DDPM) case is ``a = sqrt(alpha_bar)``, ``s = sqrt(1 - alpha_bar)``; the VE (NCSN) case
is ``a = 1``, ``s = sigma``. ``C_k^{-1}`` uses the eigendecomposition of ``Sigma_k``, so no
batched linear solve is needed and the functions are cheap inside ``lax.scan``.

Arrays: ``x`` is ``[B, ...]`` (trailing dims flattened to ``D``); ``alpha_bar`` / ``sigma`` are
scalars or anything with ``B`` entries (``[B]``, ``[B, 1, ..., 1]``). The denoisers and scores
are pure ``jnp`` and jit-compatible; ``gaussian_ddim_law`` and ``gmm_sample`` are float64 numpy.
``tests/test_samplers.py`` checks the scores against autodiff of the log-densities.

XLA CPU bug (jax / jaxlib 0.10.2): under ``jax.jit`` the oracle's fused reductions are lowered
to one YNNPACK fusion (``__ynn_fusion``) that returns wrong values once ``x`` has more than
32,768 entries (e.g. ``[10923, 3]``: errors of ~3 against the exact ``-x / (var + sigma^2)``;
eager mode and ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` are exact). The oracle's
maths is not at fault; :func:`_mixture_terms` refuses such traced inputs on CPU instead of
returning wrong numbers (use smaller batches, eager mode or that flag).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np


def gaussian_eps(x_t, alpha_bar, mean, cov):
    """Optimal eps prediction ``E[eps | x_t]`` for ``N(mean, cov)`` data (VP forward process).

    ``E[eps | x_t] = sqrt(1 - a) (a cov + (1 - a) I)^{-1} (x_t - sqrt(a) mean)``, ``a = alpha_bar``.

    Args:
        x_t: ``[B, ...]`` with ``D`` features per example.
        alpha_bar: scalar or ``B`` values.
        mean: ``[D]``.
        cov: ``[D, D]`` covariance or ``[D]`` diagonal.

    Returns:
        ``[B, ...]``.
    """
    return gmm_eps(x_t, alpha_bar, jnp.ones(1), jnp.asarray(mean)[None], _as_covs(cov, 1, None))


def gaussian_x0(x_t, alpha_bar, mean, cov):
    """Optimal x0 prediction ``E[x0 | x_t]`` for ``N(mean, cov)`` data (VP)."""
    return gmm_x0(x_t, alpha_bar, jnp.ones(1), jnp.asarray(mean)[None], _as_covs(cov, 1, None))


def gaussian_score(x, sigma, mean, cov):
    """Score of ``N(mean, cov + sigma^2 I)``: ``N(mean, cov)`` data plus ``N(0, sigma^2 I)`` noise.

    ``grad log p_sigma(x) = -(cov + sigma^2 I)^{-1} (x - mean)``.

    Args:
        x: ``[B, ...]``.
        sigma: scalar or ``B`` values.
        mean: ``[D]``.
        cov: ``[D, D]`` or ``[D]`` diagonal.

    Returns:
        ``[B, ...]``.
    """
    return gmm_score(x, sigma, jnp.ones(1), jnp.asarray(mean)[None], _as_covs(cov, 1, None))


def gaussian_vp_score(x_t, alpha_bar, mean, cov):
    """Score ``grad log q(x_t) = -E[eps | x_t] / sqrt(1 - a)`` of ``N(mean, cov)`` data (VP)."""
    return _mixture_score_vp(x_t, alpha_bar, jnp.ones(1), jnp.asarray(mean)[None],
                             _as_covs(cov, 1, None))


def gaussian_ode_endpoint(x_T, alpha_bar_T, mean, cov):
    """Where the probability-flow ODE (DDIM, eta = 0, many steps) takes ``x_T``, at ``t = 0``.

    The VP marginals of ``N(mean, cov)`` data are ``N(sqrt(a) mean, a cov + (1 - a) I)``; the flow
    keeps each whitened coordinate fixed, so it ends at the data (``a = 1``) at

        x_0 = mean + cov^{1/2} (a_T cov + (1 - a_T) I)^{-1/2} (x_T - sqrt(a_T) mean).

    Args:
        x_T: ``[B, D]``.
        alpha_bar_T: scalar ``alpha_bar`` of the starting step.
        mean: ``[D]``.
        cov: ``[D, D]`` or ``[D]`` diagonal.

    Returns:
        ``[B, D]``.
    """
    lam, u = _eigh(_as_covs(cov, 1, None)[0])
    gain = jnp.sqrt(lam / (alpha_bar_T * lam + 1.0 - alpha_bar_T))          # [D]
    centred = x_T - jnp.sqrt(alpha_bar_T) * mean
    return mean + ((centred @ u) * gain) @ u.T


def gaussian_ddim_law(mean, cov, alphas_cumprod, timesteps, eta, start=None):
    """Exact law of DDIM's output for ``N(mean, cov)`` data and the exact denoiser.

    With the optimal denoiser every DDIM step is affine plus Gaussian noise. With
    ``V = a cov + (1 - a) I``, ``x0(x) = mean + sqrt(a) cov V^{-1} (x - sqrt(a) mean)`` and
    ``eps(x) = sqrt(1 - a) V^{-1} (x - sqrt(a) mean)``, the step ``t -> t'`` is

        x' = sqrt(a') x0(x) + sqrt(1 - a' - s^2) eps(x) + s z,
        s = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a'),

    (``a' = 1`` after the last step), so the output is Gaussian; its mean and covariance are
    propagated here in float64 numpy, independently of the library. ``timesteps = arange(T)[::-1]``
    with ``eta = 1`` is DDPM with the posterior variance.

    Args:
        mean: ``[D]``.
        cov: ``[D, D]``.
        alphas_cumprod: ``[T]``.
        timesteps: ``[S]`` descending timesteps the chain visits.
        eta: DDIM's noise scale.
        start: ``(mean [D], cov [D, D])`` of the chain's input; default ``N(0, I)``.

    Returns:
        ``(mean [D], cov [D, D])`` float64 of the chain's output.
    """
    mean = np.asarray(mean, np.float64)
    cov = np.asarray(cov, np.float64)
    alphas_cumprod = np.asarray(alphas_cumprod, np.float64)
    eye = np.eye(mean.shape[0])
    if start is None:
        m, c = np.zeros_like(mean), eye
    else:
        m, c = (np.asarray(v, np.float64) for v in start)
    steps = [int(t) for t in timesteps]
    for t, t_prev in zip(steps, steps[1:] + [-1]):
        a = alphas_cumprod[t]
        a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else 1.0
        s = eta * np.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
        v_inv = np.linalg.inv(a * cov + (1.0 - a) * eye)
        # x' = gain (x - sqrt(a) mean) + sqrt(a') mean + s z
        gain = (np.sqrt(a_prev * a) * cov + np.sqrt(max(1.0 - a_prev - s**2, 0.0) * (1.0 - a))
                * eye) @ v_inv
        m = gain @ (m - np.sqrt(a) * mean) + np.sqrt(a_prev) * mean
        c = gain @ c @ gain.T + s**2 * eye
    return m, c


def gmm_eps(x_t, alpha_bar, weights, means, var):
    """Optimal eps prediction for Gaussian-mixture data under the VP forward process.

    ``E[eps | x_t] = -sqrt(1 - a) grad log q(x_t)``, ``q`` the noisy mixture (module docstring).

    Args:
        x_t: ``[B, ...]``.
        alpha_bar: scalar or ``B`` values.
        weights: ``[K]`` mixture weights (normalised here).
        means: ``[K, D]``.
        var: component covariances: scalar or ``[K]`` (isotropic ``var_k I``) or ``[K, D, D]``.

    Returns:
        ``[B, ...]``.
    """
    a = _per_example(alpha_bar, x_t.shape[0])
    score = _mixture_score_vp(x_t, alpha_bar, weights, means, var)
    return -_expand(jnp.sqrt(1.0 - a), x_t.ndim) * score


def gmm_x0(x_t, alpha_bar, weights, means, var):
    """Optimal ``E[x0 | x_t] = (x_t + (1 - a) score) / sqrt(a)`` for mixture data (VP)."""
    a = _expand(_per_example(alpha_bar, x_t.shape[0]), x_t.ndim)
    score = _mixture_score_vp(x_t, alpha_bar, weights, means, var)
    return (x_t + (1.0 - a) * score) / jnp.sqrt(a)


def gmm_score(x, sigma, weights, means, var):
    """Score of the mixture convolved with ``N(0, sigma^2 I)`` (VE / NCSN noise).

    ``grad log p_sigma(x) = -sum_k r_k(x) (Sigma_k + sigma^2 I)^{-1} (x - mu_k)``.

    Args:
        x: ``[B, ...]``.
        sigma: scalar or ``B`` values.
        weights: ``[K]``.
        means: ``[K, D]``.
        var: scalar, ``[K]`` or ``[K, D, D]``; see :func:`gmm_eps`.

    Returns:
        ``[B, ...]``.
    """
    s = _per_example(sigma, x.shape[0])
    return _mixture_score(x, jnp.ones_like(s), s, weights, means, var)


def gmm_responsibilities(x, weights, means, var):
    """Posterior component probabilities ``r_k(x)`` under the clean mixture: ``[B, K]``."""
    return _mixture_terms(x.reshape(x.shape[0], -1), jnp.ones(x.shape[0]), jnp.zeros(x.shape[0]),
                          weights, means, var)[0]


def gmm_sample(rng, num, weights, means, var):
    """Draws ``num`` points of the mixture with a numpy ``Generator``.

    Returns:
        ``(x [num, D] float32, component [num] int)``.
    """
    weights = np.asarray(weights, np.float64)
    means = np.asarray(means, np.float64)
    covs = np.asarray(_as_covs(var, means.shape[0], means.shape[1]), np.float64)
    comp = rng.choice(len(weights), size=num, p=weights / weights.sum())
    chol = np.linalg.cholesky(covs)                                         # [K, D, D]
    z = rng.standard_normal((num, means.shape[1]))
    x = means[comp] + np.einsum("nij,nj->ni", chol[comp], z)
    return x.astype(np.float32), comp


def _mixture_score_vp(x_t, alpha_bar, weights, means, var):
    a = _per_example(alpha_bar, x_t.shape[0])
    return _mixture_score(x_t, jnp.sqrt(a), jnp.sqrt(1.0 - a), weights, means, var)


def _mixture_score(x, a, s, weights, means, var):
    """Score of ``sum_k w_k N(a mu_k, a^2 Sigma_k + s^2 I)`` at ``x [B, ...]``; ``a, s``: [B]."""
    flat = x.reshape(x.shape[0], -1)                                         # [B, D]
    resp, sol = _mixture_terms(flat, a, s, weights, means, var)
    return -jnp.sum(resp[..., None] * sol, axis=1).reshape(x.shape)


def _mixture_terms(x, a, s, weights, means, var):
    """Responsibilities ``[B, K]`` and ``C_k^{-1} (x - a mu_k)`` ``[B, K, D]`` for ``x [B, D]``."""
    _check_ynn_bug(x)
    means = jnp.asarray(means, jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    lam, u = _eigh(_as_covs(var, means.shape[0], means.shape[1]))          # [K, D], [K, D, D]
    diff = x[:, None, :] - a[:, None, None] * means[None]                    # [B, K, D]
    proj = jnp.sum(u[None] * diff[..., :, None], axis=-2)                    # U^T diff [B, K, D]
    c_eig = a[:, None, None] ** 2 * lam[None] + s[:, None, None] ** 2        # [B, K, D]
    sol = jnp.sum(u[None] * (proj / c_eig)[..., None, :], axis=-1)           # C^{-1} diff [B, K, D]
    log_prob = (jnp.log(weights / weights.sum())[None]
                - 0.5 * jnp.sum(proj**2 / c_eig + jnp.log(c_eig), axis=-1))  # [B, K] (+ const)
    return jax.nn.softmax(log_prob, axis=-1), sol


_YNN_SAFE_ENTRIES = 32768


def _check_ynn_bug(x):
    """Raise ``ValueError`` for a traced ``x`` above the size the XLA CPU YNNPACK fusion gets
    wrong (see the module docstring), unless that fusion is switched off."""
    if (isinstance(x, jax.core.Tracer) and x.size > _YNN_SAFE_ENTRIES
            and jax.default_backend() == "cpu"
            and "--xla_cpu_experimental_ynn_fusion_type=" not in os.environ.get("XLA_FLAGS", "")):
        raise ValueError(
            f"gaussian_oracle under jit on CPU with {x.size} > {_YNN_SAFE_ENTRIES} entries hits "
            "an XLA YNNPACK fusion bug (wrong values); use a smaller batch, eager mode or "
            "XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=.")


def _eigh(covs):
    """Eigendecomposition, in numpy when ``covs`` is concrete (keeps LAPACK calls out of scans)."""
    if isinstance(covs, jax.core.Tracer):
        return jnp.linalg.eigh(covs)
    lam, u = np.linalg.eigh(np.asarray(covs, np.float64))
    return jnp.asarray(lam, jnp.float32), jnp.asarray(u, jnp.float32)


def _as_covs(var, num_components, dim):
    """``[K, D, D]`` covariances from scalar / ``[K]`` (isotropic), ``[D]`` (diagonal, K=1) or full.

    Concrete inputs stay numpy so that :func:`_eigh` can decompose them outside any trace.
    """
    xp = jnp if isinstance(var, jax.core.Tracer) else np
    var = xp.asarray(var, xp.float32)
    if var.ndim == 3:
        return var
    if var.ndim == 2:                                                        # one full [D, D]
        return var[None]
    if dim is None:                                                     # Gaussian: [D] diagonal
        return xp.diag(var)[None]
    return xp.broadcast_to(var, (num_components,))[:, None, None] * xp.eye(dim, dtype=xp.float32)


def _per_example(value, batch):
    return jnp.broadcast_to(jnp.reshape(jnp.asarray(value, jnp.float32), (-1,)), (batch,))


def _expand(v, ndim):
    return jnp.reshape(v, (-1,) + (1,) * (ndim - 1))
