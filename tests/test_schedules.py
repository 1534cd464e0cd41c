"""Schedules against independent numpy float64 computations and closed forms."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import integrate
from scipy.special import expit

from diffusion_jax import schedules

SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine", "sigmoid")
MODES = ("eager", "jit")


def _maybe_jit(fn, mode):
    return jax.jit(fn) if mode == "jit" else fn


def _reference_betas(name, num_timesteps):
    """float64 betas written out from each schedule's definition."""
    i = np.arange(num_timesteps, dtype=np.float64)
    frac = i / (num_timesteps - 1)
    if name == "linear":
        return 1e-4 + (0.02 - 1e-4) * frac
    if name == "scaled_linear":
        return (np.sqrt(0.00085) * (1 - frac) + np.sqrt(0.012) * frac) ** 2
    if name == "cosine":
        s = 0.008
        alpha_bar = lambda u: np.cos((u / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2
        return np.clip(1.0 - alpha_bar(i + 1) / alpha_bar(i), None, 0.999)
    if name == "sigmoid":
        ramp = expit(-3.0 + 6.0 * frac)
        return 1e-4 + (0.02 - 1e-4) * (ramp - expit(-3.0)) / (expit(3.0) - expit(-3.0))
    raise AssertionError(name)


def _reference_derived(betas):
    """Every DiscreteSchedule field in float64, from the DDPM paper's formulas."""
    b = np.asarray(betas, np.float64)
    alphas = 1.0 - b
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = b * (1.0 - ab_prev) / (1.0 - ab)
    return dict(
        betas=b, alphas=alphas, alphas_cumprod=ab, alphas_cumprod_prev=ab_prev,
        sqrt_alphas_cumprod=np.sqrt(ab), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ab),
        log_snr=np.log(ab / (1.0 - ab)), posterior_variance=post_var,
        posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
        posterior_mean_coef1=b * np.sqrt(ab_prev) / (1.0 - ab),
        posterior_mean_coef2=(1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab),
    )


def test_linear_final_alpha_bar_matches_float64():
    # prod_{i<1000} (1 - beta_i) with the DDPM betas, computed in float64: 4.0358297653757e-05.
    expected = np.prod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    assert expected == pytest.approx(4.0358297653757e-05, rel=1e-12)
    sched = schedules.make_schedule(schedules.linear_beta_schedule(1000))
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(expected, rel=2e-5)
    assert float(sched.alphas_cumprod[0]) == pytest.approx(1.0 - 1e-4, rel=1e-7)


@pytest.mark.parametrize("num_timesteps", [50, 1000])
def test_cosine_endpoints(num_timesteps):
    betas = np.asarray(schedules.cosine_beta_schedule(num_timesteps), np.float64)
    s, T = 0.008, num_timesteps
    f = lambda u: np.cos((u / T + s) / (1 + s) * np.pi / 2) ** 2
    assert betas[0] == pytest.approx(1.0 - f(1) / f(0), rel=1e-5)
    # The last unclipped beta would be 1 - f(T)/f(T-1) = 1 (f(T) = cos(pi/2)^2 ~ 0): clipped.
    assert betas[-1] == pytest.approx(0.999, rel=1e-6)
    assert np.all(betas <= 0.999 + 1e-7) and np.all(betas > 0)
    sched = schedules.make_schedule(betas)
    ab = np.asarray(sched.alphas_cumprod, np.float64)
    assert ab[0] == pytest.approx(f(1) / f(0), rel=1e-6)
    assert ab[-2] == pytest.approx(f(T - 1) / f(0), rel=1e-3)
    assert ab[-1] == pytest.approx(0.001 * f(T - 1) / f(0), rel=1e-3)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("num_timesteps", [10, 1000])
def test_beta_schedule_matches_numpy(name, num_timesteps):
    betas = schedules.get_beta_schedule(name, num_timesteps)
    assert betas.shape == (num_timesteps,) and betas.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(betas), _reference_betas(name, num_timesteps),
                               rtol=1e-6, atol=0)


def test_beta_schedule_kwargs_forwarded():
    betas = schedules.get_beta_schedule("linear", 5, beta_start=0.1, beta_end=0.5)
    np.testing.assert_allclose(np.asarray(betas), [0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-6)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("mode", MODES)
def test_derived_arrays_match_numpy(name, mode):
    betas = schedules.get_beta_schedule(name, 1000)
    sched = _maybe_jit(schedules.make_schedule, mode)(betas)
    ref = _reference_derived(np.asarray(betas))
    assert set(ref) == set(schedules.DiscreteSchedule._fields)
    for field, expected in ref.items():
        got = np.asarray(getattr(sched, field), np.float64)
        assert got.shape == (1000,) and getattr(sched, field).dtype == jnp.float32, field
        if field == "log_snr":      # spans ~[-80, 10]; compare absolutely
            np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4, err_msg=field)
        else:
            np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-30, err_msg=field)
    assert sched.num_timesteps == 1000


def test_posterior_variance_is_zero_at_t0_and_clip_uses_index1():
    sched = schedules.make_schedule(schedules.linear_beta_schedule(1000))
    assert float(sched.posterior_variance[0]) == 0.0
    assert float(sched.posterior_log_variance_clipped[0]) == float(
        sched.posterior_log_variance_clipped[1])
    assert np.all(np.isfinite(np.asarray(sched.posterior_log_variance_clipped)))
    # At t=0 the posterior mean is x_0 itself: coef1 = 1, coef2 = 0.
    assert float(sched.posterior_mean_coef1[0]) == pytest.approx(1.0, rel=1e-6)
    assert float(sched.posterior_mean_coef2[0]) == 0.0


def test_schedule_is_a_pytree_through_jit():
    sched = schedules.make_schedule(schedules.cosine_beta_schedule(20))

    @jax.jit
    def scaled(s):
        return s.num_timesteps * s.betas, s

    out, same = scaled(sched)
    np.testing.assert_allclose(np.asarray(out), 20 * np.asarray(sched.betas), rtol=1e-7)
    assert isinstance(same, schedules.DiscreteSchedule)
    assert len(jax.tree_util.tree_leaves(sched)) == len(schedules.DiscreteSchedule._fields)


@pytest.mark.parametrize("ndim", [1, 2, 4])
def test_extract_gathers_and_broadcasts(ndim):
    arr = jnp.arange(10.0) * 3.0
    t = jnp.array([0, 9, 4], jnp.int32)
    out = schedules.extract(arr, t, ndim)
    assert out.shape == (3,) + (1,) * (ndim - 1)
    np.testing.assert_array_equal(np.asarray(out).ravel(), [0.0, 27.0, 12.0])


@pytest.mark.parametrize("bad", ["quadratic", "Linear", ""])
def test_unknown_schedule_name_raises(bad):
    with pytest.raises(ValueError, match="linear.*scaled_linear|cosine"):
        schedules.get_beta_schedule(bad, 10)


@pytest.mark.parametrize("betas", [np.zeros((3, 2)), np.array([0.1])])
def test_make_schedule_rejects_bad_shapes(betas):
    with pytest.raises(ValueError, match="betas"):
        schedules.make_schedule(betas)


def test_schedule_constructors_validate_arguments():
    with pytest.raises(ValueError, match="num_timesteps"):
        schedules.linear_beta_schedule(1)
    with pytest.raises(ValueError, match="beta_start"):
        schedules.linear_beta_schedule(10, beta_start=0.0)
    with pytest.raises(ValueError, match="max_beta"):
        schedules.cosine_beta_schedule(10, max_beta=1.5)
    with pytest.raises(ValueError, match="tau"):
        schedules.sigmoid_beta_schedule(10, tau=0.0)




@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedule_from_config_section(name):
    cfg = ml_collections.ConfigDict(dict(schedule=name, num_timesteps=50, beta_start=2e-4,
                                         beta_end=0.05))
    want = {"linear": np.linspace(2e-4, 0.05, 50),
            "scaled_linear": np.linspace(np.sqrt(2e-4), np.sqrt(0.05), 50)**2,
            "cosine": schedules.cosine_beta_schedule(50),  # takes no beta range
            "sigmoid": schedules.sigmoid_beta_schedule(50, beta_start=2e-4, beta_end=0.05)}[name]
    sched = schedules.schedule_from_config(cfg)
    assert sched.num_timesteps == 50
    np.testing.assert_allclose(sched.betas, np.asarray(want), rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta_start=0.02, beta_end=1e-4), "beta_end=0.0001 must be >= beta_start=0.02"),
    (dict(beta_start=1e-4, beta_end=1.0), "must lie in \\(0, 1\\)"),
    (dict(beta_start=float("nan"), beta_end=0.02), "must lie in \\(0, 1\\)"),
])
@pytest.mark.parametrize("name", ["linear", "scaled_linear", "sigmoid"])
def test_beta_range_is_checked(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.get_beta_schedule(name, 10, **kwargs)


@pytest.mark.parametrize("bad, index", [(1.0, 2), (1.5, 2), (0.0, 0), (-0.1, 3), (np.nan, 1)])
def test_make_schedule_rejects_betas_outside_the_open_unit_interval(bad, index):
    betas = np.full(5, 0.1)
    betas[index] = bad
    with pytest.raises(ValueError, match=rf"betas\[{index}\] = "):
        schedules.make_schedule(betas)
    with pytest.raises(ValueError, match="max_beta"):
        schedules.cosine_beta_schedule(10, max_beta=1.0)


def test_extract_checks_timesteps_eagerly_and_documents_jit_indexing():
    arr = jnp.arange(10.0)
    for t in ([10], [-1], [0, 12]):
        with pytest.raises(ValueError, match=r"t must lie in \[0, T=10\)"):
            schedules.extract(arr, jnp.array(t), 2)
    with pytest.raises(ValueError, match="integer timesteps"):
        schedules.extract(arr, jnp.array([1.0]), 2)
    with pytest.raises(ValueError, match="integer timesteps"):
        schedules.extract(arr, jnp.zeros((2, 2), jnp.int32), 2)
    # Under jit the values are unknown: out-of-range t follows JAX's indexing (documented).
    got = jax.jit(lambda t: schedules.extract(arr, t, 1))(jnp.array([12, 10, -1, -3, -25]))
    np.testing.assert_array_equal(got, [9.0, 9.0, 9.0, 7.0, 0.0])
