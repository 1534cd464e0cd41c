"""Score-based SDEs and fast continuous-time solvers (pure functions; no model imports).

Modules: :mod:`.sdes` (VE / VP / sub-VP SDEs), :mod:`.adapters` (discrete DDPM model ->
x0-denoiser of sigma / score of t; dynamic thresholding), :mod:`.training` (continuous DSM, EDM
preconditioning and loss), :mod:`.pc` (predictor--corrector), :mod:`.ode` (probability-flow ODE,
fixed-step and diffrax adaptive), :mod:`.edm` (Karras sigmas, Heun with churn),
:mod:`.dpm_solver` (DPM-Solver++ 1/2/3M), :mod:`.likelihood` (ODE log-likelihood, dequantised
bits/dim), :mod:`.registry` (the samplers behind the sampler registry's contract) and
:mod:`.parameterization` (``diffusion.kind``: continuous-time training objectives and the
discrete view that lets every sampler run a continuous model).
"""
