"""DDPM CIFAR-10 recipe (Ho et al., 2020): 35.7M-param UNet, 800k steps of batch 128.

Needs the prepared tfds ``cifar10`` (ArrayRecord); pass ``--config.data.data_dir=DIR``.
"""

from configs import default


def get_config():
    """CIFAR-10 32x32: ch 128, mult (1,2,2,2), attention at 16x16, dropout 0.1, EMA 0.9999."""
    config = default.get_config()
    config.data.source = "tfds"
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.num_classes = 10
    config.data.random_flip = True

    config.model.base_channels = 128
    config.model.channel_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1

    config.optim.name = "adam"
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.grad_clip = 1.0
    config.optim.ema_decays = (0.9999,)

    config.train.batch_size = 128
    config.train.num_steps = 800_000
    config.train.eval_every = 10_000
    config.train.checkpoint_every = 10_000
    return config
