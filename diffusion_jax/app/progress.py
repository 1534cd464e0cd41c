"""Step progress of a compiled sampling chain, reported from inside the program.

A registered sampler is one ``lax.scan``, so the host sees nothing until the chain ends. The
network is called once per evaluation (classifier-free guidance batches both halves into one
call), so wrapping it is enough: :class:`ProgressModel` forwards ``model(x, t, cond)`` and
adds a ``jax.debug.callback`` that bumps a host-side :class:`StepCounter` once per call.
The callback is a fixed module-level function, so the wrapped model's graph definition
(a static argument of the jitted program) is the same for every request: wrapping never
causes a recompile, and the counter that receives the ticks is swapped on the host.

Cost: one host call per network evaluation. It takes no operands, so it neither copies
anything from the device nor waits for the step's values (with ``t`` as its operand it
was a device-to-host copy and a wait inside every step, measurably slower on small models);
``benchmarks/app_progress.py`` measures it against the same chain without the wrapper.
"""
from __future__ import annotations

import contextlib
import threading

import jax
from flax import nnx


class StepCounter:
    """Counts network evaluations of the running chain (thread-safe).

    Attributes:
        count: evaluations seen since :meth:`reset`.
        total: evaluations expected (``None`` if unknown, e.g. an adaptive ODE solver).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0
        self.total = None

    def reset(self, total: int | None) -> None:
        """Starts counting a new chain of ``total`` evaluations."""
        with self._lock:
            self.count, self.total = 0, total

    def tick(self) -> None:
        """One evaluation done (called from the runtime's callback thread)."""
        with self._lock:
            self.count += 1

    def fraction(self) -> float | None:
        """``count / total`` clipped to [0, 1], or ``None`` when the total is unknown."""
        with self._lock:
            if not self.total:
                return None
            return min(self.count / self.total, 1.0)


_ACTIVE: list[StepCounter] = []   # the counter that receives ticks (at most one)
_ACTIVE_LOCK = threading.Lock()


@contextlib.contextmanager
def counting(counter: StepCounter, total: int | None):
    """Routes the ticks of every :class:`ProgressModel` call to ``counter`` inside the block.

    Only one chain runs at a time (the app serialises generations); a nested or concurrent
    use is an error rather than a silently shared count.

    Raises:
        RuntimeError: another counter is active.
    """
    with _ACTIVE_LOCK:
        if _ACTIVE:
            raise RuntimeError("a progress counter is already active (one chain at a time).")
        counter.reset(total)
        _ACTIVE.append(counter)
    try:
        yield counter
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.clear()


def _report_step() -> None:
    """Host side of the callback: one tick to the active counter (if any)."""
    with _ACTIVE_LOCK:
        counter = _ACTIVE[0] if _ACTIVE else None
    if counter is not None:
        counter.tick()


class ProgressModel(nnx.Module):
    """``model`` with a host tick per call; same signature, outputs and attributes the
    pipelines read (``in_channels``, ``num_levels``, ``num_classes``).

    Args:
        model: any NNX model called as ``model(x [B, ...], t [B], cond)``.
    """

    def __init__(self, model: nnx.Module):
        self.model = model
        for name in ("in_channels", "num_levels", "num_classes"):
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))

    def __call__(self, x, t, cond=None):
        jax.debug.callback(_report_step)
        return self.model(x, t, cond)
