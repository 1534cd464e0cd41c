"""Trains a diffusion model: ``python run_train.py --config=configs/digits.py --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.train.batch_size=64``; re-running with
the same ``--workdir`` resumes from its latest checkpoint (``--step=N``: from checkpoint N,
the way past a broken latest checkpoint). A config that changes what the stored weights mean
is refused.

SIGTERM / SIGINT save a checkpoint after the current step and exit with 143 / 130; a second
signal exits at once. A second run on a workdir that is being trained stops at once, naming
the holder of ``WORKDIR/train.lock``. Errors (a busy workdir, bad config, data or stage
workdirs, a refused resume) end with a one-line message and exit status 1.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import checkpoint, compilation_cache, resume, train, workdir_lock

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/digits.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_STEP = flags.DEFINE_integer(
    "step", None, "Resume from this checkpoint step instead of the latest; newer checkpoints "
    "are moved to WORKDIR/checkpoints_set_aside/.")
flags.mark_flags_as_required(["config", "workdir"])
_JIT_CACHE = flags.DEFINE_string("compilation_cache_dir", None, compilation_cache.FLAG_HELP)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    compilation_cache.enable(_JIT_CACHE.value)
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, resume_step=_STEP.value)
    except train.TrainingInterrupted as e:
        print(f"Stopped: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except checkpoint.CheckpointSaveError as e:
        print(f"FATAL CheckpointSaveError: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # pylint: disable=protected-access  a stuck writer thread must not block exit
    except (resume.ResumeError, FloatingPointError, workdir_lock.WorkdirLockedError,
            ValueError, FileNotFoundError) as e:  # bad config, data or stage workdirs
        sys.exit(f"FATAL {type(e).__name__}: {_one_line(e)}")


def _one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined by '; ')."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _parse_flags(argv):
    """absl flag parsing that turns a bad ``--config.*`` override into a one-line error."""
    try:
        return flags.FLAGS(argv)
    except AttributeError as e:  # a --config.* key that the config does not have
        message = str(e)[1:-1] if str(e).startswith("'") else str(e)  # a quoted KeyError
        message = message.replace("\\n", " ").replace("\\'", "'")
        raise SystemExit(f"FATAL Flags parsing error: unknown config field {message}")
    except (flags.Error, KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"FATAL Flags parsing error: {e}\nPass --helpfull to see the flags.")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
