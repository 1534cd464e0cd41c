"""Conditional generation and editing built on the shared samplers.

Each module is small and takes a denoiser ``denoise(x, t) -> prediction``:

* :mod:`~diffusion_jax.applications.sdedit`: SDEdit, noise a guide image part-way and denoise.
* :mod:`~diffusion_jax.applications.ilvr`: ILVR, match a reference's low frequencies each step.
* :mod:`~diffusion_jax.applications.inversion`: DDIM inversion, reconstruction, editing.
* :mod:`~diffusion_jax.applications.inpaint`: known-pixel replacement and RePaint resampling.
* :mod:`~diffusion_jax.applications.super_resolution`: SR3 conditioning and cascades.
* :mod:`~diffusion_jax.applications.tasks`: one call per application on a model (arrays in,
  arrays out), used by ``run_sample.py --task=...`` and the figure script.
* :mod:`~diffusion_jax.applications.common`: noising to a step, the SDEdit start step.

Samplers are run through the one registry, :func:`diffusion_jax.samplers.run`. Classifier-free
guidance is :func:`diffusion_jax.denoisers.build_denoiser`; classifier and loss guidance live in
:mod:`diffusion_jax.guidance`.
"""
