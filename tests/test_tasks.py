"""The one task table of `diffusion_jax.applications.tasks`, read by the pipelines and the app."""
import types

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import samplers, schedules
from diffusion_jax.app import engine as app_engine
from diffusion_jax.applications import sdedit, tasks


def test_identity_codec_is_a_factor_one_codec():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    assert tasks.IDENTITY.factor == 1
    assert tasks.IDENTITY.encode(x) is x and tasks.IDENTITY.decode(x) is x
    hole = jnp.zeros((1, 4, 4, 1)).at[:, :2].set(1.0)
    np.testing.assert_array_equal(tasks.latent_known_mask(hole, 1), 1.0 - hole)


def test_a_pixel_sdedit_is_the_img2img_runner_with_the_identity_codec():
    """SDEdit of a pixel model and img2img of a latent pipeline are one runner; with a codec
    that scales by 2 the runner edits 2 x and halves the result."""
    sched = schedules.make_schedule(schedules.linear_beta_schedule(50, 1e-3, 0.2))
    denoise = lambda x, t: 0.1 * x
    options = samplers.make_options(num_steps=5)
    x, key = jax.random.normal(jax.random.key(1), (2, 4, 4, 1)), jax.random.key(2)
    assert tasks.TASK_TABLE["sdedit"].runner is tasks.TASK_TABLE["img2img"].runner
    run = tasks.TASK_TABLE["img2img"].runner
    out = run(denoise, tasks.IDENTITY, sched, "ddim", options, {"x": x}, key, strength=0.6,
              decode=True)
    np.testing.assert_array_equal(out, sdedit.sdedit(denoise, sched, x, key, t0=0.6,
                                                     sampler="ddim", options=options))
    doubling = types.SimpleNamespace(encode=lambda v: 2.0 * v, decode=lambda v: 0.5 * v)
    out2 = run(denoise, doubling, sched, "ddim", options, {"x": x}, key, strength=0.6,
               decode=True)
    np.testing.assert_allclose(out2, 0.5 * sdedit.sdedit(denoise, sched, 2.0 * x, key, t0=0.6,
                                                         sampler="ddim", options=options),
                               rtol=1e-6)


def test_the_app_tabs_are_read_from_the_table(monkeypatch):
    def tabs(kind, clip_workdir=None):
        return app_engine.Engine.tasks.fget(types.SimpleNamespace(kind=kind,
                                                                  clip_workdir=clip_workdir))
    assert tabs(tasks.PIXEL) == ("sample", "compare")
    assert tabs(tasks.TEXT) == ("text_to_image", "inpaint", "invert", "img2img", "compare")
    assert "diffusionclip" in tabs(tasks.TEXT, clip_workdir="clip")
    monkeypatch.setitem(tasks.TASK_TABLE, "ilvr", tasks.Task(
        kinds=(tasks.PIXEL,), cli=(tasks.PIXEL,), app=(tasks.PIXEL,), sampler=True))
    assert tabs(tasks.PIXEL) == ("sample", "ilvr", "compare")
