"""Tests for diffusion_jax.samplers.chain and the step it lets the samplers name.

A denoiser that returns NaN once its timestep falls to a threshold makes a chain go non-finite
at a step known in closed form (from the sampler's timestep / noise-level grid, computed here
in numpy); the status and the error of ``samplers.check_finite`` must name that step. Finite
chains must come out bit-identical with and without the status.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffusion_jax import denoisers, samplers
from diffusion_jax.schedules import linear_beta_schedule, make_schedule
from diffusion_jax.samplers import chain

T = 100
SCHED = make_schedule(linear_beta_schedule(T))
X_T = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
KEY = jax.random.PRNGKey(1)


def _nan_below(threshold):
    """An eps-denoiser that is finite for ``t > threshold`` and NaN from there on."""
    return lambda x, t: jnp.where((t <= threshold)[:, None], jnp.nan, 0.5 * jnp.tanh(x))


def _run(name, denoise, **fields):
    options = samplers.make_options(**fields)
    fn = jax.jit(lambda k: samplers.run_with_status(name, denoise, SCHED, X_T, k, options))
    return fn(KEY)


def _uniform_ts(num_steps):
    """The uniform DDIM / ``sigma_spacing='uniform'`` grid, ``round(linspace(T - 1, 0, N))``."""
    return np.floor(np.linspace(T - 1, 0, num_steps) + 0.5).astype(int)


def _first(mask):
    return int(np.flatnonzero(mask)[0])


def test_scan_carries_the_index_of_the_step_that_went_non_finite():
    """x_{i+1} = x_i + a_i with a_k = NaN: step k (0-based) is named, with its level; a NaN
    only in the last step, a NaN start and a finite chain give S - 1, 0 and -1; the carry and
    the stacked outputs equal lax.scan's bit for bit."""
    body = lambda x, a: (x + a, 2.0 * x)
    levels = jnp.linspace(1.0, 0.1, 8)
    for k in (0, 3, 7):
        a = jnp.ones((8, 2)).at[k, 1].set(jnp.nan)
        with chain.recording() as records:
            out = chain.scan(body, jnp.zeros(2), a, levels=levels, level_name="time")
        (status,) = records
        assert (int(status.first_bad), status.num_steps) == (k, 8)
        assert float(status.level) == float(levels[k])
        np.testing.assert_array_equal(out[1], lax.scan(body, jnp.zeros(2), a)[1])
    a = jnp.ones((8, 2))

    def checked(x0):  # the status is returned from the trace that recorded it
        with chain.recording() as records:
            out = chain.scan(body, x0, a, levels=levels)
        return out, records[0]

    out, status = jax.jit(checked)(jnp.zeros(2))
    assert int(status.first_bad) == -1 and np.isnan(float(status.level))
    assert int(jax.jit(checked)(jnp.full(2, jnp.inf))[1].first_bad) == 0
    ref = lax.scan(body, jnp.zeros(2), a)
    np.testing.assert_array_equal(out[0], ref[0])
    np.testing.assert_array_equal(out[1], ref[1])
    # outside recording() nothing is collected and nothing leaks
    assert chain.scan(body, jnp.zeros(2), a)[0].shape == (2,)


def test_combine_numbers_steps_across_pieces():
    """A 5-step scan going bad at its step 3, then a final step: step 3 of 6 with its level; a
    finite scan then a final step: -1, the final step's level as last_level (the step blamed
    for a non-finite output); a failed adaptive piece: step 0, num_steps 0."""
    a = jnp.ones((5, 3)).at[3, 0].set(jnp.nan)
    for adds, first_bad, level in ((a, 3, 3.0), (jnp.ones((5, 3)), -1, np.nan)):
        with chain.recording() as records:
            chain.scan(lambda x, d: (x + d, None), jnp.zeros(3), adds,
                       levels=jnp.arange(5.0), level_name="sigma")
            chain.record_step(level=0.25, level_name="sigma")
        status = chain.combine(records)
        assert (int(status.first_bad), status.num_steps, status.level_name) == (first_bad, 6,
                                                                                "sigma")
        np.testing.assert_array_equal(float(status.level), level)
        assert float(status.last_level) == 0.25 and not status.tail_checked
    # the loop stayed finite and the final step's result is unchecked: it (or what followed)
    with pytest.raises(FloatingPointError, match=re.escape(
            "first at step 6 of 6 (sigma=0.25) (the last step, or after the chain)")):
        samplers.check_finite(np.full((2, 3), np.nan), "edm_heun", status)
    with chain.recording() as records:
        chain.scan(lambda x, d: (x + d, None), jnp.zeros(3), jnp.ones((5, 3)))
    with pytest.raises(FloatingPointError, match=r"\), after the chain \(its steps stayed"):
        samplers.check_finite(np.full((2, 3), np.nan), "ddim", chain.combine(records))
    with chain.recording() as records:
        chain.record_step(num_steps=0, failed=jnp.bool_(True))
        chain.record_step(level=0.001, level_name="time")
    status = chain.combine(records)
    assert (int(status.first_bad), status.num_steps) == (0, 0)


def test_ddpm_names_the_step_where_t_reaches_the_threshold():
    """DDPM visits t = T-1, ..., 0: NaN for t <= 37 starts at 1-based step T - 37."""
    x0, status = _run("ddpm", _nan_below(37))
    assert (int(status.first_bad), status.num_steps) == (T - 1 - 37, T)
    with pytest.raises(FloatingPointError,
                       match=re.escape(f"first at step {T - 37} of {T} (t=37)")):
        samplers.check_finite(np.asarray(x0), "ddpm", status)


def test_ddim_names_the_step_where_t_reaches_the_threshold():
    ts = _uniform_ts(10)                                   # 99, 88, ..., 11, 0
    k = _first(ts <= 50)
    x0, status = _run("ddim", _nan_below(50), num_steps=10)
    assert int(status.first_bad) == k == 5
    with pytest.raises(FloatingPointError, match=re.escape(
            f"sampler 'ddim' produced non-finite values (NaN/Inf) in 4 of 4 samples (indices "
            f"[0, 1, 2, 3]), first at step {k + 1} of 10 (t={ts[k]})")):
        samplers.check_finite(np.asarray(x0), "ddim", status)


def test_grid_solvers_name_the_step_of_their_noise_level():
    """With sigma_spacing='uniform' the solvers evaluate the model exactly at the grid's t_i.
    DPM-Solver++ evaluates at t_i in step i; Heun also at t_{i+1}, so it fails one step
    earlier."""
    ts = _uniform_ts(8)
    j = _first(ts <= 40)
    sigmas = np.sqrt(1.0 / np.asarray(SCHED.alphas_cumprod, np.float64) - 1.0)
    for name, expected in (("dpm_solver_pp", j), ("edm_heun", j - 1)):
        x0, status = _run(name, _nan_below(40), num_steps=8, sigma_spacing="uniform")
        assert int(status.first_bad) == expected, name
        np.testing.assert_allclose(float(status.level), sigmas[ts[expected]], rtol=1e-5)
        with pytest.raises(FloatingPointError, match=f"first at step {expected + 1} of 8 "
                                                     r"\(sigma="):
            samplers.check_finite(np.asarray(x0), name, status)


def test_pc_sde_solver_names_the_step_of_its_time():
    """VE predictor-corrector on t_i = linspace(1, eps, N): the model sees the discrete step
    nearest (in log sigma) to sigma(t_i) = s_min (s_max / s_min)^t_i; NaN once that step is
    <= the threshold (chosen midway between two visited steps, away from any rounding)."""
    n, eps = 12, 1e-3
    sig = np.sqrt(1.0 / np.asarray(SCHED.alphas_cumprod, np.float64) - 1.0)    # [T]
    times = np.linspace(1.0, eps, n)
    sigma_t = sig[0] * (sig[-1] / sig[0]) ** times
    visited = np.abs(np.log(sig)[None, :] - np.log(sigma_t)[:, None]).argmin(axis=1)
    i = n // 2
    threshold = (visited[i - 1] + visited[i]) // 2
    assert visited[i] <= threshold < visited[i - 1]
    x0, status = _run("pc", _nan_below(threshold), num_steps=n, sde="ve",
                      corrector="none", predictor="reverse_diffusion", sde_eps=eps)
    assert (int(status.first_bad), status.num_steps) == (i, n)
    np.testing.assert_allclose(float(status.level), times[i], rtol=1e-5)
    with pytest.raises(FloatingPointError, match=f"first at step {i + 1} of {n} \\(time="):
        samplers.check_finite(np.asarray(x0), "pc", status)


@pytest.mark.parametrize("name,steps", [
    ("ddpm", T), ("ddim", 6), ("edm_heun", 6), ("dpm_solver_pp", 6), ("pc", 6),
    ("probability_flow", 7), ("langevin", 6 * 2 + 1)])
def test_every_registered_chain_names_step_one_for_a_nan_model(name, steps):
    """A model that is NaN everywhere breaks every chain at its first step; the step count
    includes a final denoising step (probability_flow's Tweedie step, Langevin's)."""
    if name == "pc":
        fields = dict(sde="ve")
    else:
        fields = dict(langevin_steps_each=2)
    x0, status = _run(name, _nan_below(T), num_steps=6, **fields)
    assert (int(status.first_bad), status.num_steps) == (0, steps)
    with pytest.raises(FloatingPointError, match=f"first at step 1 of {steps}"):
        samplers.check_finite(np.asarray(x0), name, status)


def test_adaptive_ode_solve_is_named_without_a_step_index():
    """diffrax rejects NaN steps until max_steps: the sample is NaN (not diffrax's exception)
    and the error names the adaptive solve."""
    x0, status = _run("probability_flow", _nan_below(T), method="tsit5", max_steps=16)
    assert status.num_steps == 0 and int(status.first_bad) == 0
    assert np.isnan(np.asarray(x0)).all()
    with pytest.raises(FloatingPointError, match="first in the adaptive ODE solve, which failed"):
        samplers.check_finite(np.asarray(x0), "probability_flow", status)


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_finite_chains_are_bit_identical_with_and_without_the_status(name):
    """Jitted run() (no status read) and run_with_status() give the same bits (a reduction
    fused into a step's result changed edm_heun's last bit before the checks moved to loop
    variables), and the status of a finite chain is -1."""
    denoise = lambda x, t: jnp.tanh(x) * (1.0 + t[:, None] / T)
    if samplers.SAMPLERS[name].flow:            # a flow sampler integrates a model's velocity
        denoise = denoisers.Denoiser(denoise, velocity=denoise)
    options = samplers.make_options(num_steps=6, eta=0.5, churn=1.0, langevin_steps_each=2)
    plain = jax.jit(lambda k: samplers.run(name, denoise, SCHED, X_T, k, options))(KEY)
    x0, status = jax.jit(
        lambda k: samplers.run_with_status(name, denoise, SCHED, X_T, k, options))(KEY)
    assert np.isfinite(np.asarray(plain)).all()
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(plain))
    assert int(status.first_bad) == -1
    samplers.check_finite(np.asarray(x0), name, status)


def test_a_zero_step_chain_reports_no_step():
    """edm_heun with one noise level runs an empty scan plus its final step: the status must
    build (an empty ``levels`` array) and blame nothing for a finite chain."""
    sched = make_schedule(linear_beta_schedule(100))
    x0, status = samplers.run_with_status(
        "edm_heun", lambda x, t: jnp.zeros_like(x), sched, jnp.ones((2, 4)),
        jax.random.PRNGKey(0), samplers.make_options(num_steps=1))
    assert np.all(np.isfinite(x0)) and int(status.first_bad) == -1
