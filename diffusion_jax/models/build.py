"""The model factory: ``config.model.arch`` -> the network, from one table (`ARCHS`).

Each entry names the constructor ``(config, rngs) -> nnx.Module``, the config section holding
its settings, the converter module under ``diffusion_jax.convert`` that turns diffusers /
transformers weights into it (None: trained here only), the ``format`` tag a converted
directory's ``config.json`` carries, and for a converted directory the constructor from its
record's keyword arguments and, for a model sampled on its own (``run_sample.py
--checkpoint``), the config settings the record implies::

    model = build.build_model(config, rngs=nnx.Rngs(0))     # config.model.arch picks the entry

A converted directory is read in one place (`diffusion_jax.convert.common.read_record`: its
``config.json`` names ``format`` and ``arch``) and loaded through its entry
(`diffusion_jax.loading`), so a new arch's converted checkpoints load by its entry alone.
Adding an arch is one entry here (its constructor beside it, the network in its own module)
plus a test; objectives name the archs they train (`diffusion_jax.objectives`). Models know no
schedule, loss, mesh or optimiser.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import ml_collections
from flax import nnx

from diffusion_jax.models import autoencoder, clip, cond_unet, dit, text_encoder, unet


class Arch(NamedTuple):
    """One model family.

    Attributes:
        build: ``(config, rngs) -> nnx.Module``, reading ``config.<section>`` (and the data
            shape from ``config.data`` where the network sees images).
        section: the config section holding its settings.
        converter: module of ``diffusion_jax.convert`` converting foreign weights, or None.
        checkpoint_format: ``format`` of a converted directory's ``config.json``.
        from_kwargs: ``(kwargs, rngs) -> nnx.Module``, the network of a converted directory's
            record (its ``kwargs``), or None.
        sampled_config: ``(config, kwargs) -> None`` setting the fields of ``config`` (e.g. the
            data shape) that a converted record implies, for an arch ``run_sample.py
            --checkpoint`` samples on its own; None for pipeline components and
            archs not (yet) sampled from a converted directory (e.g. ``dit``).
        legacy_file: the record file of directories converted before the shared
            ``config.json`` format (``unet.json``), or None.
    """
    build: Callable
    section: str
    converter: str | None
    checkpoint_format: str
    from_kwargs: Callable | None = None
    sampled_config: Callable | None = None
    legacy_file: str | None = None


# the config.model fields the pixel UNet reads: its keyword arguments and the condition flags
_UNET_FIELDS = frozenset(inspect.signature(unet.UNet.__init__).parameters) | {
    "class_conditional", "cond_drop_prob"}


def _unet(config, rngs):
    """The pixel `UNet` of the ``config.model`` fields it reads, for images of ``config.data``
    (fields of other archs in ``config.model`` are not its)."""
    fields = {k: v for k, v in config.model.items() if k in _UNET_FIELDS}
    return unet.unet_from_config(fields, image_size=config.data.image_size,
                                 in_channels=config.data.num_channels,
                                 num_classes=config.data.num_classes, rngs=rngs)


def _unet_of_kwargs(kwargs, rngs):
    """The `UNet` of a converted record's keyword arguments (JSON lists become tuples)."""
    return unet.UNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()},
                     rngs=rngs)


def _unet_sampled_config(config, kwargs):
    """``config.data`` (size, channels, classes) and ``model.class_conditional`` of a converted
    `UNet`'s keyword arguments."""
    config.data.image_size = kwargs["image_size"]
    config.data.num_channels = kwargs["in_channels"]
    config.data.num_classes = kwargs["num_classes"]
    config.model.class_conditional = kwargs["num_classes"] > 0


def _cond_unet(config, rngs):
    """The cross-attention `CondUNet` of ``config.model`` on latents of ``config.latent``."""
    m, lat = config.model, config.latent
    for name in ("latent_channels", "cross_attention_dim"):
        if lat[name] <= 0:
            raise ValueError(f"latent.{name} is unresolved (0): it is read from the stage "
                             f"workdirs when training starts (objectives.prepare_config).")
    return cond_unet.CondUNet(
        in_channels=lat.latent_channels, out_channels=lat.latent_channels,
        block_out_channels=tuple(m.block_out_channels), cross_attn=tuple(m.cross_attn),
        layers_per_block=m.num_res_blocks, num_heads=tuple(m.heads_per_level),
        cross_attention_dim=lat.cross_attention_dim, norm_num_groups=m.num_groups,
        dtype=unet.DTYPES[m.dtype], param_dtype=unet.DTYPES[m.param_dtype], remat=m.remat,
        rngs=rngs)


def _dit(config, rngs):
    """The `DiT` of ``config.model`` (patch_size, hidden_size, depth, num_heads, mlp_ratio,
    learn_sigma, class_conditional, dtypes, remat) for images of ``config.data``."""
    m, d = config.model, config.data
    if m.patch_size < 1 or d.image_size % m.patch_size:
        raise ValueError(f"data.image_size={d.image_size} must be a multiple of "
                         f"model.patch_size={m.patch_size} (the dit arch cuts images into "
                         "patch_size x patch_size patches).")
    if m.cond_image_channels:
        raise ValueError(f"model.cond_image_channels={m.cond_image_channels}: the dit arch "
                         "takes no image condition (set it to 0, or use model.arch='unet').")
    if m.class_conditional and d.num_classes <= 0:
        raise ValueError("model.class_conditional=True needs data.num_classes > 0.")
    return dit.DiT(image_size=d.image_size, in_channels=d.num_channels,
                   patch_size=m.patch_size, hidden_size=m.hidden_size, depth=m.depth,
                   num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                   num_classes=d.num_classes if m.class_conditional else 0,
                   learn_sigma=m.learn_sigma, dtype=_dtype(m, "dtype"),
                   param_dtype=_dtype(m, "param_dtype"), remat=m.remat, rngs=rngs)


def _dtype(model_cfg, name):
    """The jnp dtype of the field ``model.<name>`` (a name of `unet.DTYPES`)."""
    value = model_cfg[name]
    if value not in unet.DTYPES:
        raise ValueError(f"model.{name}={value!r} must be one of {tuple(unet.DTYPES)}.")
    return unet.DTYPES[value]


def _autoencoder(config, rngs):
    """The KL `AutoencoderKL` of ``config.autoencoder`` for images of ``config.data``."""
    ae, channels = config.autoencoder, config.data.num_channels
    return autoencoder.AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=ae.latent_channels,
        block_out_channels=tuple(ae.block_out_channels), layers_per_block=ae.layers_per_block,
        norm_num_groups=ae.norm_num_groups, mid_block_attention=ae.mid_block_attention,
        scaling_factor=1.0, rngs=rngs)


def _clip_text_kwargs(config):
    """`CLIPTextModel` keyword arguments of ``config.clip`` on caption-tokenizer ids."""
    c = config.clip
    if c.vocab_size <= 0:
        raise ValueError("clip.vocab_size is unresolved (0): it is set from the caption "
                         "tokenizer when training starts (objectives.prepare_config).")
    return dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                intermediate_size=c.intermediate_size, num_layers=c.num_layers,
                num_heads=c.num_heads, max_positions=config.captions.max_length,
                hidden_act="quick_gelu", eos_token_id=c.eos_token_id)


def _clip_text(config, rngs):
    """The text tower of ``config.clip`` alone (a `CLIPTextModel`, e.g. SD's text encoder)."""
    return text_encoder.CLIPTextModel(**_clip_text_kwargs(config), rngs=rngs)


def _clip(config, rngs):
    """The `CLIPModel` of ``config.clip`` (caption tokenizer ids, images of ``config.data``)."""
    c, text = config.clip, _clip_text_kwargs(config)
    image = dict(in_channels=config.data.num_channels, embed_dim=c.image_embed_dim,
                 base_channels=c.image_base_channels,
                 channel_mult=tuple(c.image_channel_mult), num_groups=c.num_groups)
    return clip.CLIPModel(text=text, image=image, projection_dim=c.projection_dim, rngs=rngs)


ARCHS = {
    "unet": Arch(_unet, "model", "unet2d", "diffusion_jax.unet/1", from_kwargs=_unet_of_kwargs,
                 sampled_config=_unet_sampled_config, legacy_file="unet.json"),
    "dit": Arch(_dit, "model", "dit", "diffusion_jax.dit/1"),
    "cond_unet": Arch(_cond_unet, "model", "unet_cond", "diffusion_jax.cond_unet/1"),
    "autoencoder_kl": Arch(_autoencoder, "autoencoder", "vae", "diffusion_jax.autoencoder_kl/1"),
    "clip": Arch(_clip, "clip", "clip", "diffusion_jax.clip/1"),
    "clip_text": Arch(_clip_text, "clip", "text_encoder", "diffusion_jax.clip_text/1"),
}
"""arch name -> `Arch`. Room for ``mmdit``, ``flux``, ``prior``."""


def get(arch: str) -> Arch:
    """The table entry of ``arch``.

    Raises:
        ValueError: an unknown arch (names the known ones).
    """
    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r} must be one of {tuple(ARCHS)}.")
    return ARCHS[arch]


def build_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
    """The network ``config.model.arch`` names, built from its config section.

    Raises:
        ValueError: an unknown or unresolved (``""``) arch, or a setting the constructor
            refuses.
    """
    arch = config.model.get("arch", "")
    if not arch:
        raise ValueError("model.arch is unresolved (''): objectives.with_arch sets it from "
                         "train.objective.")
    return get(arch).build(config, rngs)


def arch_of_format(fmt: str) -> str:
    """The arch whose converted directories carry ``format`` ``fmt``.

    Raises:
        ValueError: no arch has that format.
    """
    for name, arch in ARCHS.items():
        if arch.checkpoint_format == fmt:
            return name
    raise ValueError(f"format {fmt!r} is not that of any arch "
                     f"({', '.join(a.checkpoint_format for a in ARCHS.values())}).")
