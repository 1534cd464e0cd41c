"""Score-based SDE mathematics (pure functions; no model imports, no samplers).

Modules: :mod:`.sdes` (VE / VP / sub-VP SDEs, their marginals and discretisation),
:mod:`.adapters` (discrete DDPM model -> x0-denoiser of sigma / score of t; the SDE of a
schedule; dynamic thresholding), :mod:`.training` (continuous DSM, EDM preconditioning and
loss), :mod:`.ode` (the probability-flow drift and the fixed-step and diffrax adaptive
integrators), :mod:`.likelihood` (ODE log-likelihood, dequantised bits/dim),
:mod:`.flow` (rectified flow / flow matching: path, time sampling and shifts, loss, velocity
conversions) and :mod:`.parameterization` (``diffusion.kind``: continuous-time training
objectives and the discrete view that lets every sampler run a continuous model). The
solvers built on them (predictor--corrector, probability-flow sampling, EDM Heun,
DPM-Solver++, the flow samplers) are entries of :mod:`diffusion_jax.samplers`.
"""
