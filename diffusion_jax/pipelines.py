"""Text-to-image in latent space, and the latent versions of the applications.

A latent diffusion model (Rombach et al., 2022) runs the sampler over autoencoder latents:

    ids       = tokenizer(prompts)                                   [B, L] int32
    text      = text_encoder(ids).last_hidden_state                  [B, L, D]
    null      = text_encoder(tokenizer(negative or ""))              [1 or B, L, D]
    z_T       ~ N(0, I)                                              [B, H/f, W/f, C_z]
    eps_hat   = eps_u + s (eps_c - eps_u)                            (one UNet call on [z; z])
    z_0       = sampler(eps_hat, schedule, z_T)                      any registered sampler
    x_0       = vae.decode(z_0 / scaling_factor)                     [B, H, W, 3] in [-1, 1]

``s`` is the Stable Diffusion guidance scale, the one convention of the library and its
command lines (``s <= 1``: the conditional model alone, one UNet call, as in diffusers;
:mod:`diffusion_jax.denoisers` converts it to the weight ``w = s - 1``), ``f = 2 ** (levels - 1)``
of the autoencoder. :class:`LatentCodec` is the latent wrapper: ``encode`` maps images to
scaled latents and ``decode`` back, so the samplers and the applications
(:mod:`diffusion_jax.applications`: SDEdit, inpainting, DDIM inversion, DiffusionCLIP) run
unchanged on the latents of :func:`img2img`, :func:`inpaint`, :func:`invert` and
:func:`diffusionclip`: each compiled program runs the codec-level runner of the one task table
(:data:`~diffusion_jax.applications.tasks.TASK_TABLE`), which a pixel model runs with the
identity codec.

A :class:`Pipeline` holds plain components: any ``unet(z, t, {"text": states})``, an
autoencoder with ``encode(x).mode()`` / ``decode(z)`` / ``scaling_factor``, a text encoder
with ``last_hidden_state``, a tokenizer ``prompts -> [B, L]`` ids, a
:class:`~diffusion_jax.schedules.DiscreteSchedule` and default
:class:`~diffusion_jax.samplers.SamplerOptions`. :func:`load` builds one from a Stable
Diffusion directory (diffusers or converted); a model trained here fills the same fields.

Each call is one jitted program (text encoding, the chain, decoding:
:data:`diffusion_jax.latent_generate.program`, which the ``latent_diffusion`` objective's
training-time sample grid runs too); the guidance scale, ``eta`` and the parameters are its
arguments, so changing them does not recompile. The batch is padded to a multiple of the
mesh's devices and split over its data axes.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import denoisers, latent_generate, samplers, schedules
from diffusion_jax.applications import diffusionclip as dclip
from diffusion_jax.applications import tasks
from diffusion_jax.conditioning import text_condition
from diffusion_jax.latent_generate import LatentCodec, latent_factor

OUTPUTS = ("uint8", "float", "latents")


class Pipeline(NamedTuple):
    """The parts of a text-to-image latent diffusion model.

    Attributes:
        unet: ``unet(z [B, h, w, C_z], t [B], {"text": [B, L, D]}) -> prediction`` (float32).
        vae: ``vae.encode(x).mode()``, ``vae.decode(z)``, ``vae.scaling_factor``; downsampling
            factor :func:`latent_factor`.
        text_encoder: ``text_encoder(ids [B, L]).last_hidden_state -> [B, L, D]``.
        tokenizer: ``tokenizer(list of str) -> [B, L]`` int ids.
        schedule: the :class:`~diffusion_jax.schedules.DiscreteSchedule` of the UNet.
        options: default :class:`~diffusion_jax.samplers.SamplerOptions` (``pred_type``,
            ``clip_x0``, ...).
        ddim_timesteps: ``None`` (DDIM uses ``options.spacing``), or ``n -> ((t, t_prev), ...)``,
            the explicit DDIM steps for ``n`` steps (a converted checkpoint: diffusers' own).
        sample_size: default image height and width in pixels.
        sampler: the default sampler (a converted checkpoint: the one reproducing its own
            scheduler, :func:`~diffusion_jax.convert.scheduler.checkpoint_sampler`), or
            ``None`` when its scheduler has none here (then ``sampler_error`` says why and a
            sampler must be named).
        sampler_fields: ``((field, value), ...)`` :class:`~diffusion_jax.samplers.SamplerOptions`
            fields that go with ``sampler`` (its scheduler's grid), applied when it runs.
        sampler_error: see ``sampler``.
    """
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Callable
    schedule: schedules.DiscreteSchedule
    options: samplers.SamplerOptions
    ddim_timesteps: Callable[[int], tuple] | None = None
    sample_size: int = 512
    sampler: str | None = "ddim"
    sampler_fields: tuple = ()
    sampler_error: str = ""


def load(path, *, dtype=None, sample_size=None) -> Pipeline:
    """A :class:`Pipeline` from a Stable Diffusion directory (diffusers layout or converted).

    The schedule, prediction type and clipping come from its ``scheduler_config.json``, and
    DDIM steps exactly where diffusers' ``DDIMScheduler`` does (:func:`diffusers_ddim_timesteps`).
    Its scheduler class and fields choose the default sampler (:attr:`Pipeline.sampler`).

    Args:
        path: directory with ``model_index.json``.
        dtype: compute dtype of the three networks (e.g. ``jnp.bfloat16``); parameters stay
            float32. ``None``: float32.
        sample_size: default image size (default: the UNet's ``sample_size`` times ``f``).

    Raises:
        FileNotFoundError, ValueError: from :func:`diffusion_jax.convert.pipeline.load_pipeline`.
    """
    from diffusion_jax.convert import pipeline as convert_pipeline  # loader only

    sd = convert_pipeline.load_pipeline(path, **({} if dtype is None else {"dtype": dtype}))
    settings = sd.scheduler
    clip = (-settings.clip_sample_range, settings.clip_sample_range) if settings.clip_sample \
        else None
    options = samplers.make_options(pred_type=settings.pred_type, clip_x0=clip,
                                    variance=settings.ddpm_variance, clip_keeps_eps=True)
    size = sample_size or sd.info["unet"]["sample_size"] * latent_factor(sd.vae)
    return Pipeline(sd.unet, sd.vae, sd.text_encoder, sd.tokenizer,
                    schedules.make_schedule(settings.betas), options,
                    functools.partial(diffusers_ddim_timesteps, settings), int(size),
                    *_checkpoint_sampler(sd.info["scheduler_config"], path))


def _checkpoint_sampler(config, path):
    """``(sampler, sampler_fields, sampler_error)`` of a checkpoint's scheduler config."""
    from diffusion_jax.convert import pipeline as convert_pipeline, scheduler  # numpy only

    source = os.path.join(str(path), "scheduler", convert_pipeline.SCHEDULER_FILE)
    try:
        name, fields = scheduler.checkpoint_sampler(config, source)
        samplers.make_options(**fields)
    except ValueError as err:
        message = str(err) if str(err).startswith(source) else f"{source}: {err}"
        return None, (), message
    return name, tuple(fields.items()), ""


def default_sampler(pipe: Pipeline, sampler=None) -> str:
    """``sampler``, else the pipeline's own (:attr:`Pipeline.sampler`).

    Raises:
        ValueError: no ``sampler`` and the checkpoint's scheduler has no sampler here (the
            message names its file, field and the supported values).
    """
    if sampler is not None:
        return sampler
    if pipe.sampler is None:
        raise ValueError(f"{pipe.sampler_error}; or name a sampler (--sampler).")
    return pipe.sampler


def diffusers_ddim_timesteps(settings, num_steps: int) -> tuple[tuple[int, int], ...]:
    """The ``(t, t_prev)`` steps of diffusers' ``DDIMScheduler`` with ``num_steps`` steps.

    ``t`` from :func:`~diffusion_jax.convert.scheduler.inference_timesteps` and
    ``t_prev = t - T // n``; past the first timestep diffusers uses ``final_alpha_cumprod``: ``t_prev = -1``
    (``alpha_bar = 1``) with ``set_alpha_to_one``, else ``t_prev = 0`` (``alpha_bar_0``).

    Args:
        settings: :class:`~diffusion_jax.convert.scheduler.SchedulerSettings`.
        num_steps: ``n``.
    """
    from diffusion_jax.convert import scheduler  # numpy only

    ts = scheduler.inference_timesteps(settings, num_steps)
    prev = scheduler.ddim_prev_timesteps(settings, num_steps)
    last = -1 if settings.final_alpha_cumprod == 1.0 else 0
    return tuple((int(t), int(p) if p >= 0 else last) for t, p in zip(ts, prev))


def sampler_options(pipe: Pipeline, *, sampler="ddim", num_steps=None, eta=None,
                    overrides=None):
    """``pipe.options`` with, for the pipeline's own sampler, its
    :attr:`Pipeline.sampler_fields`, then ``num_steps`` / ``eta`` set (``None``: keep) and the
    :class:`~diffusion_jax.samplers.SamplerOptions` fields of ``overrides`` (a dict; ``None``
    values are kept as ``None``), and for DDIM the pipeline's explicit timesteps
    (:attr:`Pipeline.ddim_timesteps`).

    Raises:
        ValueError: an override of ``pred_type`` or ``timesteps`` (the checkpoint's), an
            unknown field, a field ``sampler`` does not read (refused, not ignored:
            :func:`~diffusion_jax.samplers.check_options`) or an invalid value.
    """
    options = pipe.options
    overrides = dict(overrides or {})
    fixed = sorted(set(overrides) & {"pred_type", "timesteps"})
    if fixed:
        raise ValueError(f"sampler option(s) {fixed} come from the checkpoint (its scheduler "
                         "config) and cannot be overridden.")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(samplers.SamplerOptions)})
    if unknown:
        raise ValueError(f"Unknown sampler option(s) {unknown}.")
    samplers.check_options(sampler, overrides)
    fields = dict(pipe.sampler_fields) if sampler == pipe.sampler else {}
    fields.update({k: v for k, v in dict(num_steps=num_steps, eta=eta).items() if v is not None})
    fields.update(overrides)
    if sampler == "ddim" and pipe.ddim_timesteps is not None:
        fields["timesteps"] = pipe.ddim_timesteps(num_steps or options.num_steps)
    return samplers.make_options(**{**dataclasses.asdict(options), **fields})


def text_to_image(pipe: Pipeline, prompts, key, *, negative_prompts=None, guidance_scale=7.5,
                  sampler=None, num_steps=50, eta=None, height=None, width=None,
                  latents=None, mesh=None, output="uint8", option_overrides=None):
    """Images for ``prompts`` (see the module docstring for the equations).

    Args:
        pipe: :class:`Pipeline`.
        prompts: B strings (or one).
        key: PRNG key; ``z_T`` from ``fold_in(key, 0)`` (unless ``latents``), the chain from
            ``fold_in(key, 1)``.
        negative_prompts: ``None`` (the empty prompt), one string, or B strings: the
            unconditional half of guidance.
        guidance_scale: ``s`` (Stable Diffusion convention); ``s <= 1`` or ``None`` run the
            conditional model alone (no guidance, half the UNet work), as diffusers does.
        sampler: a registered sampler name; ``None``: the pipeline's own
            (:func:`default_sampler`).
        num_steps, eta: sampler settings (``eta=None``: ``pipe.options.eta``).
        height, width: image size in pixels, multiples of ``f`` (default ``pipe.sample_size``).
        latents: optional ``[B, H/f, W/f, C_z]`` starting latents (e.g. to match another
            implementation from the same noise).
        mesh: device mesh to split the batch over (default: a 1-device mesh).
        output: ``"uint8"`` (``[B, H, W, 3]`` uint8), ``"float"`` (float32 in [-1, 1]) or
            ``"latents"`` (the final float32 latents ``[B, H/f, W/f, C_z]``, not decoded).
        option_overrides: other :class:`~diffusion_jax.samplers.SamplerOptions` fields
            (``{"order": 3}``, ``{"churn": 40.0}``, ...) for :func:`sampler_options`.

    Returns:
        ``[B, H, W, C]`` images (or latents).

    Raises:
        ValueError: bad sizes, prompts, sampler or options (named).
        FloatingPointError: a non-finite image.
    """
    prompts = _prompts(prompts, None, "prompts")
    batch = len(prompts)
    shape = latent_shape(pipe, batch, height, width)
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}.")
    sampler = default_sampler(pipe, sampler)
    options = sampler_options(pipe, sampler=sampler, num_steps=num_steps, eta=eta,
                              overrides=option_overrides)
    decode = _check_output(output) != "latents"
    ids, null_ids = _token_ids(pipe, prompts, negative_prompts, sampler, options)
    images, status = latent_generate.sample(
        (pipe.unet, pipe.vae, pipe.text_encoder), pipe.schedule, ids, null_ids, key,
        shape=shape, sampler=sampler, options=options, guidance_scale=guidance_scale,
        latents=latents, mesh=mesh, decode=decode)
    return latent_generate.finish(images, sampler, output, status)


def text_to_image_in_batches(pipe: Pipeline, prompts, key, latents, *, batch: int, **kwargs):
    """:func:`text_to_image` over many prompts in calls of exactly ``batch`` prompts.

    Every call has the same shapes, so the chain compiles once: the last chunk is padded by
    repeating its final prompt and latent, and the padding is dropped. Every call uses the same
    ``key``, and prompt ``i`` starts from ``latents[i]``.

    Args:
        pipe: :class:`Pipeline`.
        prompts: N strings.
        key: PRNG key of every call (the chain's noise).
        latents: ``[N, H/f, W/f, C_z]`` starting latents.
        batch: prompts per call (>= 1).
        **kwargs: the other keyword arguments of :func:`text_to_image`.

    Returns:
        The N outputs of :func:`text_to_image`, concatenated.

    Raises:
        ValueError: ``batch < 1`` or ``len(latents) != len(prompts)``.
    """
    prompts = list(prompts)
    if batch < 1 or len(latents) != len(prompts):
        raise ValueError(f"need batch >= 1 and one latent per prompt; got batch={batch}, "
                         f"{len(prompts)} prompts and {len(latents)} latents.")
    out = []
    for i in range(0, len(prompts), batch):
        chunk, lat = prompts[i:i + batch], latents[i:i + batch]
        pad = batch - len(chunk)
        chunk = chunk + [chunk[-1]] * pad
        lat = jnp.concatenate([lat, jnp.repeat(lat[-1:], pad, axis=0)]) if pad else lat
        out.append(text_to_image(pipe, chunk, key, latents=lat, **kwargs)[:batch - pad])
    return np.concatenate([np.asarray(o) for o in out])


def img2img(pipe: Pipeline, images, prompts, key, *, strength=0.8, **kwargs):
    """SDEdit in latent space: encode ``images``, noise the latents to ``t_0 =
    round(strength T) - 1``, denoise under the prompts from there, decode.

    Args:
        images: ``[B, H, W, 3]`` in [-1, 1], ``H, W`` multiples of ``f``.
        prompts, key: as :func:`text_to_image` (B prompts, or one for every image).
        strength: noise fraction in (0, 1] (1: the image is forgotten).
        **kwargs: ``negative_prompts``, ``guidance_scale``, ``sampler``, ``num_steps``,
            ``eta``, ``mesh``, ``output``, ``option_overrides`` of :func:`text_to_image`.

    Returns:
        ``[B, H, W, 3]`` images.
    """
    return _application(pipe, "img2img", images, prompts, key, (("strength", float(strength)),),
                        {}, **kwargs)


def inpaint(pipe: Pipeline, images, mask, prompts, key, *, paste=True, **kwargs):
    """Inpainting in latent space by known-latent replacement.

    The pixel hole ``mask`` (1 = regenerate) becomes a latent hole by taking, per ``f x f``
    block, the maximum (a latent is kept only if all its pixels are known); the
    known latents ``encode(images)`` are written back after every step
    (:func:`diffusion_jax.applications.inpaint.inpaint`), so the final latents equal them
    there (also after a last step that lands on ``alpha_bar_0 < 1``: they are written once
    more at the end). With ``paste`` the known pixels of ``images`` are copied into the decoded
    image, so the output equals the input outside the hole.

    Args:
        images: ``[B, H, W, 3]`` in [-1, 1].
        mask: ``[H, W, 1]`` or ``[B, H, W, 1]``, 1 where the image is regenerated.
        prompts, key, **kwargs: as :func:`img2img`.
        paste: copy the known pixels into the output.

    Returns:
        ``[B, H, W, 3]`` images.
    """
    images = jnp.asarray(images, jnp.float32)
    mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), images.shape[:3] + (1,))
    return _application(pipe, "inpaint", images, prompts, key, (("paste", bool(paste)),),
                        {"mask": mask}, **kwargs)


def invert(pipe: Pipeline, images, prompts, *, num_steps=50, guidance_scale=None,
           fixed_point_iters=0, mesh=None):
    """DDIM inversion of ``encode(images)`` under the prompts: the latents ``z_T`` that
    deterministic DDIM (same ``num_steps``, uniform spacing: decode with
    ``text_to_image(pipe._replace(ddim_timesteps=None), ..., latents=z_T)``) maps back to
    them (:func:`diffusion_jax.applications.inversion.ddim_invert`; ``fixed_point_iters``
    refinements per step make the round trip exact, see there).

    Returns:
        ``[B, H/f, W/f, C_z]`` float32 latents.
    """
    images = jnp.asarray(images, jnp.float32)
    options = samplers.make_options(**{**dataclasses.asdict(pipe.options),
                                       "num_steps": num_steps, "timesteps": None})
    prompts = _prompts(prompts, images.shape[0], "prompts")
    out, _ = _run(pipe, "invert", "ddim", options, prompts, None, guidance_scale,
                  {"x": images}, jax.random.key(0), mesh,
                  (("fixed_point_iters", int(fixed_point_iters)), ("decode", False)))
    return np.asarray(out, np.float32)


def diffusionclip(pipe: Pipeline, images, clip, source_text: str, target_text: str, **kwargs):
    """DiffusionCLIP (:mod:`diffusion_jax.applications.diffusionclip`) in latent space.

    The edit runs on ``z_0 = encode(images)`` with the UNet conditioned on the source text's
    states (no guidance); CLIP and the identity term see decoded images, ``decode(z)``:

        L = 1 - cos(E_I(decode(z'_0)) - E_I(decode(z_0)), E_T(target) - E_T(source))
            + id_weight mean |decode(z'_0) - decode(z_0)|

    Args:
        pipe: :class:`Pipeline`.
        images: ``[B, H, W, C]`` in [-1, 1].
        clip: ``(CLIPModel, tokenizer)`` whose image tower takes ``[B, H, W, C]``.
        source_text, target_text: the edit ``source -> target``.
        **kwargs: ``t0``, ``num_inversion_steps``, ``num_decode_steps``, ``finetune_steps``,
            ``learning_rate``, ``id_weight`` of
            :func:`~diffusion_jax.applications.diffusionclip.diffusionclip_edit`.

    Returns:
        Its dict (``output``, ``reconstruction``: images ``[B, H, W, C]``; ``latent``, per-step
        ``loss`` / ``directional`` / ``identity``, ``params``).
    """
    images = jnp.asarray(images, jnp.float32)
    latent_shape(pipe, images.shape[0], images.shape[1], images.shape[2])
    clip_model, clip_tokenizer = clip
    emb = clip_model.encode_text(jnp.asarray(clip_tokenizer([source_text, target_text])))
    ids = jnp.asarray(pipe.tokenizer(_prompts(source_text, images.shape[0], "source_text")))
    states = pipe.text_encoder(ids).last_hidden_state                     # [B, L, D]
    codec = LatentCodec(pipe.vae)
    return dclip.diffusionclip_edit(
        pipe.unet, pipe.schedule, codec.encode(images), clip_model.encode_image,
        dclip.text_direction(emb[0], emb[1]),
        make_denoiser=lambda unet: denoisers.build_denoiser(
            unet, text_condition(states), pred_type=pipe.options.pred_type),
        decode_fn=codec.decode, **kwargs)


def latent_shape(pipe: Pipeline, batch, height=None, width=None) -> tuple[int, int, int, int]:
    """``(B, H / f, W / f, C_z)`` for images of ``height x width`` (default ``sample_size``).

    Raises:
        ValueError: if a size is not a positive multiple of ``f * 2 ** (unet levels - 1)``
            (the autoencoder's factor times the UNet's).
    """
    factor = latent_factor(pipe.vae)
    unet_factor = 2 ** (getattr(pipe.unet, "num_levels", 1) - 1)
    sizes = []
    for name, value in (("height", height), ("width", width)):
        value = pipe.sample_size if value is None else value
        if value < factor * unet_factor or value % (factor * unet_factor):
            raise ValueError(f"{name}={value} must be a positive multiple of "
                             f"{factor * unet_factor} (autoencoder factor {factor} x UNet "
                             f"factor {unet_factor}).")
        sizes.append(value // factor)
    return (batch, sizes[0], sizes[1], pipe.unet.in_channels)


def _application(pipe, task, images, prompts, key, static, arrays, *, negative_prompts=None,
                 guidance_scale=7.5, sampler=None, num_steps=50, eta=None, mesh=None,
                 output="uint8", option_overrides=None):
    """Runs an image-to-image ``task`` (the shared part of :func:`img2img` / :func:`inpaint`)."""
    sampler = default_sampler(pipe, sampler)
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C] in [-1, 1], got shape {images.shape}.")
    latent_shape(pipe, images.shape[0], images.shape[1], images.shape[2])
    samplers.check_sampler(sampler, **tasks.TASK_TABLE[task].needs)
    prompts = _prompts(prompts, images.shape[0], "prompts")
    options = sampler_options(pipe, sampler=sampler, num_steps=num_steps, eta=eta,
                              overrides=option_overrides)
    static += (("decode", _check_output(output) != "latents"),)
    out, status = _run(pipe, task, sampler, options, prompts, negative_prompts, guidance_scale,
                       {"x": images, **arrays}, key, mesh, static)
    return latent_generate.finish(out, sampler, output, status)


def _run(pipe, task, sampler, options, prompts, negative_prompts, guidance_scale, arrays, key,
         mesh, static):
    """Tokenises and runs ``task``'s runner (:data:`~diffusion_jax.applications.tasks.TASK_TABLE`)
    through :func:`diffusion_jax.latent_generate.run`; returns the output and the chain's
    :class:`~diffusion_jax.samplers.chain.ChainStatus` (``None`` without a registry chain)."""
    ids, null_ids = _token_ids(pipe, prompts, negative_prompts, sampler, options)
    return latent_generate.run((pipe.unet, pipe.vae, pipe.text_encoder), pipe.schedule,
                               tasks.TASK_TABLE[task].runner, sampler, options, ids, null_ids,
                               guidance_scale, arrays, key, mesh=mesh, static=static)


def _token_ids(pipe, prompts, negative_prompts, sampler, options):
    """``(ids [B, L], null_ids [1 or B, L])`` of the prompts and the negative prompts (default
    the empty prompt), once the request is checked: one negative prompt or one per prompt, and
    a sampler that can start from the schedule's terminal noise level."""
    batch = len(prompts)
    ids = pipe.tokenizer(prompts)
    null_ids = pipe.tokenizer(_prompts(negative_prompts if negative_prompts is not None else "",
                                       None, "negative_prompts"))
    if null_ids.shape[0] not in (1, batch):
        raise ValueError(f"negative_prompts has {null_ids.shape[0]} entries; expected 1 or "
                         f"{batch} (one per prompt).")
    _check_terminal_snr(pipe.schedule, sampler, options)
    return ids, null_ids


def _check_terminal_snr(schedule, sampler, options):
    """A zero-terminal-SNR schedule (``alpha_bar_{T-1} = 0``, diffusers'
    ``rescale_betas_zero_snr``) starts from pure noise, where only an x0 / v prediction is
    defined and the noise level ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` is infinite:
    ddpm and ddim handle it; the sigma-grid solvers need ``sigma_max``."""
    if float(schedule.alphas_cumprod[-1]) > 0.0:
        return
    if options.pred_type in ("eps", "score"):
        raise ValueError(f"This schedule has zero terminal SNR (alpha_bar_{{T-1}} = 0), where an "
                         f"{options.pred_type} prediction cannot give x0; it needs a v- or "
                         "x0-predicting model (prediction_type v_prediction or sample).")
    capped = sampler in ("edm_heun", "dpm_solver_pp", "probability_flow") and \
        options.sigma_max is not None
    if sampler not in ("ddpm", "ddim") and not capped:
        raise ValueError(f"sampler {sampler!r} cannot start at the infinite noise level of a "
                         "zero-terminal-SNR schedule (alpha_bar_{T-1} = 0); use ddim or ddpm, or "
                         "edm_heun / dpm_solver_pp / probability_flow with the sampler option "
                         "sigma_max (e.g. 80).")


def _check_output(output):
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {list(OUTPUTS)}, got {output!r}.")
    return output


def _prompts(prompts, batch, field):
    """``prompts`` as a list of str (one string is repeated to ``batch``)."""
    if isinstance(prompts, str):
        prompts = [prompts] * (batch or 1)
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{field} must be a string or a non-empty list of strings.")
    if batch is not None and len(prompts) != batch:
        raise ValueError(f"{field} has {len(prompts)} entries; expected 1 or {batch}.")
    return prompts
