"""The loop of every sampling chain, which also finds the chain's first non-finite step.

Each sampler runs its steps with :func:`scan` instead of ``lax.scan``: the same loop, with one
int32 more in the carry, ``-1`` until the state first holds a NaN or Inf and then the index of
the step that produced it. The check is one ``isfinite(x).all()`` reduction per step on the
step's *input* (the previous step's result, a loop variable) and one on the loop's final state:
the step's own computation is untouched, so the samples are bit-identical to a plain
``lax.scan`` (a reduction of a step's fresh result can change how XLA fuses, hence rounds, that
step). When nobody reads the index, jax's dead-code elimination drops it. A non-finite start
shows as step 0.

A step run outside the loop (a final denoising step) or an adaptive solve is recorded by
:func:`record_step` without reading its result, for the same reason; its failure is inferred
from the chain's output: when the output is non-finite and every checked piece stayed finite,
that last step (or what the caller did after the chain) made it so
(:attr:`ChainStatus.tail_checked`).

Reading it: while a :func:`recording` context is open (at trace time, on the thread that traces),
every :func:`scan` and :func:`record_step` appends a :class:`ChainStatus` to it, in call order;
:func:`combine` turns them into one status of the whole chain, its steps numbered across them.
:func:`diffusion_jax.samplers.run_with_status` returns it next to the samples and
:func:`check_finite` names the step in its error, e.g. ``sampler 'ddim' produced non-finite
values (NaN/Inf) in 4 of 4 samples (indices [0, 1, 2, 3]), first at step 7 of 10 (t=33); ...``.
Steps are numbered from 1 (the noisiest) to ``N``; the level is the discrete ``t``, the VE noise
level ``sigma`` or the SDE ``time`` the step started from.
"""
import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_RECORDS = contextvars.ContextVar("diffusion_jax_chain_records", default=None)


@dataclasses.dataclass(frozen=True)
class ChainStatus:
    """Where a chain (or a piece of it) first went non-finite.

    Attributes:
        first_bad: int32 scalar, 0-based index of the first step whose result holds a NaN or
            Inf as far as the recorded checks see, ``-1`` when none did (may be traced).
        level: float32 scalar, the time or noise level step ``first_bad`` started from (NaN
            when ``first_bad = -1`` or the piece has none; may be traced).
        last_level: float32 scalar, the level of the last step (NaN if none): the step to blame
            when the output is non-finite but ``first_bad = -1``.
        num_steps: static number of steps; 0 for a solve without step index (diffrax's
            adaptive solve: ``first_bad`` is then 0 when the solve failed, else -1).
        level_name: static name of the levels: ``t`` (discrete step), ``sigma`` (VE noise
            level), ``time`` (SDE time), ``flow_t`` (flow time) or ``""`` (none).
        tail_checked: static; whether the last step's result was checked (a :func:`scan`'s
            was, a :func:`record_step` final step's was not). When it was and ``first_bad =
            -1``, a non-finite output came from after the chain (e.g. decoding).
    """
    first_bad: jax.Array
    level: jax.Array
    last_level: jax.Array
    num_steps: int
    level_name: str = ""
    tail_checked: bool = True


jax.tree_util.register_dataclass(ChainStatus, data_fields=["first_bad", "level", "last_level"],
                                 meta_fields=["num_steps", "level_name", "tail_checked"])


def scan(body, init, xs, *, levels=None, level_name="", state_of=lambda carry: carry):
    """``lax.scan(body, init, xs)`` that also tracks the first non-finite step (module docstring).

    Args:
        body: ``body(carry, inputs) -> (carry, y)`` as for ``lax.scan``.
        init: the initial carry.
        xs: the scanned inputs (their leading axis is the number of steps ``S``).
        levels: optional ``[S]`` time / noise level each step starts from, reported with the
            first bad step.
        level_name: name of ``levels`` (see :class:`ChainStatus`).
        state_of: ``carry -> x``, the part of the carry checked for NaN / Inf.

    Returns:
        ``(carry, ys)`` exactly as ``lax.scan`` returns them.
    """

    def tracked(carry, inputs):
        inner, first_bad = carry
        i, step_inputs = inputs
        went_bad = (first_bad < 0) & ~_all_finite(state_of(inner))
        first_bad = jnp.where(went_bad, jnp.maximum(i - 1, 0), first_bad)
        inner, y = body(inner, step_inputs)
        return (inner, first_bad), y

    num_steps = jax.tree.leaves(xs)[0].shape[0]
    (carry, first_bad), ys = lax.scan(tracked, (init, jnp.int32(-1)),
                                      (jnp.arange(num_steps, dtype=jnp.int32), xs))
    if _RECORDS.get() is not None:
        last_bad = (first_bad < 0) & ~_all_finite(state_of(carry))
        first_bad = jnp.where(last_bad, num_steps - 1, first_bad)
        nan = jnp.float32(jnp.nan)
        if levels is None or num_steps == 0:  # no steps (e.g. a 1-level Heun grid): no level
            level, last_level, level_name = nan, nan, ""
        else:
            levels = jnp.asarray(levels, jnp.float32)
            level = jnp.where(first_bad >= 0, levels[jnp.maximum(first_bad, 0)], nan)
            last_level = levels[-1]
        _record(ChainStatus(first_bad, level, last_level, num_steps, level_name))
    return carry, ys


def record_step(*, level=None, level_name="", num_steps=1, failed=None):
    """Records a piece of the chain run outside :func:`scan`: one step from ``level`` (a final
    denoising step), or with ``num_steps=0`` an adaptive solve whose solver reports ``failed``
    (traced bool). Its result is not read (see the module docstring). A no-op outside
    :func:`recording`."""
    if _RECORDS.get() is None:
        return
    first_bad = jnp.int32(-1) if failed is None else jnp.where(failed, 0, -1).astype(jnp.int32)
    value = jnp.float32(jnp.nan) if level is None else jnp.asarray(level, jnp.float32)
    _record(ChainStatus(first_bad, jnp.where(first_bad >= 0, value, jnp.nan), value, num_steps,
                        level_name if level is not None else "", failed is not None))


@contextlib.contextmanager
def recording():
    """Collects the :class:`ChainStatus` of every :func:`scan` / :func:`record_step` traced or
    run inside, in order, into the yielded list (nested contexts: the innermost collects).
    The statuses belong to the trace they were made in: return them from it."""
    records = []
    token = _RECORDS.set(records)
    try:
        yield records
    finally:
        _RECORDS.reset(token)


def combine(records):
    """One :class:`ChainStatus` of consecutive pieces: steps numbered across them, the first
    bad one wins, the last piece's ``last_level``. A piece without step index (``num_steps =
    0``) makes the whole one so. All pieces of a chain share one kind of level."""
    num_steps = sum(r.num_steps for r in records)
    if any(r.num_steps == 0 for r in records):
        num_steps = 0
    nan = jnp.float32(jnp.nan)
    first_bad, level, offset = jnp.int32(-1), nan, 0
    for r in records:
        take = (first_bad < 0) & (r.first_bad >= 0)
        first_bad = jnp.where(take, offset + r.first_bad, first_bad)
        level = jnp.where(take, r.level, level)
        offset += r.num_steps
    name = next((r.level_name for r in records if r.level_name), "")
    last_level = records[-1].last_level if records else nan
    tail_checked = records[-1].tail_checked if records else True
    return ChainStatus(first_bad, level, last_level, num_steps, name, tail_checked)


def check_finite(samples, sampler, status=None):
    """Raise ``FloatingPointError`` if host array ``samples [B, ...]`` has a NaN or Inf.

    The message names the sampler, the affected samples and, given the chain's ``status``
    (from :func:`~diffusion_jax.samplers.run_with_status`), the step at which the chain first
    went non-finite (1-based, ``step k of N``, with its time or noise level): a non-finite
    output is never written as an image.

    Args:
        samples: host array ``[B, ...]``.
        sampler: the sampler's name.
        status: optional :class:`ChainStatus` of the chain.
    """
    samples = np.asarray(samples)
    bad = ~np.isfinite(samples.reshape(samples.shape[0], -1)).all(axis=1)
    if bad.any():
        which = np.nonzero(bad)[0]
        raise FloatingPointError(
            f"sampler {sampler!r} produced non-finite values (NaN/Inf) in {which.size} of "
            f"{samples.shape[0]} samples (indices {which[:10].tolist()}){_where_bad(status)}; "
            "check the model's parameters, the condition (e.g. a label outside "
            "[0, num_classes)) and the settings.")


def _where_bad(status):
    """``, first at step k of N (t=...)`` for the error of non-finite samples (see
    the module docstring); ``""`` without a status."""
    if status is None:
        return ""
    first_bad, n = int(np.asarray(status.first_bad)), status.num_steps
    if first_bad >= 0 and n == 0:
        return (", first in the adaptive ODE solve, which failed (a NaN/Inf in the flow, or "
                "max_steps reached)")
    if first_bad >= 0:
        return f", first at step {first_bad + 1} of {n}" + _level_text(
            status.level_name, float(np.asarray(status.level)))
    if status.tail_checked:
        return ", after the chain (its steps stayed finite)"
    # Every checked step stayed finite: the last step (its result unchecked) or what followed.
    last = _level_text(status.level_name, float(np.asarray(status.last_level)))
    if n == 0:
        return f", first in the final denoising step after the adaptive ODE solve{last}"
    return f", first at step {n} of {n}{last} (the last step, or after the chain)"


def _level_text(name, level):
    return "" if not name or np.isnan(level) else f" ({name}={level:.4g})"


def _record(status):
    records = _RECORDS.get()
    if records is not None:
        records.append(status)


def _all_finite(x):
    return jnp.all(jnp.array([jnp.isfinite(v).all() for v in jax.tree.leaves(x)]))
