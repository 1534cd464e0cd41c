"""The probability-flow ODE and its solvers: fixed-step Euler / Heun / RK4 and adaptive diffrax.

Every SDE ``dx = f dt + g dW`` with marginals ``q_t`` shares them with the deterministic flow

    dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t)                      (Song et al., 2021, eq. 13),

so integrating it from a prior sample at ``t = 1`` down to ``eps`` samples the data, and
integrating it upwards maps data to the prior (used by :mod:`diffusion_jax.sde.likelihood`; the
sampler is :mod:`diffusion_jax.samplers.probability_flow`).

The integrators work on any pytree state ``y`` and a vector field ``fn(y, t)`` with scalar ``t``.
Fixed-step ones are one ``lax.scan`` over a time grid; the adaptive one runs diffrax
(``Tsit5`` or ``Dopri5`` with a PID step-size controller) on device under ``jax.jit``: the whole
batch shares one step size, chosen from the RMS error of all its entries.
"""
import diffrax
import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax.sde._util import check_choice, expand
from diffusion_jax.sde.sdes import drift_and_diffusion

FIXED_METHODS = ("euler", "heun", "rk4")
ADAPTIVE_METHODS = ("tsit5", "dopri5")
METHODS = FIXED_METHODS + ADAPTIVE_METHODS


def probability_flow_drift(sde, score_fn):
    """``fn(x [B, ...], t scalar or [B]) = f(x, t) - 1/2 g(t)^2 score(x, t)``, ``[B, ...]``."""

    def fn(x, t):
        t_b = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        f, g = drift_and_diffusion(sde, x, t_b)
        return f - 0.5 * expand(g**2, x.ndim) * score_fn(x, t_b)

    return fn


def odeint_fixed(fn, y0, ts, method="rk4", step_hook=None, key=None, *, scan=lax.scan):
    """Integrates ``dy/dt = fn(y, t)`` over the grid ``ts`` ``[S + 1]`` with ``S`` fixed steps.

    With ``h = t_{i+1} - t_i`` (negative when integrating backwards in time):

    * ``euler``: ``y + h k1``;
    * ``heun``: ``y + h (k1 + k2) / 2``, ``k2 = fn(y + h k1, t + h)``;
    * ``rk4``: classical fourth order, ``y + h (k1 + 2 k2 + 2 k3 + k4) / 6``.

    Args:
        fn: ``fn(y, t) -> dy/dt`` with the structure of ``y``; ``t`` a float32 scalar.
        y0: initial state (any pytree of arrays).
        ts: ``[S + 1]`` times, ``ts[0]`` that of ``y0``.
        method: ``euler``, ``heun`` or ``rk4``.
        step_hook: optional ``step_hook(y, t_next, key) -> y`` after each step, with
            ``fold_in(key, i)`` for step ``i``.
        key: PRNG key for the hook.
        scan: the loop, ``scan(body, init, xs) -> (carry, ys)`` like ``lax.scan`` (a sampler
            passes its chain's tracked loop, :func:`diffusion_jax.samplers.chain.scan`).

    Returns:
        ``y`` at ``ts[-1]``.

    Raises:
        ValueError: for an unknown ``method`` or a grid with fewer than two points.
    """
    check_choice("method", method, FIXED_METHODS)
    ts = jnp.asarray(ts, jnp.float32)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"ts must have shape [S + 1] with S >= 1, got shape {ts.shape}.")
    axpy = lambda a, dy, y: jax.tree.map(lambda u, v: v + a * u, dy, y)

    def body(y, inputs):
        i, t, t_next = inputs
        h = t_next - t
        k1 = fn(y, t)
        if method == "euler":
            y_next = axpy(h, k1, y)
        elif method == "heun":
            k2 = fn(axpy(h, k1, y), t_next)
            y_next = axpy(0.5 * h, jax.tree.map(jnp.add, k1, k2), y)
        else:
            k2 = fn(axpy(0.5 * h, k1, y), t + 0.5 * h)
            k3 = fn(axpy(0.5 * h, k2, y), t + 0.5 * h)
            k4 = fn(axpy(h, k3, y), t_next)
            slope = jax.tree.map(lambda a, b, c, d: (a + 2.0 * b + 2.0 * c + d) / 6.0,
                                 k1, k2, k3, k4)
            y_next = axpy(h, slope, y)
        if step_hook is not None:
            y_next = step_hook(y_next, t_next, jax.random.fold_in(key, i))
        return y_next, None

    y, _ = scan(body, y0, (jnp.arange(ts.shape[0] - 1), ts[:-1], ts[1:]))
    return y


def odeint_adaptive(fn, y0, t0, t1, *, method="tsit5", rtol=1e-5, atol=1e-5, max_steps=4096,
                    dt0=None, throw=True, report=None):
    """Integrates ``dy/dt = fn(y, t)`` from ``t0`` to ``t1`` with diffrax and a PID controller.

    Args:
        fn: ``fn(y, t) -> dy/dt`` (any pytree ``y``).
        y0: initial state at ``t0``.
        t0, t1: start and end times (``t1 < t0`` integrates backwards).
        method: ``tsit5`` (Tsitouras 5(4)) or ``dopri5`` (Dormand--Prince 5(4)).
        rtol, atol: tolerances of the PID step-size controller.
        max_steps: static cap on accepted + rejected steps (diffrax raises past it).
        dt0: first step; default ``(t1 - t0) / 100``.
        throw: a failed solve (``max_steps`` reached, e.g. because ``fn`` returned NaN and every
            step was rejected) raises diffrax's error; ``False``: it gives an all-NaN ``y``.
        report: with ``throw=False``, optional ``report(failed)`` called with the traced bool
            (a sampler records it in its chain's status, :mod:`diffusion_jax.samplers.chain`).

    Returns:
        ``(y at t1, number of steps taken)`` (each step costs ~6 evaluations of ``fn``).

    Raises:
        ValueError: for an unknown ``method``.
    """
    check_choice("method", method, ADAPTIVE_METHODS)
    solver = diffrax.Tsit5() if method == "tsit5" else diffrax.Dopri5()
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: fn(y, t)), solver, t0, t1,
        (t1 - t0) / 100.0 if dt0 is None else dt0, y0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps,
        throw=throw)
    if throw:
        return jax.tree.map(lambda v: v[-1], sol.ys), sol.stats["num_steps"]
    ok = sol.result == diffrax.RESULTS.successful
    if report is not None:
        report(~ok)
    return jax.tree.map(lambda v: jnp.where(ok, v[-1], jnp.nan), sol.ys), sol.stats["num_steps"]
