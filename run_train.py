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

from absl import flags as absl_flags

from diffusion_jax import checkpoint, train, workdir_lock
from diffusion_jax.cli import flags

_CONFIG = flags.define_config(None, lock=True)
_WORKDIR = flags.define_workdir("Directory for checkpoints, logs and samples.")
_STEP = flags.define_step(
    "Resume from this checkpoint step instead of the latest; newer checkpoints are moved to "
    "WORKDIR/checkpoints_set_aside/.")
absl_flags.mark_flags_as_required(["config", "workdir"])
flags.define_compilation_cache()


def main():
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, resume_step=_STEP.value)
    except train.TrainingInterrupted as e:
        print(f"Stopped: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except checkpoint.CheckpointSaveError as e:
        print(f"FATAL CheckpointSaveError: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # pylint: disable=protected-access  a stuck writer thread must not block exit


if __name__ == "__main__":
    flags.run(main, errors=(workdir_lock.WorkdirLockedError,))
