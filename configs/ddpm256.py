"""DDPM 256x256 recipe (LSUN / CelebA-HQ layout of Ho et al., 2020) on a folder of images.

Set ``--config.data.folder=DIR``. 114M parameters: use accelerators, bf16 and FSDP, e.g.
``--config.model.dtype=bfloat16 --config.mesh.fsdp=8``.
"""

from configs import default


def get_config():
    """256x256: ch 128, mult (1,1,2,2,4,4), attention at 16x16, lr 2e-5, batch 64, no dropout."""
    config = default.get_config()
    config.data.source = "image_folder"
    config.data.image_size = 256
    config.data.num_channels = 3
    config.data.random_flip = True

    config.model.base_channels = 128
    config.model.channel_mult = (1, 1, 2, 2, 4, 4)
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0

    config.optim.learning_rate = 2e-5
    config.optim.warmup_steps = 5000
    config.optim.ema_decays = (0.9999,)

    config.train.batch_size = 64
    config.train.num_steps = 500_000
    return config
