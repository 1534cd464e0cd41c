"""Small random Stable Diffusion components shared by the SD test modules."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TOL = 1e-4
# diffusers' own small test configs: two levels (32, 64), cross_attention_dim 32.
UNET_LINEAR = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=(2, 4), norm_num_groups=32, use_linear_projection=True)
# 1x1-conv projections, one head count for every level, two transformer blocks, float32
# attention, attention at the lower level only, DDPM-style embedding options.
UNET_CONV = dict(
    sample_size=16, in_channels=3, out_channels=5, block_out_channels=(32, 64),
    layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24,
    attention_head_dim=4, norm_num_groups=16, use_linear_projection=False,
    upcast_attention=True, transformer_layers_per_block=2, flip_sin_to_cos=False, freq_shift=1)
VAE_SMALL = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1, norm_num_groups=32, scaling_factor=0.3)
CLIP_SMALL = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=16)


def perturb(model, seed):
    """Moves every torch parameter off its initial value (so swapped norm scale/bias would show)."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@functools.partial(jax.jit, static_argnums=0,
                   compiler_options={"xla_backend_optimization_level": 0})  # fast CPU compile
def _apply(fn, graphdef, state, *args):
    return fn(nnx.merge(graphdef, state), *args)


def run(fn, model, *args):
    """``fn(model, *args)`` under a jit compiled with few optimisations (fast on CPU)."""
    return _apply(fn, *nnx.split(model), *args)


def numpy_init(build, seed=0):
    """The model ``build()`` makes, with N(0, 0.1^2) numpy parameters (no init compiles)."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(seed)
    values = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype),
                          nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def nchw(a):
    """NHWC -> NCHW numpy."""
    return np.asarray(a).transpose(0, 3, 1, 2)


def write_vocab(directory, tokenizer_config):
    """A tiny CLIP BPE vocabulary: every byte symbol, its ``</w>`` form, a few merges."""
    from tokenizers import pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["h e", "l l", "he ll", "hell o</w>", "c a", "ca t</w>", "p h", "o t", "ph ot",
              "phot o</w>", "a </w>"]
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab += ["</w>", "<|startoftext|>", "<|endoftext|>"]
    directory.mkdir()
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def save_tiny_pipeline(root, scheduler_kwargs, seed=0):
    """A small random diffusers ``StableDiffusionPipeline`` (components as above, DDIM scheduler
    with ``scheduler_kwargs``) saved with ``save_pretrained`` to ``root / "diffusers"``.

    Returns:
        ``(directory, pipe)``.
    """
    import diffusers
    import torch
    import transformers

    write_vocab(root / "vocab", {"model_max_length": 16})
    torch.manual_seed(seed)
    pipe = diffusers.StableDiffusionPipeline(
        vae=perturb(diffusers.AutoencoderKL(**VAE_SMALL), seed + 1),
        text_encoder=perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
            **CLIP_SMALL, hidden_act="quick_gelu", eos_token_id=2)), seed + 2),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "vocab"),
        unet=perturb(diffusers.UNet2DConditionModel(**UNET_LINEAR), seed + 3),
        scheduler=diffusers.DDIMScheduler(**scheduler_kwargs),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "diffusers")
    return root / "diffusers", pipe
