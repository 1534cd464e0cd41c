"""Tests of diffusion_jax.denoisers: one classifier-free-guidance builder for every condition
kind, checked against exact Gaussian-mixture models, and one compiled sampler for every
guidance scale and eta."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from training_fixtures import micro_config

import gaussian_oracle as oracle
from diffusion_jax import denoisers, generate, objectives, samplers, schedules, sharding

D = 2
MEANS = jnp.array([[1.5, 1.5], [-1.5, -1.5]])           # two classes, well separated
VAR = 0.1                                                  # isotropic component variance
NULL = 2                                                   # the null label (num_classes)


def _sched(num_timesteps=100):
    return schedules.make_schedule(schedules.linear_beta_schedule(num_timesteps, 1e-4, 0.2))


class _ClassModel:
    """model(x, t, cond): exact eps of class cond["label"]'s Gaussian, or of the 50/50
    mixture for the null label (or no label)."""

    num_classes = NULL

    def __init__(self, sched):
        self.sched = sched
        self.batches = []                    # batch size of every call (trace)

    def __call__(self, x, t, cond=None):
        self.batches.append(x.shape[0])
        y = (cond or {}).get("label", jnp.full((x.shape[0],), NULL))
        ab = self.sched.alphas_cumprod[t]
        per_class = jnp.stack([oracle.gmm_eps(x, ab, jnp.ones(1), MEANS[k:k + 1], VAR)
                               for k in range(2)])                              # [2, B, D]
        mixture = oracle.gmm_eps(x, ab, jnp.ones(2), MEANS, VAR)
        cond_eps = jnp.where((y == 0)[:, None], per_class[0], per_class[1])
        return jnp.where((y == NULL)[:, None], mixture, cond_eps)


def test_cfg_scale_one_is_the_conditional_model_and_batched_equals_two_calls():
    """Stable Diffusion's scale s: the weight w = s - 1 of one batched pass; s <= 1 (or None)
    is the conditional model in one pass on the batch, traced s too."""
    sched = _sched()
    model = _ClassModel(sched)
    x = jax.random.normal(jax.random.PRNGKey(0), (6, D))
    t = jnp.array([0, 5, 20, 50, 80, 99])
    y = jnp.array([0, 1, 0, 1, 0, 1])
    cond = {"label": y}
    null = {"label": jnp.full((6,), NULL)}
    cfg = jax.jit(lambda x, t, s: denoisers.build_denoiser(model, cond, guidance_scale=s)(x, t))
    for s in (3.5, 1.0, 0.0):                                 # traced: w = max(s - 1, 0)
        w = max(s - 1.0, 0.0)
        want = (1 + w) * model(x, t, cond) - w * model(x, t, null)
        np.testing.assert_allclose(cfg(x, t, s), want, rtol=1e-5, atol=1e-6)
    assert 12 in model.batches                                # one pass on the doubled batch
    guided = denoisers.build_denoiser(model, cond, guidance_scale=3.5)(x, t)  # host s > 1
    np.testing.assert_allclose(guided, cfg(x, t, 3.5), rtol=1e-5, atol=1e-6)
    # the weight w = -1 of the library's guided_denoiser is the unconditional model
    unguided = denoisers.guided_denoiser(model, cond, null, -1.0)(x, t)
    np.testing.assert_allclose(unguided, model(x, t, null), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"Unknown condition kind\(s\) \['lable'\]"):
        denoisers.build_denoiser(model, {"lable": cond["label"]})
    # no guidance requested, or a host s <= 1: the plain conditional model, one pass
    for scale in (None, 0.0, 0.5, 1.0):
        model.batches.clear()
        plain = denoisers.build_denoiser(model, cond, guidance_scale=scale)(x, t)
        assert model.batches == [6]
        np.testing.assert_array_equal(plain, model(x, t, cond))


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_one_guidance_validator(bad):
    """Every entry (build_denoiser, sample functions, pipelines, CLI, app) checks s the same."""
    with pytest.raises(ValueError, match=r"guidance_scale must be finite and >= 0 .*got"):
        denoisers.build_denoiser(_ClassModel(_sched()), {"label": jnp.zeros(2, jnp.int32)},
                                 guidance_scale=bad)
    assert denoisers.guidance_weight(4.0) == 3.0 and denoisers.guidance_weight(1.0) is None


def test_default_guidance_scale_reads_old_configs_as_they_sampled():
    """A workdir stored before config.sample.guidance_scale existed: pixel models sampled
    without guidance (s = 1), text-to-image runs with run_sample.py's 7.5; new configs store
    s (the scale of every command line)."""
    from configs import default as default_config, fashion_t2i
    old_pixel, old_text = default_config.get_config(), fashion_t2i.get_config()
    for config in (old_pixel, old_text):
        with config.unlocked():
            del config.sample["guidance_scale"]
    assert denoisers.default_guidance_scale(old_pixel) == 1.0
    assert denoisers.default_guidance_scale(old_text) == 7.5
    assert denoisers.default_guidance_scale(default_config.get_config()) == 1.0
    stored = default_config.get_config()
    stored.sample.guidance_scale = 3.0
    assert denoisers.default_guidance_scale(stored) == 3.0
    stored.sample.guidance_scale = -1.0
    with pytest.raises(ValueError, match="config.sample.guidance_scale must be finite and >= 0"):
        denoisers.default_guidance_scale(stored)


def test_cfg_guided_samples_concentrate_on_the_class():
    """CFG with s = 4 (w = 3) on the exact models: every sample lands in the requested
    component."""
    sched = _sched()
    y = jnp.array([0, 1] * 32)
    denoise = denoisers.build_denoiser(_ClassModel(sched), {"label": y}, guidance_scale=4.0)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (64, D))
    x = jax.jit(lambda: samplers.run("ddim", denoise, sched, x_T, jax.random.PRNGKey(1),
                                     samplers.make_options(num_steps=25)))()
    nearest = jnp.argmin(jnp.sum((x[:, None] - MEANS[None]) ** 2, -1), -1)
    np.testing.assert_array_equal(nearest, y)


def test_each_condition_kind_knows_its_null():
    """label -> num_classes; image -> kept (never dropped); text -> the caller's empty prompt."""
    seen = {}

    def model(x, t, cond):
        seen.update(cond)
        return jnp.zeros_like(x)

    b, x, t = 3, jnp.zeros((3, 4, 4, 1)), jnp.zeros((3,), jnp.int32)
    cond = {"label": jnp.array([0, 4, 2]), "image": jnp.arange(48.0).reshape(3, 4, 4, 1),
            "text": jnp.ones((b, 5, 8))}
    model.num_classes = 7
    null_text = jnp.full((1, 5, 8), -2.0)
    denoisers.build_denoiser(model, cond, guidance_scale=2.5, null_text=null_text)(x, t)
    np.testing.assert_array_equal(seen["label"], [0, 4, 2, 7, 7, 7])
    np.testing.assert_array_equal(seen["image"], jnp.concatenate([cond["image"]] * 2))
    np.testing.assert_array_equal(seen["text"][:b], cond["text"])
    np.testing.assert_array_equal(seen["text"][b:], jnp.full((b, 5, 8), -2.0))
    with pytest.raises(ValueError, match="null_text"):
        denoisers.build_denoiser(model, {"text": cond["text"]}, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"Unknown condition kind\(s\) \['lable'\]"):
        denoisers.build_denoiser(model, {"lable": cond["label"]})
    # an image-only condition has nothing to guide: the plain conditional model
    seen.clear()
    denoisers.build_denoiser(model, {"image": cond["image"]}, guidance_scale=2.0)(x, t)
    assert seen["image"].shape == (b, 4, 4, 1)


def test_sample_fn_compiles_once_for_every_guidance_scale_and_eta(monkeypatch):
    """generate.make_sample_fn on a class-conditional tiny UNet: the denoiser is built (traced)
    once across guidance scales and etas, each of which changes the samples; labels outside
    [0, num_classes) are an error before sampling."""
    config = micro_config()
    config.model.class_conditional = True
    config.model.dropout = 0.0
    mesh = sharding.make_mesh(config.mesh)
    model = objectives.build_model(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)  # off the zero-initialised output layer
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(treedef, [p + 0.1 * rng.standard_normal(p.shape).astype(p.dtype)
                                          for p in leaves])
    sched = schedules.schedule_from_config(config.diffusion)
    builds = []
    real_build = denoisers.build_denoiser
    monkeypatch.setattr(denoisers, "build_denoiser",
                        lambda *a, **k: builds.append(1) or real_build(*a, **k))
    sample_fn = generate.make_sample_fn(graphdef, sched, config, mesh, num_samples=4,
                                        sampler="ddim",
                                        options=samplers.options_from_config(config, num_steps=3,
                                                                             clip_x0=False))
    cond = {"label": np.array([0, 3, 5, 9])}
    key = jax.random.key(0)
    outs = [sample_fn(params, key, cond, guidance_scale=w, eta=eta)
            for w, eta in ((2.0, 0.0), (5.0, 0.0), (5.0, 0.8))]
    assert len(builds) == 1
    assert np.abs(outs[0] - outs[1]).max() > 1e-4 and np.abs(outs[1] - outs[2]).max() > 1e-4
    with pytest.raises(ValueError, match=r"integers in \[0, 9\] .* \[0, 10\]"):
        sample_fn(params, key, {"label": np.array([0, 3, 5, 10])})
    # NaN parameters (same program, no retrace): an error naming the sampler, not NaN images
    nan_params = jax.tree.map(lambda p: p * np.nan, params)
    with pytest.raises(FloatingPointError, match=r"sampler 'ddim' produced non-finite values"
                       rf" .*, first at step 1 of 3 \(t={sched.num_timesteps - 1}\)"):
        sample_fn(nan_params, key, cond, guidance_scale=2.0, eta=0.0)
    assert len(builds) == 1


def test_the_denoiser_carries_its_parameterisation_and_the_samplers_ask_it():
    """build_denoiser(..., diffusion=config.diffusion) knows pred_type and time; samplers.run
    takes the prediction type from it, whatever the options say."""
    import ml_collections
    sched = _sched()
    model = _ClassModel(sched)
    y = jnp.array([0, 1] * 4)
    as_v = lambda x, t, cond=None: _v_of(model(x, t, cond), x, t, sched)
    as_v.num_classes = NULL
    cfg = ml_collections.ConfigDict(dict(kind="discrete", pred_type="v"))
    denoise = denoisers.build_denoiser(as_v, {"label": y}, guidance_scale=3.0, diffusion=cfg)
    assert (denoise.pred_type, denoise.time) == ("v", "discrete")
    x_T = jax.random.normal(jax.random.PRNGKey(0), (8, D))
    eps_options = samplers.make_options(num_steps=10, pred_type="eps")
    got = samplers.run("ddim", denoise, sched, x_T, jax.random.PRNGKey(1), eps_options)
    want = samplers.run("ddim", denoisers.build_denoiser(model, {"label": y}, guidance_scale=3.0),
                        sched, x_T, jax.random.PRNGKey(1), eps_options)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)   # v read as v, not as eps
    bare = denoisers.build_denoiser(model)          # nothing declared: the options decide
    assert bare.pred_type is None
    assert samplers.for_denoiser(samplers.make_options(pred_type="v"), bare).pred_type == "v"
    with pytest.raises(ValueError, match="Unknown time 'seconds'"):
        denoisers.Denoiser(denoise.fn, "v", "seconds")
    with pytest.raises(ValueError, match="needs the schedule"):
        denoisers.build_denoiser(model, diffusion=ml_collections.ConfigDict(
            dict(kind="edm", pred_type="eps")))


def _v_of(eps, x, t, sched):
    """The v-prediction of the eps-prediction ``eps`` at ``x_t``."""
    from diffusion_jax import diffusion
    ab = sched.alphas_cumprod[t][:, None]
    x0 = diffusion.x0_from_eps(x, eps, ab)
    return diffusion.from_x0_and_eps(x0, eps, ab, "v")
