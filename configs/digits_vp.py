"""Continuous-time VP SDE model of the 8x8 digits (score_sde's DSM; the digits.py UNet).

``python run_train.py --config=configs/digits_vp.py --workdir=W``, then sample it with any
solver, e.g. ``python run_sample.py --workdir=W --sampler=pc --steps=100 --out=O``.
"""

from configs import digits


def get_config():
    """digits.py with ``diffusion.kind = "vp"`` (beta 0.1 -> 20, t ~ U(1e-5, 1)) and a
    continuous time input; samples on DDPM's linear T = 1000 grid (the same noise levels)."""
    config = digits.get_config()
    # Sample on DDPM's linear grid, not the cosine one of digits.py (sigma_{T-1} ~ 2e4).
    config.diffusion.schedule = "linear"
    config.sample.sigma_spacing = None
    config.sample.sigma_max = None
    config.diffusion.kind = "vp"
    config.model.time_input = "continuous"
    config.sample.sampler = "dpm_solver_pp"
    config.sample.num_steps = 20
    return config
