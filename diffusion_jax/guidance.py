"""Guidance as denoiser wrappers: classifier and loss (universal) guidance.

Every function here takes a denoiser and returns a denoiser ``denoise(x, t) -> prediction`` with
``x: [B, ...]`` and ``t: int32 [B]``, so any sampler in :mod:`diffusion_jax.samplers` runs the
guided model unchanged. The wrapped denoiser says what it predicts (a
:class:`~diffusion_jax.denoisers.Denoiser`'s ``pred_type``; a bare ``f(x, t)`` predicts eps),
and the returned one is a :class:`~diffusion_jax.denoisers.Denoiser` of the same
parameterisation. The score/epsilon relation that all of them rest on is

    score(x_t) = grad log p(x_t) = -eps(x_t, t) / sqrt(1 - alpha_bar_t),

so adding ``s * grad log p(y | x_t)`` to the score equals subtracting
``s * sqrt(1 - alpha_bar_t) * grad log p(y | x_t)`` from epsilon.

Classifier-free guidance, which needs the model and its condition, is built by
:func:`diffusion_jax.denoisers.build_denoiser`. The noisy classifier used by classifier
guidance lives in :mod:`diffusion_jax.models.classifier` and is trained by
:mod:`diffusion_jax.classifier_training`.
"""
import jax
import jax.numpy as jnp

from diffusion_jax import denoisers, diffusion, schedules


def classifier_guided_denoiser(denoise_eps, log_prob_fn, y, sched, scale):
    """Classifier guidance (Dhariwal & Nichol, 2021, Algorithm 2) as an epsilon shift.

    ``eps_hat(x_t, t) = eps(x_t, t) - s * sqrt(1 - alpha_bar_t) * grad_x log p(y | x_t, t)``

    i.e. the score of ``p(x_t) p(y | x_t)^s``. Works with every sampler (DDIM, DDPM, ...). With
    ``s = 1`` and the exact posterior ``p(y | x_t)`` this is the exact class-conditional score.

    Args:
        denoise_eps: unconditional denoiser ``(x, t) -> prediction`` (a
            :class:`~diffusion_jax.denoisers.Denoiser` of any ``pred_type``).
        log_prob_fn: ``log_prob_fn(x [B, ...], t int32 [B], y int32 [B]) -> [B]`` log p(y | x_t);
            must be differentiable in ``x`` and treat examples independently.
        y: target labels, int ``[B]`` or a scalar.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        scale: guidance scale ``s``.

    Returns:
        A :class:`~diffusion_jax.denoisers.Denoiser` predicting what ``denoise_eps`` does.
    """
    denoise_eps = denoisers.as_denoiser(denoise_eps)
    pred_type = denoisers.pred_type_of(denoise_eps)

    def denoise(x, t):
        sigma = schedules.extract(sched.sqrt_one_minus_alphas_cumprod, t, x.ndim)
        grad = _class_log_prob_grad(log_prob_fn, x, t, y)
        return _shift_eps(denoise_eps(x, t), x, t, sched, -scale * sigma * grad, pred_type)

    return denoise_eps.wrap(denoise)


def classifier_mean_shift_denoiser(denoise_eps, log_prob_fn, y, sched, scale, *,
                                   variance="posterior"):
    """Classifier guidance in DDPM's mean-shift form, expressed as an epsilon shift.

    Dhariwal & Nichol's Algorithm 1 samples ``x_{t-1} ~ N(mu + s * Sigma_t * g, Sigma_t)`` with
    ``g = grad_x log p(y | x_t, t)``. The DDPM mean is
    ``mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_t)``, so that shift equals
    replacing epsilon by

    ``eps_hat = eps - s * Sigma_t * g * sqrt(alpha_t) * sqrt(1 - alpha_bar_t) / beta_t``.

    The equivalence is exact for :func:`~diffusion_jax.samplers.ddpm_sample` with the same
    ``variance`` and ``clip_x0=None`` (clipping acts on the shifted ``x0`` instead). For
    ``Sigma_t = beta_t`` the factor is ``sqrt(alpha_t) * sqrt(1 - alpha_bar_t)``, close to the
    epsilon form of :func:`classifier_guided_denoiser`; with the posterior variance it vanishes
    at ``t = 0``.

    Args:
        denoise_eps: unconditional denoiser ``(x, t) -> prediction`` (a
            :class:`~diffusion_jax.denoisers.Denoiser` of any ``pred_type``).
        log_prob_fn: ``log_prob_fn(x, t, y) -> [B]`` log p(y | x_t), differentiable in ``x``.
        y: target labels, int ``[B]`` or a scalar.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        scale: guidance scale ``s``.
        variance: ``"posterior"`` (``Sigma_t = beta_tilde_t``) or ``"beta"`` (``Sigma_t =
            beta_t``); use the value you pass to ``ddpm_sample``.

    Returns:
        A :class:`~diffusion_jax.denoisers.Denoiser` predicting what ``denoise_eps`` does.

    Raises:
        ValueError: if ``variance`` is not ``posterior`` or ``beta``.
    """
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}.")
    sigma_sq = sched.posterior_variance if variance == "posterior" else sched.betas
    factor = (sigma_sq * jnp.sqrt(sched.alphas) * sched.sqrt_one_minus_alphas_cumprod
              / sched.betas)
    denoise_eps = denoisers.as_denoiser(denoise_eps)
    pred_type = denoisers.pred_type_of(denoise_eps)

    def denoise(x, t):
        grad = _class_log_prob_grad(log_prob_fn, x, t, y)
        delta = -scale * schedules.extract(factor, t, x.ndim) * grad
        return _shift_eps(denoise_eps(x, t), x, t, sched, delta, pred_type)

    return denoise_eps.wrap(denoise)


def loss_guided_denoiser(denoise, sched, loss_fn, scale):
    """Guidance by any differentiable loss on the predicted clean image ("universal guidance").

    Treats ``exp(-loss(x0_hat(x_t)))`` as a likelihood and shifts epsilon like a classifier:

    ``eps_hat = eps + s * sqrt(1 - alpha_bar_t) * grad_{x_t} loss(x0_hat(x_t, t))``

    where the gradient flows through the denoiser (x0_hat = (x_t - sqrt(1-ab) eps) / sqrt(ab)).

    Args:
        denoise: ``(x, t) -> prediction`` (a :class:`~diffusion_jax.denoisers.Denoiser` of
            any ``pred_type``).
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        loss_fn: ``loss_fn(x0_pred [B, ...]) -> [B]`` per-example loss (lower is better).
        scale: guidance scale ``s``.

    Returns:
        A :class:`~diffusion_jax.denoisers.Denoiser` predicting what ``denoise`` does.
    """
    denoise = denoisers.as_denoiser(denoise)
    pred_type = denoisers.pred_type_of(denoise)

    def neg_loss_and_pred(x, t):
        pred = denoise(x, t)
        alpha_bar = schedules.extract(sched.alphas_cumprod, t, x.ndim)
        x0, _ = diffusion.to_x0_and_eps(pred, x, alpha_bar, pred_type)
        return -jnp.sum(loss_fn(x0)), pred

    def guided(x, t):
        grad, pred = jax.grad(neg_loss_and_pred, has_aux=True)(x, t)
        sigma = schedules.extract(sched.sqrt_one_minus_alphas_cumprod, t, x.ndim)
        return _shift_eps(pred, x, t, sched, -scale * sigma * grad, pred_type)

    return denoise.wrap(guided)


def classifier_log_prob_fn(classifier):
    """Wrap a noisy classifier as ``log_prob_fn(x, t, y) -> [B]`` for the guided denoisers.

    ``log p(y | x_t, t) = log_softmax(classifier(x_t, t))[y]``.

    Args:
        classifier: callable ``(x [B, ...], t int32 [B]) -> logits [B, K]``, e.g. a
            :class:`~diffusion_jax.models.classifier.NoisyClassifier`.

    Returns:
        ``log_prob_fn(x, t, y) -> [B]``.
    """

    def log_prob_fn(x, t, y):
        log_probs = jax.nn.log_softmax(classifier(x, t), axis=-1)
        labels = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (x.shape[0],))
        return jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]

    return log_prob_fn


def _class_log_prob_grad(log_prob_fn, x, t, y):
    """``grad_x log p(y | x_t, t)`` per example, ``[B, ...]``."""
    labels = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (x.shape[0],))
    return jax.grad(lambda z: jnp.sum(log_prob_fn(z, t, labels)))(x)


def _shift_eps(pred, x, t, sched, delta, pred_type):
    """Return the prediction of ``pred_type`` whose epsilon is ``eps(pred) + delta`` at ``x_t``."""
    if pred_type == "eps":
        return pred + delta
    alpha_bar = schedules.extract(sched.alphas_cumprod, t, x.ndim)
    _, eps = diffusion.to_x0_and_eps(pred, x, alpha_bar, pred_type)
    eps = eps + delta
    return diffusion.from_x0_and_eps(diffusion.x0_from_eps(x, eps, alpha_bar), eps, alpha_bar,
                                     pred_type)
