"""The sampler registry: entries, the one dispatcher, and the options composed from the entries.

:data:`SAMPLERS` maps a name to a :class:`SamplerEntry` (its function, its options dataclass,
its count of network evaluations, what it supports). :func:`compose` builds
:class:`SamplerOptions` from :class:`~.options.CommonOptions` and every entry's options
dataclass, once all entries are registered (the package's ``__init__`` calls it);
:func:`make_options` / :func:`options_from_config` build validated instances,
:func:`parse_options` reads ``NAME=VALUE`` settings typed by a user and
:func:`check_options` refuses a setting the chosen sampler does not read.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from diffusion_jax.samplers import chain
from diffusion_jax.samplers._checks import call_denoiser, check_x
from diffusion_jax.samplers.options import CommonOptions, StepsOptions, config_key
from diffusion_jax.sde import parameterization

SamplerOptions = None  # the composed dataclass; set by compose()
TRACED_FIELDS: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SamplerEntry:
    """One registered sampler.

    Attributes:
        fn: ``fn(denoise, schedule, x_start, key, options, *, t_start, step_hook) -> x_0``.
        supports_t_start: it can start part-way (SDEdit).
        supports_step_hook: it calls a per-step hook (inpainting, ILVR).
        options: its options dataclass (``None``: only :class:`~.options.CommonOptions`).
        evaluations: ``evaluations(options, num_timesteps) -> int | None``, its network
            evaluations from ``N(0, I)`` (``None``: not known in advance).
        fields: the names of the ``SamplerOptions`` fields it reads.
        flow: it integrates a flow-matching model's velocity (:mod:`._flow`): ``fn`` gets
            ``velocity(x, t float [B])`` in place of ``denoise`` and runs only flow models.
    """
    fn: Callable
    supports_t_start: bool
    supports_step_hook: bool
    options: type | None = None
    evaluations: Callable = None
    fields: frozenset = frozenset()
    flow: bool = False


SAMPLERS: dict[str, SamplerEntry] = {}


def register(name, *, options=None, evaluations=None, supports_t_start=True,
             supports_step_hook=True, flow=False):
    """Decorator adding ``fn`` to :data:`SAMPLERS` under ``name`` (see the package docstring).

    Args:
        name: the sampler's name.
        options: its options dataclass (fields made with :func:`~.options.option`); ``None``
            when it reads only ``pred_type`` and ``clip_x0``.
        evaluations: ``evaluations(options, num_timesteps)``, its network evaluations;
            default ``options.num_steps`` (one per step).
        supports_t_start, supports_step_hook: what it supports.
        flow: it takes a flow model's ``velocity(x, t float [B])`` instead of ``denoise``
            (:func:`run` passes the denoiser's ``velocity``; other models are refused).

    Raises:
        ValueError: if ``name`` is already registered, or (after :func:`compose`) its options
            have a field :class:`SamplerOptions` lacks.
    """
    fields = frozenset(f.name for cls in (CommonOptions, options) if cls is not None
                       for f in dataclasses.fields(cls))

    def decorate(fn):
        if name in SAMPLERS:
            raise ValueError(f"A sampler named {name!r} is already registered.")
        if SamplerOptions is not None:
            missing = sorted(fields - {f.name for f in dataclasses.fields(SamplerOptions)})
            if missing:
                raise ValueError(f"sampler {name!r} has options {missing} that SamplerOptions "
                                 "lacks: put it in a module of diffusion_jax/samplers/.")
        SAMPLERS[name] = SamplerEntry(fn, supports_t_start, supports_step_hook, options,
                                      evaluations or _one_per_step, fields, flow)
        return fn

    return decorate


def compose():
    """Builds :class:`SamplerOptions` from the registered entries' options (called once, by the
    package's ``__init__``, after every entry module is imported).

    A field read by several entries must come from one group dataclass they share (the same
    ``dataclasses.Field``); two different declarations of one name are an error.

    Returns:
        The ``SamplerOptions`` class: a frozen dataclass registered as a pytree whose
        ``traced`` fields (:data:`TRACED_FIELDS`) are leaves and the rest static.
    """
    global SamplerOptions, TRACED_FIELDS
    fields, resolvers = {}, []
    groups = [StepsOptions, CommonOptions] + [e.options for e in SAMPLERS.values()
                                              if e.options is not None]
    for cls in groups:
        for f in dataclasses.fields(cls):
            if fields.setdefault(f.name, f) is not f:
                raise ValueError(f"option {f.name!r} is declared twice ({cls.__name__} and "
                                 "another entry): declare it once, in a group both inherit.")
        for base in cls.__mro__:
            resolve = base.__dict__.get("resolve")
            if resolve is not None and resolve not in resolvers:
                resolvers.append(resolve)
    cls = dataclasses.make_dataclass(
        "SamplerOptions",
        [(name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
         for name, f in fields.items()],
        frozen=True, namespace={"__doc__": _docstring(fields)})
    cls.__module__ = "diffusion_jax.samplers"
    cls._resolvers = tuple(resolvers)
    TRACED_FIELDS = tuple(name for name, f in fields.items() if f.metadata["traced"])
    jax.tree_util.register_dataclass(
        cls, data_fields=list(TRACED_FIELDS),
        meta_fields=[name for name in fields if name not in TRACED_FIELDS])
    SamplerOptions = cls
    return cls


def make_options(**fields):
    """:class:`SamplerOptions` from ``fields``, each checked and normalised by its own
    declaration (``clip_x0`` ``True`` -> ``(-1, 1)``; explicit DDIM ``timesteps`` fix
    ``num_steps``).

    Raises:
        TypeError: for an unknown field.
        ValueError: naming the first invalid field.
    """
    options = SamplerOptions(**fields)
    values = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.metadata["check"] is not None:
            f.metadata["check"](f.name, value)
        values[f.name] = value if f.metadata["convert"] is None else f.metadata["convert"](value)
    for resolve in SamplerOptions._resolvers:
        resolve(values)
    return SamplerOptions(**values)


def options_from_config(config, **overrides):
    """The :class:`SamplerOptions` of ``config.sample`` and ``config.diffusion.pred_type``
    (``x0`` for a continuous-time ``diffusion.kind``).

    Every field's value is its ``config.sample`` key when the config has it (the DDPM variance
    is ``ddpm_variance``), else its declared default: ``config.sample`` only overrides
    defaults, and configs saved before a field existed still load. Overrides whose value is
    ``None`` are ignored (an unset flag keeps the config's value), so a CLI passes its flags
    straight through: ``options_from_config(config, num_steps=FLAGS.steps, eta=FLAGS.eta)``.
    ``config.sample.clip_x0`` may be a bool or a ``(lo, hi)`` pair.

    Args:
        config: a config with ``sample`` and ``diffusion`` (``pred_type``, optionally ``kind``).
        **overrides: :class:`SamplerOptions` fields.

    Raises:
        ValueError: for an unknown override or an invalid value.
    """
    sample_cfg = config.sample
    values = {f.name: sample_cfg.get(config_key(f) or f.name, f.default)
              for f in dataclasses.fields(SamplerOptions)}
    values["pred_type"] = _sampling_pred_type(config.diffusion)
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ValueError(f"Unknown sampler option(s) {unknown}; expected some of {list(values)}.")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return make_options(**values)


def config_defaults():
    """``{config.sample key: (default, type)}`` of every field a config may override: what
    ``configs/default.py`` puts in ``config.sample`` before its own overrides."""
    return {config_key(f): (f.default, f.metadata["kind"])
            for f in dataclasses.fields(SamplerOptions) if config_key(f) is not None}


def check_sampler(name, *, t_start=False, step_hook=False):
    """Raise ``ValueError`` unless ``name`` is registered and supports what is asked.

    Call it where the request is parsed (a CLI, an application's entry) so a bad combination
    fails before any model is traced.

    Args:
        name: sampler name.
        t_start: whether the caller starts the chain part-way (SDEdit).
        step_hook: whether the caller needs a per-step hook (inpainting, ILVR).
    """
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; expected one of {list(SAMPLERS)}.")
    entry = SAMPLERS[name]
    if t_start and not entry.supports_t_start:
        raise ValueError(f"sampler {name!r} cannot start part-way (t_start); use one of "
                         f"{[n for n, e in SAMPLERS.items() if e.supports_t_start]}.")
    if step_hook and not entry.supports_step_hook:
        raise ValueError(f"sampler {name!r} has no per-step hook (inpainting, ILVR); use one of "
                         f"{[n for n, e in SAMPLERS.items() if e.supports_step_hook]}.")


def check_options(name, fields):
    """Raise ``ValueError`` unless sampler ``name`` reads every one of ``fields``.

    Call it on the settings a user asked for explicitly (flags, ``option_overrides``), not on
    a whole ``config.sample``, which holds every sampler's settings: a setting of another
    sampler is refused, not silently ignored.

    Args:
        name: a registered sampler.
        fields: names of :class:`SamplerOptions` fields (e.g. the keys of an overrides dict).

    Raises:
        ValueError: naming the first foreign field and the samplers that read it.
    """
    check_sampler(name)
    for field in fields:
        if field not in SAMPLERS[name].fields:
            users = [n for n, e in SAMPLERS.items() if field in e.fields]
            raise ValueError(f"sampler option {field!r} is not used by sampler {name!r}; "
                             f"it is an option of {users or 'no sampler'}.")


def num_evaluations(name, options, num_timesteps=1000):
    """Network evaluations of one run of sampler ``name`` from ``N(0, I)``, as its entry counts
    them (``None`` where the count depends on the data, e.g. adaptive ODE methods).

    Raises:
        ValueError: for an unknown sampler.
    """
    check_sampler(name)
    return SAMPLERS[name].evaluations(options, num_timesteps)


def run(name, denoise, schedule, x_start, key, options, *, t_start=None, step_hook=None):
    """Run the registered sampler ``name``: ``x_start [B, ...] -> x_0 [B, ...]``.

    Args:
        name: a key of :data:`SAMPLERS`.
        denoise, schedule, x_start, key, options, t_start, step_hook: see the package
            docstring.

    Returns:
        ``x_0 [B, ...]``.

    Raises:
        ValueError: unknown sampler, an unsupported ``t_start`` / ``step_hook``, a bad
            ``x_start`` (integer dtype, rank < 1), a flow sampler with a denoiser that has no
            flow velocity, or a denoiser whose output does not have the shape of its input
            (checked at trace time for every registered sampler).

    Example:
        >>> options = options_from_config(config, num_steps=25)
        >>> x0 = jax.jit(lambda k, o: run("ddim", denoise, sched, x_T, k, o))(key, options)
    """
    check_sampler(name, t_start=t_start is not None, step_hook=step_hook is not None)
    check_x(x_start, "x_start")
    options = for_denoiser(options, denoise)
    if SAMPLERS[name].flow:
        denoise = flow_velocity(name, denoise)
    # One shape check for every entry: a wrong batch or rank must not broadcast silently.
    checked = lambda x, t: call_denoiser(denoise, x, t)
    return SAMPLERS[name].fn(checked, schedule, x_start, key, options, t_start=t_start,
                             step_hook=step_hook)


def run_with_status(name, denoise, schedule, x_start, key, options, *, t_start=None,
                    step_hook=None):
    """:func:`run` that also returns where the chain first went non-finite.

    Every registered sampler runs its steps through :func:`~.chain.scan`, which carries the
    index of the first step whose state holds a NaN or Inf; this collects those of the call.
    Traceable (call it inside your jitted function and return the status with the samples);
    the samples are bit-identical to :func:`run`'s.

    Args:
        name, denoise, schedule, x_start, key, options, t_start, step_hook: as for :func:`run`.

    Returns:
        ``(x_0 [B, ...], status)`` with ``status`` a :class:`~.chain.ChainStatus` (a pytree;
        ``first_bad = -1`` when the chain stayed finite) for :func:`~.chain.check_finite`.

    Example:
        >>> x0, status = jax.jit(lambda k: run_with_status("ddim", denoise, sched, x_T, k,
        ...                                                 options))(key)
        >>> check_finite(np.asarray(x0), "ddim", status)
    """
    with chain.recording() as records:
        x0 = run(name, denoise, schedule, x_start, key, options, t_start=t_start,
                 step_hook=step_hook)
    return x0, chain.combine(records)


def flow_velocity(name, denoise):
    """The velocity ``v(x, t float [B])`` a flow sampler ``name`` integrates: that of a
    flow-matching model's :class:`~diffusion_jax.denoisers.Denoiser` (``denoise.velocity``).

    Raises:
        ValueError: for any other denoiser, naming the sampler, the model's kind and the
            samplers that run it.
    """
    velocity = getattr(denoise, "velocity", None)
    if velocity is None:
        kind = getattr(denoise, "time", "discrete")
        others = [n for n, e in SAMPLERS.items() if not e.flow]
        raise ValueError(f"sampler {name!r} runs flow-matching models (diffusion.kind='flow'); "
                         f"this is a {kind}-time model predicting "
                         f"{getattr(denoise, 'pred_type', None) or 'eps'}: use one of {others}.")
    return velocity


def for_denoiser(options, denoise):
    """``options`` with the prediction type ``denoise`` declares (a
    :class:`~diffusion_jax.denoisers.Denoiser` carries ``pred_type``); a bare callable keeps
    ``options.pred_type``. The denoiser knows what it predicts, so callers do not pass it."""
    pred_type = getattr(denoise, "pred_type", None)
    if pred_type is None or pred_type == options.pred_type:
        return options
    return dataclasses.replace(options, pred_type=pred_type)


def parse_options(items):
    """``["churn=40", "sde=ve", ...]`` -> ``{"churn": 40.0, "sde": "ve", ...}``, each value
    converted to the type the :class:`SamplerOptions` field declares
    (``none`` -> ``None``; ``clip_x0``: ``true``, ``false`` or ``LO,HI``).

    Raises:
        ValueError: for an item without ``=``, an unknown field or an unconvertible value.
    """
    kinds = {f.name: f.metadata["kind"] for f in dataclasses.fields(SamplerOptions)}
    parsed = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in kinds:
            raise ValueError(f"--sampler_option={item!r}: expected NAME=VALUE with NAME one of "
                             f"{sorted(kinds)}.")
        if text.lower() == "none":
            parsed[name] = None
            continue
        if name == "clip_x0":
            parsed[name] = _parse_clip(item, text)
            continue
        kind = kinds[name] if kinds[name] in (bool, int, float) else str
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--sampler_option={item!r}: {name} expects true or false.")
            parsed[name] = text.lower() in ("true", "1")
            continue
        try:
            parsed[name] = kind(text)
        except ValueError as err:
            raise ValueError(f"--sampler_option={item!r}: {name} expects a value of type "
                             f"{kind.__name__}.") from err
    return parsed


def _parse_clip(item, text):
    """``clip_x0``: ``true`` (``(-1, 1)``), ``false`` / ``none`` (no clipping) or ``LO,HI``."""
    if text.lower() in ("true", "false"):
        return True if text.lower() == "true" else None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as err:
        raise ValueError(f"--sampler_option={item!r}: clip_x0 expects true, false, none or "
                         "LO,HI.") from err
    return (lo, hi)


def _one_per_step(options, num_timesteps):
    del num_timesteps
    return options.num_steps


def _sampling_pred_type(diffusion_cfg):
    """``diffusion.pred_type``, or ``x0`` for a continuous-time model: its sampler-facing
    denoiser is :func:`~diffusion_jax.sde.parameterization.discrete_view`, an x0-predictor."""
    if parameterization.kind_of(diffusion_cfg) != "discrete":
        return "x0"
    return diffusion_cfg.pred_type


def _docstring(fields):
    users = {name: [n for n, e in SAMPLERS.items() if name in e.fields] for name in fields}
    lines = ["Settings of a registered sampler, composed from each entry's options dataclass;",
             "a pytree whose float settings (``TRACED_FIELDS``) are leaves (traceable: changing",
             "them does not recompile), all other fields static.", "", "Attributes:"]
    for name, f in fields.items():
        who = "every sampler" if len(users[name]) == len(SAMPLERS) else ", ".join(users[name])
        lines.append(f"    {name}: {f.metadata['doc']} Default ``{f.default!r}``; read by {who}.")
    return "\n".join(lines)
