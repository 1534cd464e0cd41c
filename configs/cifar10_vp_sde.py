"""Reference: score_sde's CIFAR-10 VP SDE recipe (Song et al., 2021, "DDPM++ cont. (VP)").

Hyper-parameters from the paper / its configs: continuous-time DSM of the VP SDE with
beta_min = 0.1, beta_max = 20 (N = 1000), t ~ U(1e-5, 1), Adam lr 2e-4 with 5000 warmup
steps, gradient clipping 1.0, batch 128, 1.3M iterations, EMA 0.9999, dropout 0.1, 128
channels, mult (1, 2, 2, 2), 4 residual blocks per level, attention at 16x16; sampling by
the reverse SDE (Euler--Maruyama predictor, no corrector, 1000 steps) or the
probability-flow ODE. NCSN++ / DDPM++'s architecture (FIR resampling, skip rescaling, ...)
is NOT implemented: this config uses our DDPM UNet with the same width and depth, so its FID
will not match the paper's 2.41 / 3.37 (unverified here: no CIFAR-10 run was made).
Needs the prepared tfds ``cifar10``; pass ``--config.data.data_dir=DIR``.
"""

from configs import cifar10


def get_config():
    """CIFAR-10 32x32, VP SDE, our UNet (ch 128, mult (1,2,2,2), 4 res blocks, attn 16)."""
    config = cifar10.get_config()
    config.diffusion.kind = "vp"
    config.diffusion.sde_beta_min = 0.1
    config.diffusion.sde_beta_max = 20.0
    config.diffusion.sde_eps = 1e-5
    config.diffusion.likelihood_weighting = False
    config.model.time_input = "continuous"
    config.model.num_res_blocks = 4
    config.train.num_steps = 1_300_000
    config.sample.sampler = "pc"
    config.sample.predictor = "euler_maruyama"
    config.sample.corrector = "none"
    config.sample.num_steps = 1000
    config.sample.sde = "vp"
    config.sample.sde_eps = 1e-3
    return config
