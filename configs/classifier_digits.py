"""Noisy-image classifier p(y | x_t, t) on sklearn digits, for classifier guidance.

Starts from ``configs/digits.py``, whose ``data`` and ``diffusion`` sections must match the
diffusion model being guided. Train with::

    images, labels = data.load_eval_images(config.data, None)
    classifier, losses = classifier_training.train_noisy_classifier_from_config(config, images, labels)
"""

from configs import digits


def get_config():
    """16x16 digits; classifier ch 32, mult (1, 2, 2); 2000 Adam steps of batch 128."""
    config = digits.get_config()
    config.classifier.channel_mult = (1, 2, 2)  # 16x16, 8x8, 4x4
    config.classifier.batch_size = 128
    config.classifier.log_every = 200
    return config
