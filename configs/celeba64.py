"""CelebA 64x64 (DDIM paper setting): tfds ``celeb_a``, center-cropped and resized to 64x64."""

from configs import default


def get_config():
    """CelebA 64: ch 128, mult (1,2,2,2,4), attention at 16x16, dropout 0.1, EMA 0.9999."""
    config = default.get_config()
    config.data.source = "tfds"
    config.data.name = "celeb_a"
    config.data.image_size = 64
    config.data.num_channels = 3
    config.data.random_flip = True

    config.model.base_channels = 128
    config.model.channel_mult = (1, 2, 2, 2, 4)
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1

    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.ema_decays = (0.9999,)

    config.train.batch_size = 128
    config.train.num_steps = 500_000
    return config
