"""SR3 super-resolution of sklearn digits, 8x8 -> 16x16 (about 1-2 minutes of CPU training).

Starts from ``configs/digits.py`` (same data and diffusion). The model sees the noisy 16x16
image concatenated with the bicubic upsample of its 8x8 area average
(``model.cond_image_channels = 1``); the low-resolution input is noise-augmented at a random
step ``s <= sr.aug_max_t`` in training (cascaded diffusion) and at ``sr.sample_aug_t`` when it
comes from a base model. ``diffusion_jax.applications.super_resolution`` builds the
conditioning (``sr_training_condition`` for training, ``sr_sample`` for sampling).
"""

from configs import digits


def get_config():
    """Digits 16x16 from 8x8: ch 32, mult (1, 2), batch 64, 1500 steps, no sample grids."""
    config = digits.get_config()
    config.model.channel_mult = (1, 2)
    config.model.class_conditional = False
    config.model.cond_image_channels = 1

    config.train.num_steps = 1500
    config.train.eval_every = 0  # the training sample grid has no low-res inputs to condition on
    config.train.checkpoint_every = 500
    config.sample.num_samples = 16

    config.sr.aug_max_t = 100  # training: low-res noised at s ~ U{0..aug_max_t}
    config.sr.sample_aug_t = 50  # cascade sampling: low-res noised at this step
    return config
