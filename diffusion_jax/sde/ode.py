"""The probability-flow ODE and its solvers: fixed-step Euler / Heun / RK4 and adaptive diffrax.

Every SDE ``dx = f dt + g dW`` with marginals ``q_t`` shares them with the deterministic flow

    dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t)                      (Song et al., 2021, eq. 13),

so integrating it from a prior sample at ``t = 1`` down to ``eps`` samples the data, and
integrating it upwards maps data to the prior (used by :mod:`diffusion_jax.sde.likelihood`).

The integrators work on any pytree state ``y`` and a vector field ``fn(y, t)`` with scalar ``t``.
Fixed-step ones are one ``lax.scan`` over a time grid; the adaptive one runs diffrax
(``Tsit5`` or ``Dopri5`` with a PID step-size controller) on device under ``jax.jit``: the whole
batch shares one step size, chosen from the RMS error of all its entries.
"""
import diffrax
import jax
import jax.numpy as jnp
from diffusion_jax.sde import chain
from diffusion_jax.sde._util import check_choice, expand
from diffusion_jax.sde.sdes import check_sde, drift_and_diffusion, marginal_coefficients

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


def odeint_fixed(fn, y0, ts, method="rk4", step_hook=None, key=None):
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

    y, _ = chain.scan(body, y0, (jnp.arange(ts.shape[0] - 1), ts[:-1], ts[1:]),
                      levels=ts[:-1], level_name="time")
    return y


def odeint_adaptive(fn, y0, t0, t1, *, method="tsit5", rtol=1e-5, atol=1e-5, max_steps=4096,
                    dt0=None, throw=True):
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
            step was rejected) raises diffrax's error; ``False``: it gives an all-NaN ``y`` and
            is recorded as a failed piece of a sampling chain (:mod:`diffusion_jax.sde.chain`).

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
    chain.record_step(num_steps=0, failed=~ok)  # diffrax's steps have no index here
    return jax.tree.map(lambda v: jnp.where(ok, v[-1], jnp.nan), sol.ys), sol.stats["num_steps"]


def ode_sample(score_fn, sde, x_init, key=None, *, method="rk4", num_steps=50, eps=1e-3,
               t_start=1.0, rtol=1e-5, atol=1e-5, max_steps=4096, denoise_final=True,
               step_hook=None):
    """Samples by integrating the probability-flow ODE from ``t_start`` down to ``eps``.

    Fixed-step methods use the uniform grid ``linspace(t_start, eps, num_steps + 1)``; with
    ``denoise_final`` the result is Tweedie's ``(x + s^2 score(x, eps)) / m`` at ``eps`` (one more
    score evaluation), else ``x_eps``. Network evaluations: ``num_steps`` times 1 / 2 / 4 for
    euler / heun / rk4; adaptive methods choose their own steps.

    Args:
        score_fn: ``score_fn(x [B, ...], t [B]) -> [B, ...]``.
        sde: the SDE whose flow is integrated.
        x_init: ``[B, ...]`` sample of ``q_{t_start}``.
        key: PRNG key for ``step_hook`` (deterministic otherwise; may be ``None``).
        method: ``euler``, ``heun``, ``rk4``, ``tsit5`` or ``dopri5``.
        num_steps: static number of fixed steps (ignored by adaptive methods).
        eps: final time.
        t_start: starting time (``1`` from the prior).
        rtol, atol, max_steps: adaptive controller settings.
        denoise_final: apply the final Tweedie step.
        step_hook: fixed-step methods only: ``step_hook(x, t_next, key) -> x`` after each step,
            and with ``denoise_final`` once more after it with ``t_next = 0`` (clean data).

    Returns:
        ``[B, ...]`` samples; all NaN when the adaptive solve fails (``max_steps`` reached, e.g.
        on a NaN in the flow), which the checked entry points report
        (:func:`diffusion_jax.samplers.check_finite`).

    Raises:
        ValueError: for an unknown method, ``num_steps < 1``, ``eps`` / ``t_start`` out of order,
            or a ``step_hook`` with an adaptive method.
    """
    check_sde(sde)
    check_choice("method", method, METHODS)
    if isinstance(eps, (int, float)) and isinstance(t_start, (int, float)) and not (
            0.0 <= eps < t_start <= 1.0):
        raise ValueError(f"need 0 <= eps < t_start <= 1, got eps={eps}, t_start={t_start}.")
    drift = probability_flow_drift(sde, score_fn)
    if method in FIXED_METHODS:
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
        ts = jnp.linspace(t_start, eps, int(num_steps) + 1, dtype=jnp.float32)
        x = odeint_fixed(drift, x_init, ts, method, step_hook, key)
    else:
        if step_hook is not None:
            raise ValueError(f"step_hook is not supported by the adaptive method {method!r}.")
        x, _ = odeint_adaptive(drift, x_init, jnp.float32(t_start), jnp.float32(eps),
                               method=method, rtol=rtol, atol=atol, max_steps=max_steps,
                               throw=False)
    if not denoise_final:
        return x
    t_b = jnp.full((x.shape[0],), eps, jnp.float32)
    m, s = marginal_coefficients(sde, t_b)
    x = (x + expand(s**2, x.ndim) * score_fn(x, t_b)) / expand(m, x.ndim)
    if step_hook is not None:
        x = step_hook(x, jnp.float32(0.0), jax.random.fold_in(key, int(num_steps)))
    chain.record_step(level=eps, level_name="time")
    return x

