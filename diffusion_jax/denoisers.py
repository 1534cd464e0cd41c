"""Model + condition -> the denoiser the samplers take, with classifier-free guidance.

Samplers and applications take a :class:`Denoiser`: ``denoise(x [B, ...], t int32 [B]) ->
prediction [B, ...]`` that also says what it predicts (``denoise.pred_type``: ``eps``, ``x0``,
``v`` or ``score``) and how the network under it reads time (``denoise.time``: ``discrete``
steps, the ``continuous`` SDE time of score_sde, or EDM's noise level ``sigma``). The samplers
and the applications ask it instead of being told the prediction type beside it.
:func:`build_denoiser` closes a model and a condition pytree
(:mod:`diffusion_jax.conditioning`: ``{"label": [B], "image": [B, H, W, Cc], "text": [B, L,
D]}``, missing keys absent) over once, puts a continuous-time network (``diffusion.kind`` vp /
subvp / ve / edm) on the discrete steps of its schedule
(:func:`~diffusion_jax.sde.parameterization.discrete_view`, an x0-predictor), and builds
classifier-free guidance (Ho & Salimans, 2022) for any kind of condition:

    pred_hat(x, t) = (1 + w) * f(x, t, cond) - w * f(x, t, null(cond)),    w = s - 1,

computed in one batched call of the model on ``[x; x]`` with ``[cond; null(cond)]``.

**One guidance convention.** The library and every command line take Stable Diffusion's scale
``s`` (``guidance_scale``): ``s = 1`` is the conditional model alone, ``s > 1`` guides, and as in
diffusers ``s <= 1`` runs the conditional model alone (one call; SD-Turbo samples at ``s = 0``).
It is converted to the weight ``w = s - 1`` of the formula above here, once
(:func:`guidance_weight`), and checked by one validator (:func:`check_guidance_scale`). Each
kind knows its null: ``label`` -> the null label ``num_classes`` (the row trained with label
dropout); ``image`` -> the image itself (image conditions are never dropped in training, so
it is kept in both halves); ``text`` -> the empty-prompt states the caller supplies
(``null_text``). The combination is linear in the prediction, so it holds for ``eps``, ``x0``
and ``v``. ``s`` may be a traced value: a jitted sampler taking ``s`` as an argument compiles
once for every ``s``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.conditioning import check_condition, guided_kinds, null_args, null_condition
from diffusion_jax.diffusion import PRED_TYPES
from diffusion_jax.sde import parameterization

TIMES = ("discrete", "continuous", "sigma", "flow")  # how a network reads its time input
LEGACY_TEXT_GUIDANCE = 7.5  # the text-to-image default of configs without sample.guidance_scale
# The network's time input per diffusion.kind (sde.parameterization.KINDS).
_TIME_OF_KIND = {"discrete": "discrete", "vp": "continuous", "subvp": "continuous",
                 "ve": "continuous", "edm": "sigma", "flow": "flow"}


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """A sampler-facing denoiser that knows its parameterisation.

    Called as ``denoise(x [B, ...], t int32 [B]) -> prediction [B, ...]`` with ``t`` a discrete
    step of the schedule (the samplers' contract); jittable and pure.

    Attributes:
        fn: ``fn(x, t) -> prediction``.
        pred_type: what ``fn`` predicts: ``eps``, ``x0``, ``v`` or ``score``; ``None``: not
            declared (a bare model), then the sampler options' ``pred_type`` applies and
            functions without options read it as ``eps`` (:func:`pred_type_of`).
        time: how the network under ``fn`` reads time (one of :data:`TIMES`): ``discrete``
            (integer steps), ``continuous`` (``999 tau``, SDE time ``tau`` in [0, 1]),
            ``sigma`` (EDM's ``1000 c_noise(sigma)``) or ``flow`` (``1000 t``, flow time
            ``t`` in [0, 1]); ``fn`` converts ``t`` to it.
        velocity: a flow-matching model's velocity ``v(x_t [B, ...], t float [B])`` at
            continuous flow time (``x_t = (1 - t) x_0 + t eps``), which the flow samplers
            integrate; ``None`` for every other model.
    """
    fn: Callable
    pred_type: str | None = None
    time: str = "discrete"
    velocity: Callable | None = None

    def __post_init__(self):
        if self.pred_type is not None and self.pred_type not in PRED_TYPES:
            raise ValueError(f"Unknown pred_type {self.pred_type!r}; expected one of "
                             f"{list(PRED_TYPES)}.")
        if self.time not in TIMES:
            raise ValueError(f"Unknown time {self.time!r}; expected one of {list(TIMES)}.")

    def __call__(self, x, t):
        return self.fn(x, t)

    def wrap(self, fn: Callable) -> Denoiser:
        """A denoiser of the same parameterisation computing ``fn`` (e.g. a guided version).

        The ``velocity`` is dropped: it would not compute ``fn``, so the flow samplers refuse
        the wrapped denoiser instead of silently ignoring the wrapping."""
        return dataclasses.replace(self, fn=fn, velocity=None)


def as_denoiser(denoise) -> Denoiser:
    """``denoise`` itself if it is a :class:`Denoiser`, else a plain ``f(x, t)`` as a
    discrete-time one whose prediction type is not declared."""
    return denoise if isinstance(denoise, Denoiser) else Denoiser(denoise)


def pred_type_of(denoise, default="eps") -> str:
    """What ``denoise`` predicts: its declared ``pred_type``, else ``default`` (bare
    callables and undeclared denoisers predict eps by the samplers' convention)."""
    return getattr(denoise, "pred_type", None) or default


def parameterize(fn, *, pred_type=None, diffusion=None, schedule=None) -> Denoiser:
    """A network callable as the sampler-facing :class:`Denoiser`.

    With ``diffusion`` (``config.diffusion``) its ``pred_type`` and ``kind`` decide: a
    discrete model predicts ``diffusion.pred_type``; a continuous-time one (``kind`` vp,
    subvp, ve, edm) is put on the discrete steps of ``schedule`` by
    :func:`~diffusion_jax.sde.parameterization.discrete_view` and predicts ``x0``; a flow
    model (``kind="flow"``) also carries its ``velocity`` for the flow samplers.

    Args:
        fn: ``fn(x [B, ...], time [B]) -> [B, ...]``, the network with its condition closed over.
        pred_type: what a discrete ``fn`` predicts when ``diffusion`` is ``None`` (``None``:
            not declared, the sampler options decide).
        diffusion: ``config.diffusion`` or ``None`` (a discrete model of ``pred_type``).
        schedule: the :class:`~diffusion_jax.schedules.DiscreteSchedule` to sample on; needed
            for continuous kinds.

    Returns:
        A :class:`Denoiser` taking discrete steps.

    Raises:
        ValueError: an unknown kind or ``pred_type``, or a continuous kind without ``schedule``.
    """
    if diffusion is None:
        return Denoiser(fn, pred_type)
    kind = parameterization.kind_of(diffusion)
    if kind == "discrete":
        return Denoiser(fn, diffusion.pred_type)
    if schedule is None:
        raise ValueError(f"A diffusion.kind={kind!r} model needs the schedule it is sampled on "
                         "(build_denoiser(..., schedule=)).")
    velocity = parameterization.velocity_of_net(fn) if kind == "flow" else None
    return Denoiser(parameterization.discrete_view(fn, diffusion, schedule), "x0",
                    _TIME_OF_KIND[kind], velocity)


def check_guidance_scale(scale, name="guidance_scale"):
    """Raise ``ValueError`` unless ``scale`` is ``None`` or a finite number ``s >= 0``.

    Traced values pass unchecked (check them where they enter, as host values).
    """
    if scale is None or isinstance(scale, jax.core.Tracer):
        return
    value = float(scale)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0 (Stable Diffusion's scale s; "
                         f"1 = no guidance), got {scale}.")


def guidance_weight(scale):
    """The weight ``w = s - 1`` of the guidance formula for the scale ``s``, or ``None``
    (the conditional model alone, one call) when ``s`` is ``None`` or a host value ``<= 1``
    (diffusers' rule). A traced ``s`` gives ``max(s - 1, 0)``: the same values, in one
    program for every ``s``.

    Raises:
        ValueError: from :func:`check_guidance_scale`.
    """
    check_guidance_scale(scale)
    if scale is None:
        return None
    if isinstance(scale, jax.core.Tracer):
        return jnp.maximum(scale - 1.0, 0.0)
    return None if float(scale) <= 1.0 else float(scale) - 1.0


def default_guidance_scale(config):
    """The guidance scale ``s`` a checkpoint samples with when none is asked for:
    ``config.sample.guidance_scale``.

    Configs stored before that field existed are read as they sampled then: a text-to-image
    run (``train.objective = "latent_diffusion"``) with ``s = 7.5`` (``run_sample.py``'s
    Stable Diffusion default), every other model without guidance (``s = 1``; those runs never
    stored a scale: the pixel models' old ``--guidance_scale`` weight ``w`` was a flag only,
    now given as ``s = w + 1``).

    Raises:
        ValueError: a stored scale that :func:`check_guidance_scale` refuses.
    """
    scale = config.sample.get("guidance_scale")
    if scale is None:
        objective = config.get("train", {}).get("objective", "diffusion")
        scale = LEGACY_TEXT_GUIDANCE if objective == "latent_diffusion" else 1.0
    check_guidance_scale(scale, "config.sample.guidance_scale")
    return float(scale)


def traced_scale(scale):
    """A host scale ``s`` as the argument of a jitted sampling program: ``None`` when it means
    no guidance (``None`` or ``s <= 1``: the unguided program, half the network work), else
    ``float32 s``, which the program traces (one compilation for every guided ``s``).

    Raises:
        ValueError: from :func:`check_guidance_scale`.
    """
    return None if guidance_weight(scale) is None else jnp.float32(scale)


def model_denoiser(model, cond=None):
    """``f(x, t) = model(x, t, cond)``, or ``model(x, t)`` when ``cond`` is empty (the bare
    network callable; :func:`build_denoiser` gives the sampler-facing :class:`Denoiser`).

    Args:
        model: callable ``model(x [B, ...], t int32 [B], cond=None) -> prediction``, e.g. the
            UNet.
        cond: condition dict (batch ``B`` arrays), or ``None``.

    Returns:
        ``denoise(x, t) -> prediction``.
    """
    cond = check_condition(cond)
    if not cond:
        return lambda x, t: model(x, t)
    return lambda x, t: model(x, t, cond)


def guided_denoiser(model, cond, null_cond, scale):
    """Classifier-free guidance of weight ``w`` in one batched model call.

    ``f(x, t) = (1 + w) model(x, t, cond) - w model(x, t, null_cond)`` with the two halves
    evaluated as ``model([x; x], [t; t], [cond; null_cond])``. ``w = 0`` is the conditional
    model, ``w = -1`` the unconditional one. This is the bare network callable under the
    weight ``w``; the public scale is ``s = w + 1`` (:func:`build_denoiser`).

    Args:
        model: ``model(x [2B, ...], t [2B], cond) -> prediction [2B, ...]``.
        cond, null_cond: condition dicts of batch ``B`` with the same keys.
        scale: guidance weight ``w`` (scalar; may be traced).

    Returns:
        ``f(x [B, ...], t [B]) -> prediction [B, ...]``.

    Raises:
        ValueError: if the two conditions have different keys.
    """
    cond, null_cond = check_condition(cond), check_condition(null_cond)
    if set(cond) != set(null_cond):
        raise ValueError(f"cond keys {sorted(cond)} and null_cond keys {sorted(null_cond)} differ.")
    both = jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond, null_cond)

    def denoise(x, t):
        batch = x.shape[0]
        pred = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        return (1.0 + scale) * pred[:batch] - scale * pred[batch:]

    return denoise


def build_denoiser(model, cond=None, *, guidance_scale=None, null_text=None, pred_type=None,
                   diffusion=None, schedule=None) -> Denoiser:
    """The sampler-facing :class:`Denoiser` of ``model`` under ``cond``, guided when asked.

    The network callable is :func:`model_denoiser`, or, when :func:`guidance_weight` of
    ``guidance_scale`` is not ``None`` and the condition has a guided kind (``label``,
    ``text``), :func:`guided_denoiser` against
    :func:`~diffusion_jax.conditioning.null_condition` with ``w = s - 1``, each null argument
    taken from the model attribute of its name (the label null is ``model.num_classes``)
    unless given here (``null_text``); :func:`parameterize` then gives it its
    prediction type and time parameterisation.

    Args:
        model: the model, called ``model(x, t, cond)``; needs a ``num_classes`` attribute
            when ``cond`` has a label and guidance is on.
        cond: condition dict, or ``None``.
        guidance_scale: ``None`` or Stable Diffusion's scale ``s >= 0`` (``<= 1``: no
            guidance); may be traced (then every ``s`` shares one program).
        null_text: empty-prompt states for a ``text`` condition.
        pred_type: what a discrete model predicts when ``diffusion`` is ``None`` (e.g. a
            Stable Diffusion scheduler's ``prediction_type``; ``None``: not declared, the
            sampler options' ``pred_type`` applies).
        diffusion: the model's ``config.diffusion`` (``pred_type``, ``kind``), or ``None``.
        schedule: the schedule to sample on (needed for a continuous ``diffusion.kind``).

    Returns:
        A :class:`Denoiser`: ``denoise(x, t) -> prediction`` with ``.pred_type`` and ``.time``.

    Raises:
        ValueError: an unknown condition kind, a bad ``guidance_scale`` or a missing null.

    Example:
        >>> denoise = build_denoiser(unet, {"label": labels}, guidance_scale=4.0,
        ...                          diffusion=config.diffusion, schedule=sched)
        >>> x0 = samplers.run("ddim", denoise, sched, x_T, key, options)
    """
    cond = check_condition(cond)
    weight = guidance_weight(guidance_scale)
    if weight is None or not any(kind in cond for kind in guided_kinds()):
        fn = model_denoiser(model, cond)
    else:
        nulls = {arg: getattr(model, arg, None) for arg in null_args()}
        if null_text is not None:
            nulls["null_text"] = null_text
        fn = guided_denoiser(model, cond, null_condition(cond, **nulls), weight)
    return parameterize(fn, pred_type=pred_type, diffusion=diffusion, schedule=schedule)
