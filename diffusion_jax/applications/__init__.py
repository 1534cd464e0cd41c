"""Conditional generation and editing built on the shared samplers.

Each module is small and takes a denoiser ``denoise(x, t) -> prediction``:

* :mod:`~diffusion_jax.applications.sdedit`: SDEdit, noise a guide image part-way and denoise.
* :mod:`~diffusion_jax.applications.ilvr`: ILVR, match a reference's low frequencies each step.
* :mod:`~diffusion_jax.applications.inversion`: DDIM inversion, reconstruction, editing.
* :mod:`~diffusion_jax.applications.inpaint`: known-pixel replacement and RePaint resampling.
* :mod:`~diffusion_jax.applications.super_resolution`: SR3 conditioning and cascades.
* :mod:`~diffusion_jax.applications.cli`: the ``--task`` entry point used by ``run_sample.py``.
* :mod:`~diffusion_jax.applications.common`: noising to a step, block resampling, sampler dispatch.

Guidance (classifier-free, classifier, loss) lives in :mod:`diffusion_jax.guidance`.
"""
