"""Class-conditional DiT on sklearn's 8x8 digits: the transformer counterpart of digits.py.

``python run_train.py --config=configs/digits_dit.py --workdir=runs/digits_dit``, then
``python run_sample.py --workdir=runs/digits_dit --class_label=3 --guidance_scale=2 --out=DIR``.
"""

from configs import digits


def get_config():
    """digits.py's data, schedule, optimiser and budget with a DiT instead of the UNet.

    Patch 2 on 8x8 images gives 16 tokens of width 96; 4 adaLN-Zero blocks of 4 heads (0.83M
    parameters, almost half of them the per-block time / label embedders and modulations of
    diffusers' layout). Labels are dropped with probability 0.1 for classifier-free guidance.
    """
    config = digits.get_config()
    config.model.arch = "dit"
    config.model.patch_size = 2
    config.model.hidden_size = 96
    config.model.depth = 4
    config.model.num_heads = 4
    config.model.mlp_ratio = 4
    config.model.class_conditional = True
    config.model.cond_drop_prob = 0.1
    return config
