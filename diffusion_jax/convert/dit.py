"""diffusers ``DiTTransformer2DModel`` (``transformer/`` of a ``DiTPipeline``) -> `DiT`.

Reads ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``), maps the
config to `DiT` keyword arguments (a ``ValueError`` names any field or value without an
equivalent) and copies every weight by name (`common.map_weights`: dense kernels
``[out, in] -> [in, out]``, the patch convolution OIHW -> HWIO); every tensor is used once.
The label table keeps its ``num_embeds_ada_norm + 1`` rows, the last being the null label.

Command line (:mod:`diffusion_jax.cli.convert`)::

    python -m diffusion_jax.convert.dit --src DIR --out OUT

writes ``OUT/params`` and ``OUT/config.json`` (``format``, ``arch`` = ``"dit"``, the `DiT`
keyword arguments), the format of every converted component; `load_converted` reads it back.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from flax import nnx

from diffusion_jax.convert import common
from diffusion_jax.models import build
from diffusion_jax.models.dit import DiT

FORMAT = build.ARCHS["dit"].checkpoint_format

# Fields without effect on inference here: dropout (none at inference), the unused group count,
# and upcast_attention (attention scores are always float32 here).
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "dropout", "norm_num_groups",
            "upcast_attention"}
_READ = {"num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
         "num_layers", "sample_size", "patch_size", "num_embeds_ada_norm", "norm_eps"}
_FIXED = {"attention_bias": (True,), "activation_fn": ("gelu-approximate",),
          "norm_type": ("ada_norm_zero",), "norm_elementwise_affine": (False,)}
_RENAMES = {"dense1": "linear_1", "dense2": "linear_2"}


def config_to_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Maps a diffusers ``DiTTransformer2DModel`` config to `DiT` keyword arguments.

    ``out_channels`` must be ``in_channels`` (noise only) or twice it (noise and variance:
    ``learn_sigma``); ``num_embeds_ada_norm`` is the number of classes.

    Raises:
        ValueError: naming the first field or value that cannot be represented.
    """
    if config.get("_class_name", "DiTTransformer2DModel") != "DiTTransformer2DModel":
        raise ValueError(f"transformer: _class_name={config['_class_name']!r}; expected "
                         "'DiTTransformer2DModel'")
    common.check_fields(config, component="transformer", known=_IGNORED | _READ, fixed=_FIXED)
    get = config.get
    in_channels = get("in_channels", 4)
    out_channels = get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"transformer: out_channels={out_channels} must be in_channels="
                         f"{in_channels} or twice it (learned variance)")
    classes = get("num_embeds_ada_norm", 1000)
    if not isinstance(classes, int) or classes < 1:
        raise ValueError(f"transformer: num_embeds_ada_norm={classes!r} must be a class count "
                         ">= 1")
    heads = get("num_attention_heads", 16)
    return dict(image_size=get("sample_size", 32), in_channels=in_channels,
                patch_size=get("patch_size", 2), hidden_size=heads * get("attention_head_dim", 72),
                depth=get("num_layers", 28), num_heads=heads, mlp_ratio=4, num_classes=classes,
                learn_sigma=out_channels == 2 * in_channels,
                norm_eps=float(get("norm_eps", 1e-5)))


def build_dit(kwargs: dict[str, Any], **overrides) -> DiT:
    """A `DiT` from (JSON) keyword arguments, e.g. ``overrides={"dtype": jnp.bfloat16}``."""
    return DiT(**common.tuples({**kwargs, **overrides}), rngs=nnx.Rngs(0))


def load_diffusers(directory: str | os.PathLike, **overrides) -> tuple[DiT, dict[str, Any]]:
    """Reads ``directory/config.json`` and its weights into a `DiT` (float32 parameters).

    ``directory`` may also be a ``DiTPipeline`` directory with a ``transformer/`` subfolder.

    Returns:
        ``(model, record)``; ``record = {"format", "kwargs", "source"}``.

    Raises:
        FileNotFoundError: config or weights missing.
        ValueError: an unmappable config field, or a missing / unused / misshapen weight.
    """
    directory = os.path.abspath(os.fspath(directory))
    nested = os.path.join(directory, "transformer")
    if not os.path.isfile(os.path.join(directory, common.CONFIG_FILE)) and os.path.isdir(nested):
        directory = nested
    config = common.read_json(os.path.join(directory, common.CONFIG_FILE), "DiT config")
    kwargs = config_to_kwargs(config)
    source = common.load_state_dict(common.find_weights(directory, ("diffusion_pytorch_model",)))
    model = common.build_loaded(lambda: build_dit(kwargs, **overrides), source,
                                lambda path: common.torch_key(path, _RENAMES),
                                component="transformer")
    return model, {"format": FORMAT, "kwargs": kwargs, "source": directory}


def convert(src: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Converts the diffusers DiT at ``src`` into ``out`` (`common.save_component`).

    Returns:
        The `DiT` keyword arguments.
    """
    model, record = load_diffusers(src)
    common.save_component(out, model, record)
    return record["kwargs"]


def load_converted(directory: str | os.PathLike, **overrides) -> tuple[DiT, dict[str, Any]]:
    """Loads a `DiT` written by `convert` (e.g. ``dtype=jnp.bfloat16``, ``remat=True``)."""
    return common.load_component(directory, FORMAT, lambda kw: build_dit(kw, **overrides))


if __name__ == "__main__":  # the command line lives in the CLI layer
    from diffusion_jax.cli import convert as cli_convert  # pylint: disable=g-import-not-at-top

    cli_convert.dit(sys.argv[1:])
