"""EDM-preconditioned model of the 8x8 digits (Karras et al., 2022; the digits.py UNet).

``python run_train.py --config=configs/digits_edm.py --workdir=W``, then
``python run_sample.py --workdir=W --sampler=edm_heun --steps=10 --out=O``.
"""

from configs import digits


def get_config():
    """digits.py with ``diffusion.kind = "edm"`` (sigma_data 0.5, ln sigma ~ N(-1.2, 1.2^2)) and
    a continuous time input; samples on DDPM's linear T = 1000 grid (sigma 0.01 -> 157)."""
    config = digits.get_config()
    # Sample on DDPM's linear grid, not the cosine one of digits.py (sigma_{T-1} ~ 2e4).
    config.diffusion.schedule = "linear"
    config.sample.sigma_spacing = None
    config.sample.sigma_max = None
    config.diffusion.kind = "edm"
    config.model.time_input = "continuous"
    config.sample.sampler = "edm_heun"
    config.sample.num_steps = 10
    return config
