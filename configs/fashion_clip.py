"""Stage 2 of text-to-image: CLIP (text transformer + image CNN) on Fashion-MNIST captions.

    python run_train.py --config=configs/fashion_clip.py --workdir=runs/fashion_clip

Symmetric InfoNCE with a learned temperature; captions from captions.py's training templates
(4 held out); the caption tokenizer goes to WORKDIR/tokenizer. At the end the test split's
zero-shot accuracy and retrieval recall@1 are written to WORKDIR/eval.json.
"""

from configs import fashion_common


def get_config(variant: str = ""):
    config = fashion_common.get_config("clip", variant)
    config.optim.learning_rate = 1e-3
    config.optim.ema_decays = (0.99,)
    config.train.batch_size = 128
    config.train.num_steps = 800
    if variant == "tiny":
        config.clip.hidden_size = 16
        config.clip.intermediate_size = 32
        config.clip.num_layers = 1
        config.clip.num_heads = 2
        config.clip.image_base_channels = 8
        config.clip.image_channel_mult = (1, 2)
        config.clip.image_embed_dim = 16
        config.clip.num_groups = 4
        config.clip.projection_dim = 16
        config.train.batch_size = 8
        config.train.num_steps = 3
        config.optim.ema_decays = (0.5,)
    return config
