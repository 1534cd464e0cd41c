"""Tests of diffusion_jax.guidance against closed-form Gaussian-mixture posteriors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gaussian_oracle as oracle
from diffusion_jax import classifier_training, denoisers, diffusion, guidance, samplers, schedules
from diffusion_jax.applications import common
from diffusion_jax.models.classifier import NoisyClassifier

D = 2


def _fast(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` as one jitted program compiled without XLA's backend
    optimisations: these tests are compile-bound (3x less CPU), their arrays are tiny."""
    return jax.jit(lambda: fn(*args, **kwargs),
                   compiler_options={"xla_backend_optimization_level": 0})()


MEANS = jnp.array([[1.5, 1.5], [-1.5, -1.5]])           # two classes, well separated
VAR = 0.1                                                  # isotropic component variance


def _sched(num_timesteps=100):
    return schedules.make_schedule(schedules.linear_beta_schedule(num_timesteps, 1e-4, 0.2))


def _class_model(sched, null_label=2):
    """model_fn(x, t, y): exact eps of class y's Gaussian, or of the 50/50 mixture for null."""

    def model_fn(x, t, y):
        ab = sched.alphas_cumprod[t]
        per_class = jnp.stack([oracle.gmm_eps(x, ab, jnp.ones(1), MEANS[k:k + 1], VAR)
                               for k in range(2)])                              # [2, B, D]
        mixture = oracle.gmm_eps(x, ab, jnp.ones(2), MEANS, VAR)
        cond = jnp.where((y == 0)[:, None], per_class[0], per_class[1])
        return jnp.where((y == null_label)[:, None], mixture, cond)

    return model_fn


def _bayes_log_prob(sched):
    """log p(y | x_t) for the 50/50 mixture: components N(sqrt(ab) mu_k, (ab VAR + 1 - ab) I)."""

    def log_prob_fn(x, t, y):
        ab = sched.alphas_cumprod[t][:, None, None]
        c = ab * VAR + 1.0 - ab
        logits = -jnp.sum((x[:, None] - jnp.sqrt(ab) * MEANS[None]) ** 2, -1) / (2 * c[..., 0])
        return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[:, None], -1)[:, 0]

    return log_prob_fn


# ----------------------------------------------------------------------------- classifier


def test_classifier_guidance_with_bayes_posterior_is_the_exact_conditional_eps():
    """eps - sqrt(1-ab) grad log p(y|x_t) with the exact posterior equals class y's exact eps."""
    sched = _sched()
    model_fn = _class_model(sched)
    uncond = lambda x, t: model_fn(x, t, jnp.full((x.shape[0],), 2))
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (6, D))
    t = jnp.array([0, 5, 20, 50, 80, 99])
    y = jnp.array([0, 1, 1, 0, 1, 0])
    guided = guidance.classifier_guided_denoiser(uncond, _bayes_log_prob(sched), y, sched, 1.0)
    np.testing.assert_allclose(guided(x, t), model_fn(x, t, y), rtol=1e-4, atol=1e-5)
    # and for an x0-predicting denoiser the shift is applied to its eps
    to_x0 = lambda eps, x, t: diffusion.to_x0_and_eps(
        eps, x, schedules.extract(sched.alphas_cumprod, t, 2), "eps")[0]
    uncond_x0 = denoisers.Denoiser(lambda x, t: to_x0(uncond(x, t), x, t), pred_type="x0")
    guided_x0 = guidance.classifier_guided_denoiser(uncond_x0, _bayes_log_prob(sched), y, sched,
                                                    1.0)
    assert guided_x0.pred_type == "x0"   # the wrapper asks the denoiser what it predicts
    np.testing.assert_allclose(guided_x0(x, t), to_x0(model_fn(x, t, y), x, t), rtol=1e-4,
                               atol=1e-4)


def test_mean_shift_form_shifts_the_ddpm_mean_by_scale_sigma_grad():
    """One DDPM step with the mean-shift denoiser equals mu + s Sigma_t g (same noise)."""
    sched = _sched()
    model_fn = _class_model(sched)
    uncond = lambda x, t: model_fn(x, t, jnp.full((x.shape[0],), 2))
    log_prob = _bayes_log_prob(sched)
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (6, D))
    y = jnp.array([0, 1, 1, 0, 1, 0])
    key = jax.random.PRNGKey(3)
    for variance, table in (("posterior", sched.posterior_variance), ("beta", sched.betas)):
        for t in (1, 40, 99):
            shifted = guidance.classifier_mean_shift_denoiser(uncond, log_prob, y, sched, 2.0,
                                                              variance=variance)
            got, _ = samplers.ddpm_step(shifted, sched, x, t, key, variance=variance)
            plain, _ = samplers.ddpm_step(uncond, sched, x, t, key, variance=variance)
            t_b = jnp.full((6,), t)
            g = jax.grad(lambda z: jnp.sum(log_prob(z, t_b, y)))(x)
            np.testing.assert_allclose(got, plain + 2.0 * table[t] * g, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="variance"):
        guidance.classifier_mean_shift_denoiser(uncond, log_prob, y, sched, 1.0, variance="learned")


def test_classifier_guidance_moves_mixture_mass_to_the_class():
    """Unguided DDPM on the 50/50 mixture gives ~50% class 0; guidance toward class 0 with
    scale 1 (exact Bayes classifier) gives >= 90% (in fact ~100%), in both forms."""
    sched = _sched()
    uncond = lambda x, t: oracle.gmm_eps(x, sched.alphas_cumprod[t], jnp.ones(2), MEANS, VAR)
    n = 256
    y = jnp.zeros((n,), jnp.int32)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (n, D))
    share = lambda x: float(jnp.mean(jnp.argmin(jnp.sum((x[:, None] - MEANS) ** 2, -1), -1) == 0))
    plain = share(_fast(samplers.ddpm_sample, uncond, sched, x_T, jax.random.PRNGKey(1)))
    assert 0.35 < plain < 0.65
    for make in (guidance.classifier_guided_denoiser, guidance.classifier_mean_shift_denoiser):
        guided = make(uncond, _bayes_log_prob(sched), y, sched, 1.0)
        assert share(_fast(samplers.ddpm_sample, guided, sched, x_T, jax.random.PRNGKey(1))) >= 0.9


def test_loss_guided_denoiser_scale_zero_and_direction():
    """Scale 0 leaves the denoiser unchanged; the eps shift is +s sqrt(1-ab) grad_x loss(x0_hat)."""
    sched = _sched()
    uncond = lambda x, t: oracle.gmm_eps(x, sched.alphas_cumprod[t], jnp.ones(2), MEANS, VAR)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, D))
    t = jnp.array([3, 30, 60, 90])
    loss_fn = lambda x0: jnp.sum((x0 - 1.0) ** 2, -1)
    guided = jax.jit(lambda x, t, s: guidance.loss_guided_denoiser(uncond, sched, loss_fn, s)(x, t))
    np.testing.assert_allclose(guided(x, t, 0.0), uncond(x, t), atol=1e-6)

    def loss_of_x(z):
        ab = schedules.extract(sched.alphas_cumprod, t, 2)
        return jnp.sum(loss_fn(diffusion.x0_from_eps(z, uncond(z, t), ab)))

    sigma = schedules.extract(sched.sqrt_one_minus_alphas_cumprod, t, 2)
    want = uncond(x, t) + 0.7 * sigma * jax.jit(jax.grad(loss_of_x))(x)
    np.testing.assert_allclose(guided(x, t, 0.7), want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- noisy classifier


def test_train_noisy_classifier_learns_and_guides():
    """Two classes of 8x8 images (+0.5 / -0.5 plus noise): after training, the classifier is
    accurate on moderately noisy inputs, depends on t, its log_prob_fn is its log-softmax at
    the label, and guiding the unconditional mixture denoiser with
    it moves the class-0 share of DDIM samples from ~50% to >= 90%."""
    sched = _sched()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 512)
    images = (np.where(labels == 0, 0.5, -0.5)[:, None, None, None]
              + 0.3 * rng.standard_normal((512, 8, 8, 1))).astype(np.float32)
    with pytest.raises(ValueError, match="labels"):
        classifier_training.train_noisy_classifier(images, labels[:3], sched, jax.random.PRNGKey(0), 1)
    clf, losses = classifier_training.train_noisy_classifier(
        images, labels, sched, jax.random.PRNGKey(0), 80, batch_size=64, learning_rate=3e-3,
        base_channels=8, channel_mult=(1,), num_groups=4)
    assert losses.shape == (80,) and losses[-20:].mean() < losses[:10].mean()
    x_t = common.q_sample_level(sched, jnp.asarray(images), 30, jax.random.PRNGKey(1))
    apply = jax.jit(clf)
    logits = apply(x_t, jnp.full((512,), 30))
    assert logits.shape == (512, 2)
    assert float(jnp.mean(jnp.argmax(logits, -1) == labels)) > 0.9
    assert not np.allclose(apply(x_t, jnp.full((512,), 90)), logits, atol=1e-3)  # t conditions
    log_prob = jax.jit(guidance.classifier_log_prob_fn(clf))(x_t[:4], jnp.full((4,), 30),
                                                             jnp.array([0, 1, 1, 0]))
    want = jax.nn.log_softmax(logits[:4])[jnp.arange(4), jnp.array([0, 1, 1, 0])]
    np.testing.assert_allclose(log_prob, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="image_size"):
        NoisyClassifier(image_size=6, in_channels=1, num_classes=3, channel_mult=(1, 2, 2),
                        rngs=nnx.Rngs(0))

    means = jnp.stack([jnp.full((64,), 0.5), jnp.full((64,), -0.5)])
    uncond = lambda x, t: oracle.gmm_eps(x, sched.alphas_cumprod[t], jnp.ones(2), means, 0.09)
    guided = guidance.classifier_guided_denoiser(uncond, guidance.classifier_log_prob_fn(clf),
                                                 0, sched, 3.0)
    x_T = jax.random.normal(jax.random.PRNGKey(2), (64, 8, 8, 1))
    share = lambda x: float(jnp.mean(x.mean(axis=(1, 2, 3)) > 0))
    sample = lambda denoise: _fast(samplers.ddim_sample, denoise, sched, x_T,
                                   jax.random.PRNGKey(3), num_steps=10)
    plain, steered = share(sample(uncond)), share(sample(guided))
    assert 0.25 < plain < 0.75
    assert steered >= 0.9
