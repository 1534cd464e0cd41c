"""How a network with a continuous noise input is trained and sampled, per ``diffusion.kind``.

``config.diffusion.kind`` chooses the objective of the train step:

* ``discrete``: DDPM's discrete-time loss (:func:`diffusion_jax.losses.denoising_loss`); the
  network gets integer timesteps. Nothing here applies.
* ``vp`` / ``subvp`` / ``ve``: continuous-time denoising score matching
  (:func:`~diffusion_jax.sde.training.continuous_dsm_loss`, ``t ~ U(sde_eps, 1)``, optional
  likelihood weighting) of the SDE ``make_sde(kind, ...)`` from ``diffusion.sde_beta_min`` /
  ``sde_beta_max`` (VP, sub-VP) or ``sde_sigma_min`` / ``sde_sigma_max`` (VE). The network
  ``net(x_t, 999 t)`` predicts the noise ``z`` of ``x_t = m(t) x_0 + s(t) z``, i.e.
  ``score(x_t, t) = -net(x_t, 999 t) / s(t)`` (score_sde's parameterisation).
* ``edm``: EDM's preconditioned denoiser ``D(x, sigma) = c_skip x + c_out net(c_in x,
  1000 c_noise)`` (``c_noise = ln(sigma) / 4``; the factor 1000 puts it on the scale of the
  UNet's sinusoidal embedding) trained with log-normal ``sigma`` (``edm_p_mean``,
  ``edm_p_std``) and ``edm_sigma_data``.
* ``flow``: rectified flow / flow matching (:mod:`~diffusion_jax.sde.flow`): ``x_t = (1 - t)
  x_0 + t eps``, the network ``net(x_t, 1000 t)`` regresses ``v = eps - x_0`` with times from
  ``diffusion.flow_time_sampling`` (``flow_logit_mean``, ``flow_logit_std``,
  ``flow_mode_scale``), shifted by ``flow_shift``, weighted by ``flow_weighting``.

Continuous models need ``model.time_input = "continuous"``. For sampling, :func:`discrete_view`
turns such a network into the discrete-time ``denoise(x_t, t int) -> x0`` that every sampler of
the registry takes (VP scale ``x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) n`` under the model's
``schedule``; the network is queried at exactly that noise level ``sigma_t = sqrt((1 - ab_t) /
ab_t)``, a flow model at flow time ``t = sigma_t / (1 + sigma_t)``), so
``predictor_corrector``, ``probability_flow``, ``edm_heun``, ``dpm_solver_pp`` and DDIM / DDPM
all run on it. Choose the schedule so its noise levels lie in the trained range
(``sigma_t <= sigma_max`` for VE).

All functions are pure; ``net(x [B, ...], time [B] float) -> [B, ...]`` is closed over.
"""
import jax.numpy as jnp
from jax.scipy.stats import norm

from diffusion_jax.sde import flow
from diffusion_jax.sde._util import check_choice, expand
from diffusion_jax.sde.adapters import score_from_denoiser
from diffusion_jax.sde.sdes import make_sde, marginal_coefficients, time_for_sigma
from diffusion_jax.sde.training import continuous_dsm_loss, edm_denoiser, edm_loss

KINDS = ("discrete", "vp", "subvp", "ve", "edm", "flow")
SDE_KINDS = ("vp", "subvp", "ve")
VP_TIME_SCALE = 999.0      # network time input 999 t for the SDE kinds (score_sde)
EDM_NOISE_SCALE = 1000.0   # network time input 1000 c_noise = 250 ln(sigma) for EDM


def kind_of(diffusion_cfg):
    """``diffusion_cfg.kind`` (``discrete`` when absent: configs saved before it existed).

    Raises:
        ValueError: for an unknown kind.
    """
    kind = diffusion_cfg.get("kind", "discrete")
    if kind not in KINDS:
        raise ValueError(f"Unknown diffusion.kind {kind!r}; expected one of {list(KINDS)}.")
    return kind


def check_model_time_input(diffusion_cfg, time_input):
    """Raise ``ValueError`` unless ``model.time_input`` suits ``diffusion.kind``."""
    kind = kind_of(diffusion_cfg)
    expected = "discrete" if kind == "discrete" else "continuous"
    if time_input != expected:
        raise ValueError(f"diffusion.kind={kind!r} needs model.time_input={expected!r}, got "
                         f"{time_input!r}.")


def check_config(diffusion_cfg, time_input):
    """Raise ``ValueError`` naming the field unless ``config.diffusion`` and
    ``model.time_input`` make a trainable model: the time input suits the kind
    (:func:`check_model_time_input`) and a flow kind's ``flow_*`` settings are valid
    (:func:`flow_settings`). Called before anything is compiled."""
    check_model_time_input(diffusion_cfg, time_input)
    if kind_of(diffusion_cfg) == "flow":
        flow_settings(diffusion_cfg)


def sde_of(diffusion_cfg):
    """The SDE of an SDE kind (``vp``, ``subvp``, ``ve``) from ``diffusion_cfg``'s ``sde_*``."""
    kind = kind_of(diffusion_cfg)
    if kind not in SDE_KINDS:
        raise ValueError(f"diffusion.kind={kind!r} has no SDE; expected one of {SDE_KINDS}.")
    if kind == "ve":
        return make_sde("ve", sigma_min=diffusion_cfg.sde_sigma_min,
                        sigma_max=diffusion_cfg.sde_sigma_max)
    return make_sde(kind, beta_min=diffusion_cfg.sde_beta_min,
                    beta_max=diffusion_cfg.sde_beta_max)


def flow_settings(diffusion_cfg):
    """The keyword arguments of :func:`~diffusion_jax.sde.flow.flow_matching_loss` from
    ``diffusion_cfg``'s ``flow_*`` fields, checked.

    Raises:
        ValueError: naming the first invalid ``diffusion.flow_*`` field and what it allows.
    """
    settings = dict(time_sampling=diffusion_cfg.flow_time_sampling,
                    logit_mean=float(diffusion_cfg.flow_logit_mean),
                    logit_std=float(diffusion_cfg.flow_logit_std),
                    mode_scale=float(diffusion_cfg.flow_mode_scale),
                    shift=float(diffusion_cfg.flow_shift),
                    weighting=diffusion_cfg.flow_weighting)
    flow.check_time_sampling(settings["time_sampling"], mode_scale=settings["mode_scale"],
                             logit_std=settings["logit_std"], shift=settings["shift"])
    check_choice("diffusion.flow_weighting", settings["weighting"], flow.WEIGHTINGS)
    return settings


def velocity_of_net(net):
    """A flow network as the velocity ``v(x_t, t) = net(x_t, 1000 t)`` of flow time ``t``."""
    return lambda x, t: net(x, flow.TIME_SCALE * t)


def score_of_velocity(velocity, sde):
    """The score of ``sde``'s time of a flow model ``velocity(x_t, t)``: its EDM denoiser
    (:func:`~diffusion_jax.sde.flow.denoiser_from_velocity`, ``t = sigma / (1 + sigma)``)
    through :func:`~diffusion_jax.sde.adapters.score_from_denoiser`, at exact (not rounded)
    noise levels; so the probability-flow ODE and its likelihood run a flow model."""
    return score_from_denoiser(sde, flow.denoiser_from_velocity(velocity))


def training_loss(net, diffusion_cfg, x0, key, num_timesteps):
    """The continuous objective of ``diffusion_cfg.kind`` on a batch.

    Args:
        net: ``net(x [B, ...], time [B]) -> [B, ...]`` (the network, dropout etc. closed over).
        diffusion_cfg: ``config.diffusion`` with a continuous ``kind``.
        x0: ``[B, ...]`` data in [-1, 1].
        key: PRNG key.
        num_timesteps: ``T`` of the train step's loss-by-quartile metrics.

    Returns:
        ``(loss, per_example [B], t [B] int32)`` with ``t`` in ``{0..T-1}`` the noise level's
        quantile under its training distribution times ``T`` (``floor(T t)`` for the SDE
        kinds, ``floor(T Phi((ln sigma - P_mean) / P_std))`` for EDM, the quantile of the flow
        time under its sampling distribution for flow), so that the train
        step's per-quartile losses keep their meaning (quartile = least to most noise).

    Raises:
        ValueError: for ``kind="discrete"`` or an unknown kind.
    """
    kind = kind_of(diffusion_cfg)
    if kind == "edm":
        loss, per_example, sigma = edm_loss(
            edm_denoiser(lambda x, c: net(x, EDM_NOISE_SCALE * c), diffusion_cfg.edm_sigma_data),
            x0, key, sigma_data=diffusion_cfg.edm_sigma_data, p_mean=diffusion_cfg.edm_p_mean,
            p_std=diffusion_cfg.edm_p_std)
        quantile = norm.cdf((jnp.log(sigma) - diffusion_cfg.edm_p_mean) / diffusion_cfg.edm_p_std)
    elif kind == "flow":
        loss, per_example, quantile = flow.flow_matching_loss(
            velocity_of_net(net), x0, key, **flow_settings(diffusion_cfg))
    elif kind in SDE_KINDS:
        sde = sde_of(diffusion_cfg)
        loss, per_example, quantile = continuous_dsm_loss(
            score_of_eps_net(net, sde), sde, x0, key, eps=diffusion_cfg.sde_eps,
            likelihood_weighting=diffusion_cfg.likelihood_weighting)
    else:
        raise ValueError("training_loss is for continuous kinds; diffusion.kind='discrete' uses "
                         "losses.denoising_loss.")
    t = jnp.clip(jnp.floor(quantile * num_timesteps), 0, num_timesteps - 1).astype(jnp.int32)
    return loss, per_example, t


def discrete_view(net, diffusion_cfg, schedule):
    """A continuous network as a discrete-time x0-predictor under ``schedule``.

    ``denoise(x_t, t)`` with ``x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) n`` returns the model's
    ``E[x_0 | x_t]``: with ``sigma = sqrt((1 - ab_t) / ab_t)`` and ``y = x_t / sqrt(ab_t)``
    (``= x_0 + sigma n``), EDM gives ``D(y, sigma)``; an SDE kind takes its time
    ``tau = time_for_sigma(sigma)``, ``x = m(tau) y`` and returns ``(x - s(tau) net(x, 999 tau))
    / m(tau)``; a flow model sees ``x = x_t / (sqrt(ab_t) + sqrt(1 - ab_t))`` at flow time
    ``tau = sqrt(1 - ab_t) / (sqrt(ab_t) + sqrt(1 - ab_t)) = sigma / (1 + sigma)`` (the same
    point of its path, :func:`~diffusion_jax.sde.flow.vp_to_flow`) and returns ``x - tau
    v(x, tau)``. Use it with ``pred_type="x0"``; ``kind="discrete"`` returns ``net`` unchanged.

    Args:
        net: ``net(x [B, ...], time [B]) -> [B, ...]``.
        diffusion_cfg: ``config.diffusion``.
        schedule: the :class:`~diffusion_jax.schedules.DiscreteSchedule` to sample on.

    Returns:
        ``denoise(x_t [B, ...], t int32 [B]) -> x0 [B, ...]``.
    """
    kind = kind_of(diffusion_cfg)
    if kind == "discrete":
        return net

    def denoise(x_t, t):
        alpha_bar = schedule.alphas_cumprod[t]                                     # [B]
        if kind == "flow":
            x, tau = flow.vp_to_flow(x_t, alpha_bar)
            return flow.x0_from_velocity(x, velocity_of_net(net)(x, tau), tau)
        sigma = jnp.sqrt((1.0 - alpha_bar) / alpha_bar)
        y = x_t / expand(jnp.sqrt(alpha_bar), x_t.ndim)
        if kind == "edm":
            d = edm_denoiser(lambda x, c: net(x, EDM_NOISE_SCALE * c),
                             diffusion_cfg.edm_sigma_data)
            return d(y, sigma)
        sde = sde_of(diffusion_cfg)
        tau = jnp.clip(time_for_sigma(sde, sigma), 0.0, 1.0)
        m, s = marginal_coefficients(sde, tau)
        x = expand(m, y.ndim) * y
        return (x - expand(s, y.ndim) * net(x, VP_TIME_SCALE * tau)) / expand(m, y.ndim)

    return denoise


def score_of_eps_net(net, sde):
    """``score(x, t) = -net(x, 999 t) / s(t)``."""

    def score(x, t):
        _, s = marginal_coefficients(sde, t)
        return -net(x, VP_TIME_SCALE * t) / expand(s, x.ndim)

    return score
