"""The ``latent_diffusion`` objective's training-time sample grid is the text-to-image pipeline's
output for the same parameters, prompts, key and sampler.

The frozen stages are checkpoints written directly (random parameters, no compiled train step,
as in test_t2i_pinning.py); only the text-to-image stage is trained: two steps with a grid
after each, so the second step also runs after a grid was sampled from the state it donates.
"""
import os

import jax
import numpy as np
from PIL import Image
from test_t2i_pinning import _config, _save
from test_t2i_stages import _fake_fashion

from configs import fashion_autoencoder, fashion_clip, fashion_t2i
from diffusion_jax import (captions, generate, image_io, objectives, pipelines, sharding,
                           stage_pipeline, train)

STEPS = 2


def _t2i_config(root):
    data_dir, ae, clip = str(root / "fashion"), str(root / "ae"), str(root / "clip")
    _fake_fashion(data_dir)
    _save(_config(fashion_autoencoder, data_dir), ae, 1)
    _save(_config(fashion_clip, data_dir), clip, 1)
    config = _config(fashion_t2i, data_dir, autoencoder_workdir=ae, clip_workdir=clip,
                     scale_factor=1.0)
    config.train.num_steps = STEPS
    config.train.eval_every = 1
    config.sample.num_samples = 10                 # one prompt per class
    config.sample.num_steps = 3
    config.sample.guidance_scale = 3.0             # guided: the null prompt matters
    return config


def test_the_grid_is_the_text_to_image_pipelines_output(tmp_path):
    config, workdir = _t2i_config(tmp_path), str(tmp_path / "t2i")
    state = train.train_and_evaluate(config, workdir)
    names = sorted(os.listdir(os.path.join(workdir, "samples")))
    assert names == [f"step_{s:07d}.png" for s in range(1, STEPS + 1)]
    expected = pipelines.text_to_image(                            # the final checkpoint
        stage_pipeline.load_pipeline(workdir), captions.class_prompts("a photo of {}"),
        jax.random.key(config.seed), guidance_scale=config.sample.guidance_scale,
        sampler=config.sample.sampler, num_steps=config.sample.num_steps,
        mesh=sharding.make_mesh(config.mesh), output="float")
    written = np.asarray(Image.open(os.path.join(workdir, "samples", names[-1])))
    np.testing.assert_array_equal(
        written, image_io.image_grid(image_io.to_uint8(expected))[..., 0])
    # the objective's sample function in floats: the same numbers
    resolved = objectives.prepare_config(config, workdir)
    built = train.build(resolved)
    sample_fn = objectives.get("latent_diffusion").sample_fn(resolved, built.graphdef,
                                                              built.schedule, built.mesh)
    got = sample_fn(generate.sampling_params(state), jax.random.key(config.seed))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert got.shape == (10, 32, 32, 1) and np.std(got) > 1e-3
