"""Guidance as denoiser wrappers: classifier-free, classifier and loss (universal) guidance.

Every function here takes a denoiser and returns a denoiser ``denoise(x, t) -> prediction`` with
``x: [B, ...]`` and ``t: int32 [B]``, so any sampler in :mod:`diffusion_jax.samplers` runs the
guided model unchanged. The score/epsilon relation that all of them rest on is

    score(x_t) = grad log p(x_t) = -eps(x_t, t) / sqrt(1 - alpha_bar_t),

so adding ``s * grad log p(y | x_t)`` to the score equals subtracting
``s * sqrt(1 - alpha_bar_t) * grad log p(y | x_t)`` from epsilon.

The noisy classifier used by classifier guidance lives in
:mod:`diffusion_jax.models.classifier`; :func:`train_noisy_classifier` fits it here, because
training needs the forward process.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from diffusion_jax import diffusion, schedules
from diffusion_jax.models.classifier import NoisyClassifier


def cfg_denoiser(model_fn, y, null_label, scale):
    """Classifier-free guidance (Ho & Salimans, 2022) with one batched forward pass.

    ``eps_hat(x, t) = (1 + w) * eps(x, t, c) - w * eps(x, t, null)``

    The conditional and unconditional halves are computed in a single call of ``model_fn`` on the
    batch ``[x; x]`` with labels ``[y; null]``. The combination is linear in the prediction, so
    it is equally valid for ``x0`` and ``v`` predictions. ``w = 0`` is the conditional model,
    ``w = -1`` the unconditional one.

    Args:
        model_fn: ``model_fn(x [B', ...], t int32 [B'], y int32 [B']) -> prediction [B', ...]``.
        y: class labels, int ``[B]`` (or a scalar, broadcast to the batch).
        null_label: the label the model was trained with for "no condition" (for
            :class:`~diffusion_jax.models.unet.UNet` this is ``num_classes``).
        scale: guidance weight ``w`` (scalar; may be traced).

    Returns:
        ``denoise(x [B, ...], t int32 [B]) -> prediction [B, ...]``.

    Example:
        >>> denoise = cfg_denoiser(lambda x, t, y: model(x, t, y), labels, 10, 3.0)
        >>> samples = ddim_sample(denoise, sched, noise, key, num_steps=50)
    """

    def denoise(x, t):
        batch = x.shape[0]
        labels = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (batch,))
        nulls = jnp.full((batch,), null_label, jnp.int32)
        pred = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                        jnp.concatenate([labels, nulls]))
        cond, uncond = pred[:batch], pred[batch:]
        return (1.0 + scale) * cond - scale * uncond

    return denoise


def classifier_guided_denoiser(denoise_eps, log_prob_fn, y, sched, scale, *, pred_type="eps"):
    """Classifier guidance (Dhariwal & Nichol, 2021, Algorithm 2) as an epsilon shift.

    ``eps_hat(x_t, t) = eps(x_t, t) - s * sqrt(1 - alpha_bar_t) * grad_x log p(y | x_t, t)``

    i.e. the score of ``p(x_t) p(y | x_t)^s``. Works with every sampler (DDIM, DDPM, ...). With
    ``s = 1`` and the exact posterior ``p(y | x_t)`` this is the exact class-conditional score.

    Args:
        denoise_eps: unconditional denoiser ``(x, t) -> prediction`` of type ``pred_type``.
        log_prob_fn: ``log_prob_fn(x [B, ...], t int32 [B], y int32 [B]) -> [B]`` log p(y | x_t);
            must be differentiable in ``x`` and treat examples independently.
        y: target labels, int ``[B]`` or a scalar.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        scale: guidance scale ``s``.
        pred_type: what ``denoise_eps`` predicts (``eps``, ``x0``, ``v`` or ``score``); the
            returned denoiser predicts the same type.

    Returns:
        ``denoise(x, t) -> prediction`` of type ``pred_type``.
    """

    def denoise(x, t):
        sigma = schedules.extract(sched.sqrt_one_minus_alphas_cumprod, t, x.ndim)
        grad = _class_log_prob_grad(log_prob_fn, x, t, y)
        return _shift_eps(denoise_eps(x, t), x, t, sched, -scale * sigma * grad, pred_type)

    return denoise


def classifier_mean_shift_denoiser(denoise_eps, log_prob_fn, y, sched, scale, *,
                                   variance="posterior", pred_type="eps"):
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
        denoise_eps: unconditional denoiser ``(x, t) -> prediction`` of type ``pred_type``.
        log_prob_fn: ``log_prob_fn(x, t, y) -> [B]`` log p(y | x_t), differentiable in ``x``.
        y: target labels, int ``[B]`` or a scalar.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        scale: guidance scale ``s``.
        variance: ``"posterior"`` (``Sigma_t = beta_tilde_t``) or ``"beta"`` (``Sigma_t =
            beta_t``); use the value you pass to ``ddpm_sample``.
        pred_type: what ``denoise_eps`` predicts; the returned denoiser predicts the same type.

    Returns:
        ``denoise(x, t) -> prediction`` of type ``pred_type``.

    Raises:
        ValueError: if ``variance`` is not ``posterior`` or ``beta``.
    """
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}.")
    sigma_sq = sched.posterior_variance if variance == "posterior" else sched.betas
    factor = (sigma_sq * jnp.sqrt(sched.alphas) * sched.sqrt_one_minus_alphas_cumprod
              / sched.betas)

    def denoise(x, t):
        grad = _class_log_prob_grad(log_prob_fn, x, t, y)
        delta = -scale * schedules.extract(factor, t, x.ndim) * grad
        return _shift_eps(denoise_eps(x, t), x, t, sched, delta, pred_type)

    return denoise


def loss_guided_denoiser(denoise, sched, loss_fn, scale, *, pred_type="eps"):
    """Guidance by any differentiable loss on the predicted clean image ("universal guidance").

    Treats ``exp(-loss(x0_hat(x_t)))`` as a likelihood and shifts epsilon like a classifier:

    ``eps_hat = eps + s * sqrt(1 - alpha_bar_t) * grad_{x_t} loss(x0_hat(x_t, t))``

    where the gradient flows through the denoiser (x0_hat = (x_t - sqrt(1-ab) eps) / sqrt(ab)).

    Args:
        denoise: ``(x, t) -> prediction`` of type ``pred_type``.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        loss_fn: ``loss_fn(x0_pred [B, ...]) -> [B]`` per-example loss (lower is better).
        scale: guidance scale ``s``.
        pred_type: what ``denoise`` predicts; the returned denoiser predicts the same type.

    Returns:
        ``denoise(x, t) -> prediction`` of type ``pred_type``.
    """

    def neg_loss_and_pred(x, t):
        pred = denoise(x, t)
        alpha_bar = schedules.extract(sched.alphas_cumprod, t, x.ndim)
        x0, _ = diffusion.to_x0_and_eps(pred, x, alpha_bar, pred_type)
        return -jnp.sum(loss_fn(x0)), pred

    def guided(x, t):
        grad, pred = jax.grad(neg_loss_and_pred, has_aux=True)(x, t)
        sigma = schedules.extract(sched.sqrt_one_minus_alphas_cumprod, t, x.ndim)
        return _shift_eps(pred, x, t, sched, -scale * sigma * grad, pred_type)

    return guided


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


def train_noisy_classifier(images, labels, sched, key, steps, *, batch_size=64,
                           learning_rate=2e-3, classifier=None, base_channels=32,
                           channel_mult=(1, 2), num_groups=8, log_every=0):
    """Fit a time-conditioned classifier ``p(y | x_t, t)`` on noised images.

    Each step draws a batch, ``t ~ U{0, ..., T-1}``, ``x_t = sqrt(ab_t) x_0 + sqrt(1-ab_t) eps``
    and takes an Adam step on the cross-entropy ``-log softmax(f(x_t, t))[y]``.

    Args:
        images: ``[N, H, W, C]`` float in [-1, 1] (numpy or jax).
        labels: ``[N]`` int in ``{0, ..., K-1}``.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule` of the diffusion to guide.
        key: PRNG key (batches, timesteps, noise and initialisation).
        steps: number of optimisation steps.
        batch_size: examples per step.
        learning_rate: Adam learning rate.
        classifier: an existing :class:`NoisyClassifier` to keep training; ``None`` builds one
            with ``base_channels``, ``channel_mult`` and ``num_groups`` and
            ``K = max(labels) + 1`` classes.
        base_channels, channel_mult, num_groups: architecture when ``classifier`` is None.
        log_every: print the running loss every this many steps (0: silent).

    Returns:
        ``(classifier, losses)``: the trained module and the ``[steps]`` numpy loss history.

    Raises:
        ValueError: if ``images`` is not 4-D or ``labels`` does not match it.
    """
    images = jnp.asarray(images, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}.")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape {images.shape[:1]}, got {labels.shape}.")
    init_key, key = jax.random.split(key)
    if classifier is None:
        classifier = NoisyClassifier(
            image_size=images.shape[1], in_channels=images.shape[3],
            num_classes=int(labels.max()) + 1, base_channels=base_channels,
            channel_mult=tuple(channel_mult), num_groups=num_groups,
            rngs=nnx.Rngs(init_key))
    optimizer = nnx.Optimizer(classifier, optax.adam(learning_rate), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, step_key):
        idx_key, t_key, noise_key = jax.random.split(step_key, 3)
        idx = jax.random.randint(idx_key, (batch_size,), 0, images.shape[0])
        x0, y = images[idx], labels[idx]
        t = jax.random.randint(t_key, (batch_size,), 0, sched.num_timesteps)
        x_t = diffusion.q_sample(sched, x0, t, jax.random.normal(noise_key, x0.shape))

        def loss_fn(model):
            logits = model(x_t, t)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = np.zeros((steps,), np.float32)
    for step in range(steps):
        losses[step] = float(train_step(classifier, optimizer, jax.random.fold_in(key, step)))
        if log_every and (step + 1) % log_every == 0:
            recent = losses[max(0, step + 1 - log_every):step + 1].mean()
            print(f"classifier step {step + 1}: loss {recent:.4f}")
    return classifier, losses


def train_noisy_classifier_from_config(config, images, labels):
    """Build the schedule and train a :class:`NoisyClassifier` as ``config`` says.

    Args:
        config: an ``ml_collections`` config with ``seed``, ``diffusion`` (``schedule``,
            ``num_timesteps``, ``beta_start``, ``beta_end``) and ``classifier`` (``base_channels``,
            ``channel_mult``, ``num_groups``, ``steps``, ``batch_size``, ``learning_rate``,
            ``log_every``) sections, e.g. ``configs/classifier_digits.py``.
        images: ``[N, H, W, C]`` training images in [-1, 1].
        labels: ``[N]`` int labels.

    Returns:
        ``(classifier, losses)`` as :func:`train_noisy_classifier`.
    """
    sched = schedules.schedule_from_config(config.diffusion)
    cfg = config.classifier
    return train_noisy_classifier(
        images, labels, sched, jax.random.PRNGKey(config.seed), cfg.steps,
        batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
        base_channels=cfg.base_channels, channel_mult=tuple(cfg.channel_mult),
        num_groups=cfg.num_groups, log_every=cfg.log_every)


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
