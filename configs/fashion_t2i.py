"""Stage 3 of text-to-image: a cross-attention latent diffusion UNet on Fashion-MNIST.

    python run_train.py --config=configs/fashion_t2i.py --workdir=runs/fashion_t2i \
        --config.latent.autoencoder_workdir=runs/fashion_ae \
        --config.latent.clip_workdir=runs/fashion_clip

Trains on 8x8x4 latents of the frozen autoencoder, scaled by 1 / std (measured once, stored
in the config and WORKDIR/latent_scale.json), conditioned on the frozen CLIP text encoder's
token states; 10 % of captions become the empty prompt for classifier-free guidance. Every 500
steps it writes a grid of its prompts (WORKDIR/samples/step_<step>.png, through the pipeline's
text-to-image program with the sampling defaults below).
"""

from configs import fashion_common


def get_config(variant: str = ""):
    config = fashion_common.get_config("latent_diffusion", variant)
    config.latent.autoencoder_workdir = "runs/fashion_ae"
    config.latent.clip_workdir = "runs/fashion_clip"
    config.latent.caption_drop_prob = 0.1
    config.model.block_out_channels = (32, 64)  # a CondUNet of 1.08M parameters
    config.model.cross_attn = (True, True)
    config.model.heads_per_level = (2, 4)
    config.model.num_res_blocks = 1
    config.model.num_groups = 16
    config.diffusion.schedule = "scaled_linear"  # Stable Diffusion's
    config.diffusion.beta_start = 0.00085
    config.diffusion.beta_end = 0.012
    config.diffusion.num_timesteps = 1000
    # v-prediction with Min-SNR-5 weighting: at the same 2500 steps the sandals (thin straps,
    # the hardest class) come out as sandals, which eps / uniform weighting did not manage.
    config.diffusion.pred_type = "v"
    config.diffusion.loss_weighting = "min_snr"
    config.sample.clip_x0 = False  # latents are not bounded
    config.sample.num_steps = 50
    config.sample.guidance_scale = 7.5  # the sampling default (was run_sample.py's for SD)
    config.sample.num_samples = 20  # training grid: "a photo of <class>", two per class
    config.train.eval_every = 500  # a grid in WORKDIR/samples/ with each checkpoint
    config.optim.learning_rate = 1e-3
    config.train.num_steps = 2500
    if variant == "tiny":
        config.model.block_out_channels = (16, 16)
        config.model.heads_per_level = (2, 2)
        config.model.num_groups = 4
        config.latent.scale_num_images = 16
        config.diffusion.num_timesteps = 100
        config.sample.num_steps = 4
        config.train.num_steps = 3
        config.train.eval_every = 0
    return config
