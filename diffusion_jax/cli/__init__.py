"""The command-line layer: flags, their checks, input files and outputs of the entry points.

* :mod:`~diffusion_jax.cli.flags`: the flags the entry points share (``--workdir``,
  ``--checkpoint``, ``--step``, ``--out``, ``--seed``, ``--steps``, ``--sampler``, ``--config``,
  ``--compilation_cache_dir``) and the one absl preamble they run under (:func:`.flags.run`,
  :func:`.flags.run_in_process`): one-line errors with exit status 1, never a traceback.
* :mod:`~diffusion_jax.cli.sample`: the flags of ``run_sample.py`` (sampling, the applications
  and text-to-image), their checks against the loaded model, input images and output files.
* :mod:`~diffusion_jax.cli.convert`: the converters' command lines
  (``python -m diffusion_jax.convert.unet2d`` / ``.pipeline``).

The entry points themselves stay short top-level scripts (``run_train.py``, ``run_sample.py``,
``run_eval.py``, ``scripts/*.py``) or ``__main__`` blocks (the converters, the web app's
``python -m diffusion_jax.app``). This is the top layer: nothing in the library imports it.
"""
