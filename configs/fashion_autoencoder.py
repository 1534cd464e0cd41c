"""Stage 1 of text-to-image: the KL autoencoder on Fashion-MNIST (32x32x1 -> 8x8x4 latents).

    python run_train.py --config=configs/fashion_autoencoder.py --workdir=runs/fashion_ae

Loss (objectives.py): mean|x - x_hat| + mean (x - x_hat)^2 + 1e-4 KL / (32 * 32); at the end
the test split's reconstruction PSNR is written to WORKDIR/eval.json.
"""

from configs import fashion_common


def get_config(variant: str = ""):
    config = fashion_common.get_config("autoencoder", variant)
    config.autoencoder.block_out_channels = (16, 32, 32)  # 0.23M parameters
    config.autoencoder.latent_channels = 4
    config.autoencoder.l1_weight = 1.0
    config.autoencoder.l2_weight = 1.0
    config.autoencoder.kl_weight = 1e-4
    config.train.batch_size = 32
    config.train.num_steps = 1000
    if variant == "tiny":
        config.autoencoder.block_out_channels = (8, 8, 8)
        config.autoencoder.norm_num_groups = 4
        config.train.num_steps = 3
    return config
