"""Shared pieces of the PyTorch -> NNX converters: files, config checks, weight mapping, orbax I/O.

Weights are matched by name: a parameter's path in our module tree, e.g.
``('down_blocks', 0, 'resnets', 1, 'emb_proj', 'kernel')``, becomes a PyTorch state-dict key,
``'down_blocks.0.resnets.1.time_emb_proj.weight'``, through a per-component rename table, and
the tensor is laid out for Flax: convolution kernels OIHW -> HWIO, dense kernels
``[out, in]`` -> ``[in, out]`` (a 1x1 convolution kernel ``[out, in, 1, 1]`` feeding a dense layer
likewise). Every source tensor must be used exactly once and every parameter found with the
right shape; anything else is a ``ValueError`` naming the weight.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.config_utils import read_json  # noqa: F401  (the converters' common.read_json)
from diffusion_jax.models import build

# Flax leaf names that are called "weight" in PyTorch.
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def find_weights(directory: str | os.PathLike, stems: tuple[str, ...]) -> str:
    """The weights file of a component directory.

    Looks for ``STEM.safetensors``, ``STEM.fp16.safetensors``, ``STEM.bin``, ``STEM.fp16.bin``
    for each stem in order (diffusers: ``diffusion_pytorch_model``; transformers: ``model``,
    ``pytorch_model``).

    Raises:
        FileNotFoundError: none exists (the message lists what was looked for).
    """
    directory = os.fspath(directory)
    tried = []
    for stem in stems:
        for suffix in (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin"):
            path = os.path.join(directory, stem + suffix)
            if os.path.isfile(path):
                return path
            tried.append(os.path.basename(path))
    raise FileNotFoundError(f"no weights in {directory}: expected one of {tried}")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a safetensors or torch ``.bin`` state dict as float32 numpy (fp16/bf16 upcast).

    safetensors files are read with numpy (no torch needed) except bf16 ones, which numpy
    cannot name; those and ``.bin`` pickles go through torch. A damaged file is a ValueError
    naming it.
    """
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file
            try:
                return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
            except TypeError:  # bfloat16 tensors
                from safetensors.torch import load_file as load_torch
                tensors = load_torch(path)
        else:
            import torch
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001  safetensors / torch / pickle errors on a bad file
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"weights file {path} is unreadable ({type(e).__name__}: {first_line}); "
                         f"is it truncated or not a state dict?") from e
    return {k: v.float().numpy() for k, v in tensors.items()}


def check_fields(config: Mapping[str, Any], *, component: str, known: set[str],
                 fixed: Mapping[str, tuple] | None = None) -> None:
    """Raises ValueError for a config field we do not know, or a fixed field with another value.

    Args:
        config: the parsed ``config.json``.
        component: e.g. "unet", used in the messages.
        known: every field name that is read or deliberately ignored.
        fixed: field -> the values we support (a different value raises).
    """
    unknown = sorted(set(config) - known - set(fixed or {}))
    if unknown:
        raise ValueError(f"{component}: unsupported config field(s) {unknown}")
    for field, allowed in (fixed or {}).items():
        if field in config and config[field] not in allowed:
            raise ValueError(f"{component}: unsupported {field}={config[field]!r}; "
                             f"supported: {list(allowed)}")


def torch_key(path: tuple, renames: Mapping[str, str]) -> str:
    """Our parameter path -> the PyTorch state-dict key.

    Each string segment is renamed through ``renames`` (a renamed segment may contain dots),
    integers are kept, and the leaf ``kernel`` / ``scale`` / ``embedding`` becomes ``weight``.
    """
    parts = [str(seg) if isinstance(seg, int) else renames.get(seg, seg) for seg in path[:-1]]
    leaf = path[-1]
    parts.append("weight" if leaf in _WEIGHT_LEAVES else renames.get(leaf, leaf))
    return ".".join(parts)


def map_weights(target: Any, source: Mapping[str, np.ndarray], key_of: Callable[[tuple], str],
                *, component: str, ignore: Callable[[str], bool] = lambda key: False) -> Any:
    """Fills the nested pure dict ``target`` (our parameter shapes) from PyTorch tensors.

    Args:
        target: nested dict whose leaves have ``.shape`` (arrays or ``ShapeDtypeStruct``).
        source: state dict, key -> float32 array.
        key_of: our path tuple -> source key.
        component: name used in the error messages.
        ignore: source keys that carry no parameter (e.g. buffers).

    Returns:
        The same nested dict with ``jax.Array`` leaves in the dtype of ``target``.

    Raises:
        ValueError: a weight is missing, left unused, has the wrong shape after conversion, or
            holds a NaN or inf.
    """
    unused = {k for k in source if not ignore(k)}

    def fill(node, path):
        if isinstance(node, dict):
            return {k: fill(v, path + (k,)) for k, v in node.items()}
        key = key_of(path)
        if key not in source:
            raise ValueError(f"{component}: weight {key!r} (for {'/'.join(map(str, path))}) is "
                             f"missing from the checkpoint")
        unused.discard(key)
        value = _to_flax(source[key], path[-1], len(node.shape))
        if value.shape != tuple(node.shape):
            raise ValueError(f"{component}: weight {key!r} has shape {source[key].shape} "
                             f"({value.shape} after conversion); expected {tuple(node.shape)}")
        bad = np.size(value) - int(np.isfinite(value).sum())
        if bad:
            raise ValueError(f"{component}: weight {key!r} holds {bad} non-finite value(s) (NaN "
                             f"or inf); the checkpoint is damaged")
        return jnp.asarray(value, node.dtype)  # float32, or e.g. bf16 with param_dtype

    params = fill(target, ())
    if unused:
        raise ValueError(f"{component}: checkpoint weights with no counterpart in the model: "
                         f"{sorted(unused)}")
    return params


def build_loaded(build: Callable[[], nnx.Module], source: Mapping[str, np.ndarray],
                 key_of: Callable[[tuple], str], *, component: str,
                 ignore: Callable[[str], bool] = lambda key: False) -> nnx.Module:
    """Builds the model abstractly (no random init) and fills its parameters from ``source``."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    params = map_weights(nnx.to_pure_dict(state), source, key_of, component=component,
                         ignore=ignore)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def save_component(directory: str | os.PathLike, model: nnx.Module, record: dict[str, Any]) -> None:
    """Writes ``directory/params`` (orbax checkpoint of the parameters) and ``config.json``:
    ``record`` (``format``, ``kwargs``, ...) plus the ``arch`` of that format
    (`diffusion_jax.models.build`), the one on-disk format of every converted component."""
    record = {**record, "arch": build.arch_of_format(record["format"])}
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, PARAMS_DIR),
                   nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(record, f, indent=2)


def load_component(directory: str | os.PathLike, fmt: str,
                   build: Callable[[dict[str, Any]], nnx.Module]) -> tuple[nnx.Module, dict]:
    """Loads what `save_component` wrote; ``build(kwargs)`` constructs the model.

    Returns:
        ``(model, record)`` where ``record`` is the saved ``config.json``.

    Raises:
        FileNotFoundError: ``config.json`` or ``params`` is missing.
        ValueError: the record's format is not ``fmt``, or its ``kwargs`` do not build the model.
    """
    directory = os.path.abspath(os.fspath(directory))
    record = read_json(os.path.join(directory, CONFIG_FILE), f"converted {fmt}")
    if record.get("format") != fmt:
        raise ValueError(f"{directory}/{CONFIG_FILE}: format {record.get('format')!r}, "
                         f"expected {fmt!r}")
    return restore(directory, record, build), record


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
    """The record of a converted directory, with its ``arch``: the one place that reads one.

    ``config.json`` with a ``format`` (its ``arch`` is the table's arch of that format when
    absent), or the legacy record file of an arch of `diffusion_jax.models.build` (``unet.json``
    of UNets converted before the shared format).

    Raises:
        FileNotFoundError: neither is there (a ``config.json`` without ``format``, e.g. an
            unconverted diffusers config, does not count).
        ValueError: an unreadable record, an unknown format or arch, or an arch whose
            format is not the record's.
    """
    directory = os.path.abspath(os.fspath(directory))
    config_path = os.path.join(directory, CONFIG_FILE)
    record = read_json(config_path, "converted component") if os.path.isfile(config_path) else {}
    if "format" in record:
        arch = record.get("arch") or build.arch_of_format(record["format"])
        path = config_path
    else:
        legacy = [(name, os.path.join(directory, a.legacy_file))
                  for name, a in build.ARCHS.items() if a.legacy_file]
        found = [(name, p) for name, p in legacy if os.path.isfile(p)]
        if not found:
            names = [os.path.basename(p) for _, p in legacy]
            raise FileNotFoundError(f"{directory} has no {CONFIG_FILE} with a diffusion_jax "
                                    f"format (nor a legacy record {names})")
        arch, path = found[0]
        record = read_json(path, f"converted {arch}")
    if build.get(arch).checkpoint_format != record.get("format"):
        raise ValueError(f"{path}: arch {arch!r} is stored as format "
                         f"{build.get(arch).checkpoint_format!r}, not {record.get('format')!r}")
    return {**record, "arch": arch}


def restore(directory: str | os.PathLike, record: dict[str, Any],
            build: Callable[[dict[str, Any]], nnx.Module]) -> nnx.Module:
    """The model ``build(record["kwargs"])`` (built abstractly) with the parameters of
    ``directory/params``.

    Raises:
        FileNotFoundError: ``params`` is missing.
        ValueError: the record's ``kwargs`` do not build the model.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    params_path = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(params_path):
        raise FileNotFoundError(f"{params_path} not found")
    kwargs, fmt = record.get("kwargs"), record.get("format")
    try:
        if not isinstance(kwargs, dict):
            raise TypeError(f"kwargs is {kwargs!r}, not an object")
        graphdef, state = nnx.split(nnx.eval_shape(lambda: build(kwargs)))
    except TypeError as e:  # an unknown, missing or mistyped model argument
        raise ValueError(f"{directory}/{CONFIG_FILE}: the model arguments do not fit {fmt} "
                         f"({e})") from e
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(params_path, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def tuples(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """JSON lists -> tuples (model constructors take tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def _to_flax(value: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
    """Lays out one PyTorch tensor for Flax: conv OIHW -> HWIO, dense [out, in] -> [in, out]."""
    if leaf != "kernel":
        return value
    if value.ndim == 4 and target_ndim == 2 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]  # a 1x1 convolution used as a dense layer
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value.T


def abstract_count(build: Callable[[], nnx.Module]) -> int:
    """Number of scalar parameters of the model ``build()`` makes, without allocating it."""
    model = nnx.eval_shape(build)
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
