"""CPU demo: sklearn's 1,797 real 8x8 handwritten digits, trained in minutes on 2 cores.

``python run_train.py --config=configs/digits.py --workdir=demo/workdir``, then
``python run_sample.py --workdir=demo/workdir --sampler=ddim --steps=100 --out=demo``.
"""

from configs import default


def get_config():
    """8x8 grayscale digits, 0.65M-param UNet (ch 32, mult (1,2)), batch 128, 1500 steps."""
    config = default.get_config()
    config.data.source = "digits"
    config.data.image_size = 8  # the digits' native size: 4x cheaper than upscaling to 16
    config.data.num_channels = 1
    config.data.num_classes = 10
    config.data.random_flip = False  # digits are not mirror-symmetric

    config.model.base_channels = 32
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.model.num_groups = 8
    config.model.dropout = 0.0

    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 100
    config.optim.schedule = "cosine"
    config.optim.ema_decays = (0.995,)

    config.train.batch_size = 128
    config.train.num_steps = 1500
    config.train.log_every = 100
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 2

    config.sample.sampler = "ddim"
    config.sample.num_steps = 50
    config.sample.num_samples = 64
    return config
