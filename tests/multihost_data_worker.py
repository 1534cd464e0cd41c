"""One process of test_multihost's data check: joins the job, writes its first host batches.

Started by ``scripts/multihost_local.py``, which appends the ``--config.distributed.*``
flags. Saves ``images: [3, B / P, S, S, C]`` of the first 3 host-local batches that
``data.make_train_iterator`` gives this process (its default ``jax.process_index()`` /
``jax.process_count()``) to ``--out/process_<jax.process_index()>.npz``.
"""

import os
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusion_jax import data  # noqa: E402  pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")


def main(_):
    dist = _CONFIG.value.distributed
    jax.distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id)
    cfg = _CONFIG.value
    it = data.make_train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.seed)
    images = np.stack([next(it)["image"] for _ in range(3)])
    np.savez(os.path.join(_OUT.value, f"process_{jax.process_index()}.npz"), images=images,
             process_count=jax.process_count())
    jax.distributed.shutdown()


if __name__ == "__main__":
    app.run(main)
