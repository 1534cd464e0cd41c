"""Flags the entry points share, and the one absl preamble they all run under.

Every command line of the project is an absl app: ``--flag=value`` and ``--flag value`` both
work, ``--helpfull`` lists every flag. An entry point defines its flags with the ``define_*``
functions here (one name, one meaning and one help text per flag across the project) plus its
own, and ends with::

    if __name__ == "__main__":
        flags.run(main)                 # main() takes no arguments

:func:`run` parses the flags (a bad ``--config.*`` override is one line naming the key), refuses
positional arguments, quiets orbax's per-file INFO logging unless ``--verbosity`` is given,
points JAX's compilation cache at ``--compilation_cache_dir`` when the entry point defines it,
and turns the errors a user can cause (a bad flag value, a missing file, a non-finite result)
into one line on stderr and exit status 1 (:func:`error_line`), never a traceback.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from absl import app, logging
from absl import flags as absl_flags
from ml_collections import config_flags

from diffusion_jax import compilation_cache, samplers

FLAGS = absl_flags.FLAGS
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
"""What :func:`run` reports as one line: bad input, missing files, non-finite results."""
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "default.py")
"""``configs/default.py`` of this checkout: the settings of a model without a stored config."""


def define_config(default: str | None = DEFAULT_CONFIG, help_text: str = "Config file, e.g. "
                  "configs/digits.py.", *, lock: bool = False, flag_values=FLAGS):
    """``--config`` (ml_collections ``config_flags``; fields as ``--config.a.b=value``).

    With a ``default`` file, config_flags reads the ``--config.*`` overrides of ``sys.argv``
    here already; an unknown key then exits with the one line of :func:`parse_flags`.
    """
    try:
        return config_flags.DEFINE_config_file("config", default, help_text, lock_config=lock,
                                               flag_values=flag_values)
    except AttributeError as e:
        raise SystemExit(_unknown_config_field(e)) from None


def define_workdir(help_text: str = "Training workdir to load the latest checkpoint of.",
                   default: str | None = None, *, flag_values=FLAGS):
    """``--workdir``: a training run's directory (checkpoints, config, logs)."""
    return absl_flags.DEFINE_string("workdir", default, help_text, flag_values=flag_values)


def define_checkpoint(help_text: str = "A Stable Diffusion pipeline directory "
                      "(model_index.json) or a converted diffusers UNet2DModel checkpoint, "
                      "instead of --workdir.", *, flag_values=FLAGS):
    """``--checkpoint``: a converted or diffusers checkpoint directory, instead of a workdir."""
    return absl_flags.DEFINE_string("checkpoint", None, help_text, flag_values=flag_values)


def define_step(help_text: str = "Checkpoint step to load (default: the latest).", *,
                flag_values=FLAGS):
    """``--step``: one checkpoint of ``--workdir`` instead of its latest."""
    return absl_flags.DEFINE_integer("step", None, help_text, flag_values=flag_values)


def define_out(help_text: str = "Output directory.", default: str | None = None, *,
               flag_values=FLAGS):
    """``--out``: where the outputs go."""
    return absl_flags.DEFINE_string("out", default, help_text, flag_values=flag_values)


def define_seed(help_text: str = "Sampling seed.", default: int = 0, *, flag_values=FLAGS):
    """``--seed``: the run's PRNG seed."""
    return absl_flags.DEFINE_integer("seed", default, help_text, flag_values=flag_values)


def define_steps(help_text: str = "Sampler steps (default: config.sample.num_steps).",
                 default: int | None = None, *, flag_values=FLAGS):
    """``--steps``: sampler steps (DDIM steps, Langevin levels, ODE steps, ...)."""
    return absl_flags.DEFINE_integer("steps", default, help_text, flag_values=flag_values)


def define_sampler(help_text: str = "Sampler (default: config.sample.sampler).",
                   default: str | None = None, *, flag_values=FLAGS):
    """``--sampler``: a name of the sampler registry."""
    return absl_flags.DEFINE_enum("sampler", default, list(samplers.SAMPLERS), help_text,
                                  flag_values=flag_values)


def define_compilation_cache(*, flag_values=FLAGS):
    """``--compilation_cache_dir``: JAX's persistent compilation cache (:func:`run` enables it)."""
    return absl_flags.DEFINE_string("compilation_cache_dir", None, compilation_cache.FLAG_HELP,
                                    flag_values=flag_values)


def run(main: Callable[[], None], *, prog: str | None = None,
        errors: tuple[type[BaseException], ...] = ()) -> None:
    """Runs ``main()`` as an absl app under the shared preamble (see the module docstring).

    Args:
        main: the entry point's body; reads its flags from ``FLAGS``.
        prog: the program's name for error lines (``prog: error: message``); ``None`` writes
            ``FATAL ErrorType: message`` (the training and evaluation entry points).
        errors: exception types reported as one line besides :data:`USER_ERRORS`.
    """
    def wrapped(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        if not FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
            logging.set_verbosity(logging.WARNING)
        try:
            if "compilation_cache_dir" in FLAGS:
                compilation_cache.enable(FLAGS.compilation_cache_dir)
            main()
        except USER_ERRORS + tuple(errors) as err:
            sys.exit(error_line(err, prog))

    app.run(wrapped, flags_parser=parse_flags)


def run_in_process(define: Callable, main: Callable, argv: Sequence[str], *, prog: str,
                   doc: str = "", errors: tuple[type[BaseException], ...] = ()):
    """The preamble for entry points that tests also call as functions (the converters, the
    web app): flags on a fresh ``FlagValues`` (so calls do not share state), no ``app.run``.

    Args:
        define: ``define(flag_values)`` registers the entry point's flags.
        main: ``main(flag_values)``, the body; its return value is returned.
        argv: the arguments after the program name.
        prog: the program's name in error lines and in the help.
        doc: the text ``--help`` prints above the flags.
        errors: exception types reported as one line besides :data:`USER_ERRORS`.

    Raises:
        SystemExit: ``--help`` (status 0, help printed), a bad flag or an error of ``errors``
            / :data:`USER_ERRORS` (one line ``prog: error: message``, status 1).
    """
    fv = absl_flags.FlagValues()
    define(fv)
    if {"-h", "--help", "--helpshort", "--helpfull"} & set(argv):
        print(f"{doc.strip()}\n\nflags of {prog}:\n{fv.get_help()}")
        raise SystemExit(0)
    try:
        rest = fv([prog, *argv])[1:]
    except absl_flags.Error as err:
        raise SystemExit(f"{prog}: error: {err}") from None
    if rest:
        raise SystemExit(f"{prog}: error: unexpected arguments {rest}")
    try:
        return main(fv)
    except USER_ERRORS + tuple(errors) as err:
        raise SystemExit(error_line(err, prog)) from None


def error_line(err: BaseException, prog: str | None = None) -> str:
    """The one line an error ends a command with: ``prog: error: message`` or, without a
    program name, ``FATAL ErrorType: message``; a multi-line message's lines joined by '; '."""
    message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{prog}: error: {message}" if prog else f"FATAL {type(err).__name__}: {message}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad ``--config.*`` override as one line naming the key."""
    try:
        return FLAGS(argv)
    except AttributeError as e:  # a --config.* key that the config does not have
        raise SystemExit(_unknown_config_field(e)) from None
    except (absl_flags.Error, KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"FATAL Flags parsing error: {e}\nPass --helpfull to see the flags.") \
            from None


def _unknown_config_field(error: AttributeError) -> str:
    """The line for a ``--config.*`` key the config does not have (a quoted ``KeyError``)."""
    message = str(error)[1:-1] if str(error).startswith("'") else str(error)
    message = message.replace("\\n", " ").replace("\\'", "'")
    return f"FATAL Flags parsing error: unknown config field {message}"
