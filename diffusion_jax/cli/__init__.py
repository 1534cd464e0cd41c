"""The command-line layer: flags, their checks, input files and outputs of the entry points.

* :mod:`~diffusion_jax.cli.sample`: the flags of ``run_sample.py`` (sampling, the applications
  and text-to-image), their checks against the loaded model, input images and output files.

The entry points themselves stay short top-level scripts (``run_train.py``, ``run_sample.py``,
``run_eval.py``). This is the top layer: nothing in the library imports it.
"""
