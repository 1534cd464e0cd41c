"""Seconds-long CPU config for tests: a ~60k-parameter one-level UNet on 8x8 sklearn digits."""

from configs import default


def get_config():
    """8x8 grayscale digits, ch 16, one level (mult (1,)), no attention, batch 16, 4 steps."""
    config = default.get_config()
    config.data.source = "digits"
    config.data.image_size = 8
    config.data.num_channels = 1
    config.data.num_classes = 10
    config.data.random_flip = False

    config.model.base_channels = 16
    config.model.channel_mult = (1,)  # one level: compiles in seconds
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.model.num_groups = 8
    config.model.dropout = 0.1

    config.diffusion.num_timesteps = 100
    config.diffusion.beta_end = 0.2  # keeps alpha_bar_{T-1} ~ 0 with T = 100

    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 0
    config.optim.ema_decays = (0.9, 0.5)

    config.train.batch_size = 16
    config.train.num_steps = 4
    config.train.log_every = 2
    config.train.eval_every = 0
    config.train.checkpoint_every = 2
    config.train.keep_checkpoints = 2
    config.train.async_checkpointing = False

    config.sample.sampler = "ddim"
    config.sample.num_steps = 5
    config.sample.num_samples = 8
    return config
