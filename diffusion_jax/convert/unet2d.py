"""Convert a PyTorch diffusers ``UNet2DModel`` checkpoint into this package's NNX ``UNet``.

Reads ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``) from disk, maps
the config to ``UNet`` keyword arguments (a ``ValueError`` names any field or value that has no
equivalent), copies every weight (conv kernels OIHW -> HWIO, dense kernels [out, in] ->
[in, out]) and checks that every source tensor was used exactly once.

Command line (:mod:`diffusion_jax.cli.convert`)::

    python -m diffusion_jax.convert.unet2d --src DIR_OR_FILE --out DIR

writes ``DIR/params`` (an orbax ``StandardCheckpointer`` checkpoint of the parameters as a
pure dict) and ``DIR/config.json`` (``format``, ``arch`` and the ``UNet`` keyword arguments,
the format of every converted component). ``load_converted(DIR)`` rebuilds the model; it also
reads directories converted before, whose record is ``DIR/unet.json``.

Class labels: a diffusers model with ``num_class_embeds=N`` becomes ``num_classes=N``; labels
0..N-1 map to the same rows and the extra null row (label N, used when ``cond`` has no ``"label"``) is zero, i.e.
adds no class embedding.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx

from diffusion_jax.convert import common
from diffusion_jax.models import build
from diffusion_jax.models.unet import UNet

LEGACY_FILE = build.ARCHS["unet"].legacy_file  # the record before the shared config.json
FORMAT = build.ARCHS["unet"].checkpoint_format

# diffusers config fields that carry no information for inference with this model.
_IGNORED_FIELDS = {"_class_name", "_diffusers_version", "_name_or_path", "num_train_timesteps"}
# field -> the only value(s) this UNet supports (a different value raises).
_FIXED_FIELDS = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1, 1.0),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "add_attention": (True,),
    "class_embed_type": (None,),
}
_DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}
_TIME_SHIFT = {"default": "shift", "scale_shift": "scale_shift"}
_KNOWN_FIELDS = _IGNORED_FIELDS | set(_FIXED_FIELDS) | {
    "sample_size", "in_channels", "out_channels", "freq_shift", "flip_sin_to_cos",
    "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "downsample_padding", "dropout", "attention_head_dim", "norm_num_groups",
    "attn_norm_num_groups", "norm_eps", "resnet_time_scale_shift", "num_class_embeds"}

# Our module / parameter names -> diffusers state-dict names.
_SEGMENTS = {
    "down": "down_blocks", "up": "up_blocks", "mid": "mid_block", "res": "resnets",
    "attn": "attentions", "emb_proj": "time_emb_proj", "skip": "conv_shortcut",
    "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0",
    "time_embed": "time_embedding", "dense1": "linear_1", "dense2": "linear_2",
    "norm_out": "conv_norm_out", "class_embed": "class_embedding",
    "kernel": "weight", "scale": "weight", "embedding": "weight",
}
# Attention names of checkpoints saved before diffusers 0.14.
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.",
                     ".proj_attn.": ".to_out.0."}


def config_to_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Maps a diffusers ``UNet2DModel`` config dict to ``UNet`` keyword arguments.

    Args:
      config: the parsed ``config.json``.

    Returns:
      JSON-serialisable ``UNet`` keyword arguments (float32 compute).

    Raises:
      ValueError: naming the first field (or value) that cannot be represented.
    """
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"_class_name={config['_class_name']!r}: only UNet2DModel is supported")
    unknown = sorted(set(config) - _KNOWN_FIELDS)
    if unknown:
        raise ValueError(f"unsupported UNet2DModel config field(s) {unknown}")
    for field, allowed in _FIXED_FIELDS.items():
        if field in config and config[field] not in allowed:
            raise ValueError(f"unsupported {field}={config[field]!r}; supported: {list(allowed)}")

    get = lambda name, default: config.get(name, default)
    channels = list(get("block_out_channels", (224, 448, 672, 896)))
    down_types = list(get("down_block_types", ("DownBlock2D",) + ("AttnDownBlock2D",) * 3))
    up_types = list(get("up_block_types", ("AttnUpBlock2D",) * 3 + ("UpBlock2D",)))
    if not len(channels) == len(down_types) == len(up_types):
        raise ValueError(f"block_out_channels, down_block_types and up_block_types must have the same "
                         f"length, got {len(channels)}, {len(down_types)}, {len(up_types)}")
    for field, types, table in (("down_block_types", down_types, _DOWN_TYPES),
                                ("up_block_types", up_types, _UP_TYPES)):
        bad = [t for t in types if t not in table]
        if bad:
            raise ValueError(f"unsupported {field} {bad}; supported: {sorted(table)}")
    base = channels[0]
    if any(c % base for c in channels):
        raise ValueError(f"block_out_channels={channels} must be multiples of the first entry")

    size = get("sample_size", None)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"sample_size={size}: only square images are supported")
        size = size[0]
    if not isinstance(size, int):
        raise ValueError(f"sample_size={size!r}: an int is needed to place the attention layers")

    attn_resolutions = []
    for i, (down, up) in enumerate(zip(down_types, reversed(up_types))):
        if _DOWN_TYPES[down] != _UP_TYPES[up]:
            raise ValueError(f"down_block_types[{i}]={down!r} and up_block_types[{len(up_types) - 1 - i}]"
                             f"={up!r} disagree on attention at the same resolution")
        if _DOWN_TYPES[down]:
            attn_resolutions.append(size // 2**i)

    groups = get("norm_num_groups", 32)
    if groups is None:
        raise ValueError("norm_num_groups=None is not supported")
    shift = get("resnet_time_scale_shift", "default")
    if shift not in _TIME_SHIFT:
        raise ValueError(f"unsupported resnet_time_scale_shift={shift!r}; supported: {list(_TIME_SHIFT)}")
    attn_groups = get("attn_norm_num_groups", None)
    if attn_groups is None and shift != "default":
        raise ValueError("attn_norm_num_groups=None with resnet_time_scale_shift='scale_shift' "
                         "(mid-block attention without group norm) is not supported")
    if attn_groups is not None and attn_groups != groups:
        raise ValueError(f"attn_norm_num_groups={attn_groups} must equal norm_num_groups={groups}")
    head_dim = get("attention_head_dim", 8)
    num_classes = get("num_class_embeds", None) or 0

    in_channels = get("in_channels", 3)
    return dict(
        image_size=size, in_channels=in_channels, out_channels=get("out_channels", 3),
        base_channels=base, channel_mult=[c // base for c in channels],
        num_res_blocks=get("layers_per_block", 2), attn_resolutions=attn_resolutions,
        num_heads=1, num_head_channels=head_dim, dropout=float(get("dropout", 0.0)),
        num_groups=groups, resample="conv", num_classes=num_classes,
        time_conditioning=_TIME_SHIFT[shift], norm_eps=float(get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(get("flip_sin_to_cos", True)),
        freq_shift=float(get("freq_shift", 0)), downsample_padding=get("downsample_padding", 1))


def load_diffusers_unet(src: str | os.PathLike) -> tuple[UNet, dict[str, Any]]:
    """Builds the NNX ``UNet`` equivalent of a diffusers ``UNet2DModel`` checkpoint, in memory.

    Args:
      src: a directory holding ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or
        ``.bin``) -- or a pipeline directory with a ``unet/`` subfolder -- or a weights file
        next to its ``config.json``.

    Returns:
      ``(model, kwargs)``: the float32 model and its ``UNet`` keyword arguments.

    Raises:
      FileNotFoundError: if the config or the weights are missing.
      ValueError: if the config cannot be mapped or a weight is missing, unused or misshapen.
    """
    config_path, weights_path = _find_files(os.fspath(src))
    kwargs = config_to_kwargs(common.read_json(config_path, "UNet2DModel config"))
    model = _build_abstract(kwargs)
    graphdef, state = nnx.split(model)
    params = _map_weights(nnx.to_pure_dict(state), _load_state_dict(weights_path))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), kwargs


def convert(src: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Converts a diffusers ``UNet2DModel`` at ``src`` and writes it to the directory ``out``.

    Writes ``out/params`` (orbax checkpoint of the parameter pure dict) and ``out/config.json``
    (``format``, ``arch`` = ``"unet"``, ``source`` and the ``UNet`` keyword arguments), the
    format of every converted component (`common.save_component`).

    Returns:
      The ``UNet`` keyword arguments.
    """
    model, kwargs = load_diffusers_unet(src)
    common.save_component(out, model, {"format": FORMAT, "kwargs": kwargs,
                                       "source": os.path.abspath(os.fspath(src))})
    return kwargs


def read_record(out: str | os.PathLike) -> dict[str, Any]:
    """The record of a converted UNet directory (`common.read_record`: ``config.json`` with our
    ``format``, or the ``unet.json`` written before converted UNets shared the components'
    format).

    Raises:
      FileNotFoundError: there is no record, or it is not a UNet's (e.g. ``config.json`` is a
        diffusers config, without our ``format``: the directory is not converted).
    """
    out = os.path.abspath(os.fspath(out))
    try:
        record = common.read_record(out)
    except FileNotFoundError:
        record = {}
    if record.get("arch") != "unet":
        raise FileNotFoundError(f"{out} has no {common.CONFIG_FILE} with format {FORMAT!r} (nor "
                                f"a legacy {LEGACY_FILE}): is it a directory written by "
                                "convert()?")
    return record


def load_converted(out: str | os.PathLike, **overrides) -> UNet:
    """Loads a model written by ``convert`` (also the legacy ``unet.json`` layout).

    Args:
      out: the directory given to ``convert``.
      **overrides: ``UNet`` keyword arguments to change, e.g. ``dtype=jnp.bfloat16`` or ``remat=True``.

    Raises:
      FileNotFoundError: if the record (`read_record`) or ``out/params`` is missing.
    """
    record = read_record(out)
    record = {**record, "kwargs": {**record["kwargs"], **overrides}}
    return common.restore(out, record, lambda kwargs: build.ARCHS["unet"].from_kwargs(
        kwargs, nnx.Rngs(0)))


def _find_files(src: str) -> tuple[str, str]:
    """Returns ``(config.json, weights file)`` paths for a directory or a weights file."""
    if os.path.isfile(src):
        config_path = os.path.join(os.path.dirname(src), "config.json")
        weights = [src]
    else:
        if not os.path.isdir(src):
            raise FileNotFoundError(f"{src} is neither a directory nor a weights file")
        if not os.path.exists(os.path.join(src, "config.json")) and os.path.isdir(os.path.join(src, "unet")):
            src = os.path.join(src, "unet")
        config_path = os.path.join(src, "config.json")
        weights = [os.path.join(src, "diffusion_pytorch_model" + ext) for ext in (".safetensors", ".bin")]
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found")
    for path in weights:
        if os.path.exists(path):
            return config_path, path
    raise FileNotFoundError(f"no weights found: expected one of {weights}")


def _load_state_dict(path: str) -> dict[str, np.ndarray]:
    """`common.load_state_dict` with old diffusers attention key names renamed."""
    out = {}
    for key, value in common.load_state_dict(path).items():
        for old, new in _LEGACY_ATTENTION.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def _map_weights(target: dict, source: dict[str, np.ndarray]) -> dict:
    """Fills the nested pure dict ``target`` (our shapes) from the diffusers ``source`` tensors."""
    unused = set(source)

    def fill(node, path):
        if isinstance(node, dict):
            return {k: fill(v, path + (k,)) for k, v in node.items()}
        key = _torch_key(path)
        if key not in source:
            raise ValueError(f"weight {key} (for {'/'.join(map(str, path))}) missing from the checkpoint")
        unused.discard(key)
        value = source[key]
        if path[-1] == "kernel":
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        if path[-1] == "embedding":  # the extra null-label row is zero
            value = np.concatenate([value, np.zeros((1, value.shape[1]), value.dtype)], axis=0)
        if value.shape != tuple(node.shape):
            raise ValueError(f"weight {key} has shape {value.shape} after conversion; expected {node.shape}")
        return jax.numpy.asarray(value)

    params = fill(target, ())
    if unused:
        raise ValueError(f"checkpoint weights with no counterpart in the UNet: {sorted(unused)}")
    return params


def _torch_key(path: tuple) -> str:
    """``('down', 0, 'resample', 'conv', 'kernel')`` -> ``'down_blocks.0.downsamplers.0.conv.weight'``."""
    parts = []
    for seg in path:
        if seg == "resample":
            parts.append("downsamplers.0" if path[0] == "down" else "upsamplers.0")
        else:
            parts.append(_SEGMENTS.get(seg, str(seg)) if isinstance(seg, str) else str(seg))
    return ".".join(parts)


def _build_abstract(kwargs: dict[str, Any]) -> UNet:
    """A ``UNet`` with ``ShapeDtypeStruct`` parameters (no random initialisation)."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return nnx.eval_shape(lambda: UNet(**kwargs, rngs=nnx.Rngs(0)))


if __name__ == "__main__":  # the command line lives in the CLI layer
    from diffusion_jax.cli import convert as cli_convert  # pylint: disable=g-import-not-at-top

    cli_convert.unet2d(sys.argv[1:])
