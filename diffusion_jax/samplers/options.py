"""How a sampler declares its settings, and the settings every sampler (or several) share.

Each registered sampler declares a small frozen dataclass of the settings it reads, every field
made with :func:`option` (its only default, its check, one line of documentation, whether it is a
traced leaf). :func:`~diffusion_jax.samplers.register` records the dataclass with the entry, and
the package composes all of them with :class:`CommonOptions` into the one
:class:`~diffusion_jax.samplers.SamplerOptions` users build. A setting two entries read is
declared once, in a group both dataclasses inherit: :class:`StepsOptions` and
:class:`ThresholdOptions` here, the noise-grid and SDE groups in :mod:`.continuous`.

An entry reads its settings with :func:`read`, which also accepts any object carrying only some
of them (the dataclass's defaults fill the rest).
"""
from __future__ import annotations

import dataclasses

from diffusion_jax.diffusion import PRED_TYPES
from diffusion_jax.samplers._checks import check_positive_int, one_of, optional
from diffusion_jax.sde.adapters import clip_bounds


def option(default, doc, *, check=None, convert=None, traced=False, kind=None, config="same"):
    """A field of a sampler's options dataclass.

    Args:
        default: the setting's value unless ``config.sample`` or the caller sets it; the one
            place this default is written.
        doc: its documentation (one or two sentences), collected into
            :class:`~diffusion_jax.samplers.SamplerOptions`' docstring.
        check: ``check(field, value)`` raising ``ValueError`` naming the field; run by
            :func:`~diffusion_jax.samplers.make_options`.
        convert: ``value -> value`` normalising it (after ``check``).
        traced: a float setting that is a pytree leaf of ``SamplerOptions`` (it may be traced;
            changing it does not recompile). Other settings are static.
        kind: the value's type when ``default`` is ``None`` (config placeholders, flag parsing).
        config: the key of ``config.sample`` that overrides the default: ``"same"`` (the
            field's name), another name, or ``None`` (no config key; the caller sets it).
    """
    return dataclasses.field(default=default, metadata=dict(
        doc=doc, check=check, convert=convert, traced=traced,
        kind=kind if default is None else type(default), config=config))


def read(cls, options):
    """``cls`` (an options dataclass) filled from the attributes ``options`` has; the others
    keep ``cls``'s defaults. Works on traced values (nothing is checked here)."""
    return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls)
                  if hasattr(options, f.name)})


def config_key(field):
    """The ``config.sample`` key of a ``SamplerOptions`` field, or ``None``."""
    key = field.metadata["config"]
    return field.name if key == "same" else key


@dataclasses.dataclass(frozen=True)
class CommonOptions:
    """Settings every sampler reads."""
    pred_type: str = option(
        "eps", "what the denoiser predicts: ``eps``, ``x0``, ``v`` or ``score`` (set from "
        "``config.diffusion``, never from ``config.sample``).",
        check=one_of(PRED_TYPES), config=None)
    clip_x0: tuple[float, float] | None = option(
        None, "``None`` or ``(lo, hi)`` (``True``: ``(-1, 1)``), clip of the predicted x0.",
        convert=clip_bounds, kind=bool)  # config.sample.clip_x0 is a bool


@dataclasses.dataclass(frozen=True)
class StepsOptions:
    """The number of steps (every sampler but ``ddpm``, which takes every step)."""
    num_steps: int = option(
        50, "DDIM steps / Langevin noise levels / SDE solver steps (see "
        ":func:`~diffusion_jax.samplers.num_evaluations` for each one's network evaluations).",
        check=check_positive_int, convert=int)


def _check_threshold(field, value):
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"{field} must be None or a percentile in (0, 1], got {value!r}.")


@dataclasses.dataclass(frozen=True)
class ThresholdOptions:
    """Imagen's dynamic thresholding of x0 predictions."""
    dynamic_threshold: float | None = option(
        None, "``None`` or Imagen's percentile ``p`` in (0, 1]: every x0 prediction becomes "
        "``clip(x0, -s, s) / s``, ``s = max(quantile_p(|x0|), 1)``.",
        check=optional(_check_threshold), convert=lambda v: None if v is None else float(v),
        kind=float)
