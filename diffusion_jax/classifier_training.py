"""Training the time-conditioned noisy classifier ``p(y | x_t, t)`` used by classifier guidance.

The classifier (:class:`~diffusion_jax.models.classifier.NoisyClassifier`) is fit on images
noised by the forward process; :func:`diffusion_jax.guidance.classifier_log_prob_fn` then
wraps it for the guided denoisers.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from diffusion_jax import diffusion, schedules
from diffusion_jax.models.classifier import NoisyClassifier


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
