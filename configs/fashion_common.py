"""Shared settings of the three Fashion-MNIST text-to-image stages (fashion_*.py).

Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (``make fashion-data``), 28x28
grayscale resized to 32x32 so the autoencoder's two stride-2 levels give 8x8 latents.
The ``tiny`` variant (``--config=configs/fashion_clip.py:tiny``) shrinks the models and runs
a few steps on the first records, for tests (pass ``--config.data.folder`` to tiny IDX files).
"""

from configs import default
from diffusion_jax.idx import FASHION_DIR


def get_config(objective: str, variant: str):
    """The default config set up for Fashion-MNIST and ``objective``; ``variant`` "" or "tiny"."""
    if variant not in ("", "tiny"):
        raise ValueError(f"config variant {variant!r} must be '' or 'tiny'.")
    config = default.get_config()
    config.train.objective = objective
    config.data.source = "idx"
    config.data.folder = FASHION_DIR
    config.data.split = "train"
    config.data.image_size = 32
    config.data.num_channels = 1
    config.data.num_classes = 10
    config.data.random_flip = False

    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.schedule = "cosine"
    config.optim.ema_decays = (0.999,)
    config.optim.ema_warmup = True  # runs of 1-3k steps: without it the EMA keeps init weights
    config.train.batch_size = 64
    config.train.log_every = 100
    config.train.eval_every = 0
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 1
    config.train.async_checkpointing = False
    if variant == "tiny":
        config.train.batch_size = 8
        config.train.num_steps = 3
        config.train.log_every = 1
        config.train.checkpoint_every = 0
        config.optim.warmup_steps = 0
        config.optim.ema_decays = (0.5,)
        config.final_eval.num_images = 16
        config.final_eval.batch_size = 8
    return config
