"""One loader for sampling: a training workdir or a converted diffusers checkpoint.

    loaded = loading.load(workdir="runs/digits")                  # first EMA of the latest step
    loaded = loading.load(checkpoint="converted/", config=cfg)    # diffusers conversion
    model = loaded.model                                          # nnx.merge(graphdef, params)

Both give a :class:`Loaded` ``(graphdef, params, config, schedule)``; samplers and applications
then take ``denoisers.build_denoiser(loaded.model, cond)`` and ``loaded.schedule``.
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from flax import nnx

from diffusion_jax import checkpoint, schedules, sharding
from diffusion_jax.convert import common
from diffusion_jax.models import build
from diffusion_jax.schedules import DiscreteSchedule

SAMPLED = ("diffusion", "latent_diffusion")
"""The ``train.objective`` kinds whose workdirs hold a model to sample (`load`'s default)."""


class Loaded(NamedTuple):
    """A model ready to sample: ``graphdef`` + ``params`` (the first EMA of a workdir), its
    full ``config`` and the ``schedule`` it was trained with."""
    graphdef: nnx.GraphDef
    params: nnx.State
    config: ml_collections.ConfigDict
    schedule: DiscreteSchedule

    @property
    def model(self) -> nnx.Module:
        """The model, ``nnx.merge(graphdef, params)``."""
        return nnx.merge(self.graphdef, self.params)


def load(*, workdir: str | None = None, checkpoint_path: str | None = None,
         step: int | None = None, config: ml_collections.ConfigDict | None = None,
         mesh=None, kinds: tuple[str, ...] = SAMPLED) -> Loaded:
    """Loads a model for sampling from exactly one of ``workdir`` and ``checkpoint_path``.

    * ``workdir``: the config stored with the checkpoint; the params are the first EMA of
      step ``step`` (default: the latest), or the raw params when the run keeps no EMA.
    * ``checkpoint_path``: a converted directory of an arch the model factory samples on its
      own (`diffusion_jax.models.build.ARCHS`; today ``diffusion_jax.convert.unet2d``'s: its
      ``config.json``, or ``unet.json`` of older conversions), loaded through that arch's entry;
      the diffusion and sampling settings come from ``config`` (required; e.g.
      ``configs/default.py``), its ``data`` image size, channels and classes from the model.

    Args:
        workdir: training workdir.
        checkpoint_path: converted diffusers checkpoint directory.
        step: checkpoint step of ``workdir`` (default: the latest).
        config: settings of a converted checkpoint (not allowed with ``workdir``).
        mesh: device mesh the params are placed on (default: all devices, data-parallel).
        kinds: the ``train.objective`` values a ``workdir`` may hold (default `SAMPLED`;
            e.g. ``("autoencoder",)`` for a text-to-image stage).

    Returns:
        :class:`Loaded`.

    Raises:
        ValueError: if not exactly one source is given, or ``config`` is given with ``workdir``
            or missing with ``checkpoint_path``, or the workdir holds a run of another kind
            (the message names the kind found and the kinds expected).
        FileNotFoundError: if the workdir has no checkpoint, the path does not exist or is a
            training workdir.
    """
    if (workdir is None) == (checkpoint_path is None):
        raise ValueError("Pass exactly one of workdir and checkpoint_path.")
    if mesh is None:
        mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    if workdir is not None:
        if config is not None:
            raise ValueError("config applies to a converted checkpoint only; a workdir uses its own.")
        graphdef, params, config = _load_workdir(workdir, step, mesh, kinds)
    else:
        if config is None:
            raise ValueError("A converted checkpoint needs config (its diffusion and sampling "
                             "settings, e.g. configs/default.py's get_config()).")
        checkpoint.check_not_workdir(checkpoint_path)
        graphdef, params, config = _load_converted(checkpoint_path, config, mesh)
    return Loaded(graphdef, params, config, schedules.schedule_from_config(config.diffusion))


def params_digest(params) -> str:
    """sha256 (hex) of a parameter pytree: for each leaf, in the order of its sorted path
    (``jax.tree_util.keystr``), the path, dtype, shape and the array's bytes (C order).

    Equal for equal parameters however they were loaded or sharded; used to pin the frozen
    stages of a text-to-image run (`diffusion_jax.objectives.load_frozen_stage`).
    """
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    digest = hashlib.sha256()
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        if isinstance(leaf, jax.Array) and leaf.is_fully_replicated:
            leaf = leaf.addressable_data(0)  # also when other processes hold the other copies
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def abstract_params(config: ml_collections.ConfigDict, mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` of the model ``config.model.arch`` names, without allocating it:
    ``params`` holds ``jax.ShapeDtypeStruct`` leaves sharded over ``mesh`` by the rules table."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build.build_model(config, rngs=nnx.Rngs(0))))
    shapes = jax.eval_shape(
        lambda: nnx.state(build.build_model(config, rngs=nnx.Rngs(0)), nnx.Param))
    shardings = sharding.state_shardings(shapes, mesh)
    return graphdef, jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _load_workdir(workdir, step, mesh, kinds):
    """``(graphdef, params, config)`` of a training workdir: first EMA of ``step``, restored
    from the abstract model alone (`checkpoint.restore_params`)."""
    manager = checkpoint.make_manager(workdir, create=False, async_checkpointing=False)
    config = checkpoint.load_config(manager, step)
    found = config.train.objective
    if found not in kinds:
        stage = (" (a stage of a text-to-image model: sample the 'latent_diffusion' run "
                 "trained on it)" if kinds == SAMPLED else "")
        raise ValueError(f"{workdir} holds a {found!r} run (config.train.objective){stage}; "
                         f"expected {' or '.join(map(repr, kinds))}.")
    graphdef, abstract = abstract_params(config, mesh)
    params = checkpoint.restore_params(manager, abstract, step=step,
                                       num_emas=len(config.optim.ema_decays))
    return graphdef, params, config


def _load_converted(path, config, mesh):
    """``(graphdef, params, config)`` of a converted directory, the params replicated over
    ``mesh``: its record (`diffusion_jax.convert.common.read_record`) names the arch, whose
    entry in the model factory (`diffusion_jax.models.build.ARCHS`) builds the network and sets
    the fields of ``config`` (``model.arch``, the data shape) the record implies."""
    try:
        record = common.read_record(path)
    except FileNotFoundError:
        raise FileNotFoundError(_not_converted(path)) from None
    name = record["arch"]
    arch = build.get(name)
    if arch.sampled_config is None:
        sampled = [n for n, a in build.ARCHS.items() if a.sampled_config]
        raise ValueError(f"{path!r} holds a converted {name!r} ({record['format']}), which "
                         f"its model-factory entry does not sample on its own; --checkpoint "
                         f"samples a converted {sampled} or a Stable Diffusion pipeline "
                         "directory (model_index.json).")
    model = common.restore(path, record, lambda kwargs: arch.from_kwargs(kwargs, nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    params = jax.device_put(params, sharding.replicated(mesh))
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.arch = name
    arch.sampled_config(config, record["kwargs"])
    return graphdef, params, config


def _not_converted(path):
    """What a ``--checkpoint`` directory without a converted UNet record looks like."""
    if all(os.path.isdir(os.path.join(path, part)) for part in ("unet", "vae")):
        return (f"{path!r} looks like a Stable Diffusion pipeline directory (unet/, vae/) but has "
                "no model_index.json; restore that file (diffusers writes it with "
                "save_pretrained).")
    config_path = os.path.join(path, "config.json")
    if os.path.exists(config_path):
        return (f"{path!r} is an unconverted diffusers UNet2DModel (its config.json has no "
                "diffusion_jax format); convert it with python -m diffusion_jax.convert.unet2d "
                "first.")
    return (f"{path!r} has no converted UNet (config.json with a diffusion_jax format); "
            "--checkpoint takes a Stable Diffusion pipeline directory (model_index.json) or a "
            "UNet converted with diffusion_jax.convert.unet2d.")
