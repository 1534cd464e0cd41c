"""DiffusionCLIP (Kim et al., 2022): edit a real image toward a text by fine-tuning the denoiser.

1. DDIM-invert the image ``x_0`` to ``x_{t_0}`` with the original denoiser
   (:func:`~diffusion_jax.applications.inversion.ddim_invert`).
2. Fine-tune a copy ``theta'`` of the model's parameters for a few Adam steps on

       L(theta') = 1 - cos(E_I(x'_0) - E_I(x_0), E_T(target) - E_T(source))
                   + lambda_id |x'_0 - x_0|_1,        x'_0 = DDIM_{theta'}(x_{t_0}),

   the directional CLIP loss (the image embedding should move the way the text embedding
   moves from source text to target text) plus an identity term. ``x'_0`` is decoded by a
   short deterministic DDIM chain that is differentiated end to end (each denoiser call is
   rematerialised with ``jax.checkpoint``, so memory grows with the number of steps only by
   the chain's states).
3. Decode ``x_{t_0}`` with ``theta'``.

Works on any ``nnx.Module`` called as ``model(x, t, cond)``: a pixel-space UNet, or a latent
denoiser together with ``decode_fn`` (latents -> images) and an ``x_0`` given as latents. The
module becomes a denoiser through ``make_denoiser`` (e.g. :func:`diffusion_jax.denoisers.build_denoiser`
with the condition and the model's ``config.diffusion``), which carries the prediction type
and time parameterisation, so discrete, continuous-time and EDM models are edited alike.
The CLIP side is two arrays/callables, so any image encoder of the right input size works.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from diffusion_jax import denoisers
from diffusion_jax.applications import common, inversion


def text_direction(source_text_emb: jax.Array, target_text_emb: jax.Array) -> jax.Array:
    """``Delta T = E_T(target) - E_T(source)`` ([E] or [B, E]), unit length along the last axis."""
    d = target_text_emb - source_text_emb
    return d / jnp.maximum(jnp.linalg.norm(d, axis=-1, keepdims=True), 1e-8)


def directional_similarity(image_embed_fn: Callable, edited: jax.Array, source_image_emb: jax.Array,
                           delta_text: jax.Array) -> jax.Array:
    """``cos(E_I(edited) - E_I(source), Delta T)`` per image: ``[B]``.

    Args:
        image_embed_fn: images ``[B, H, W, C]`` -> ``[B, E]`` (e.g. ``CLIPModel.encode_image``).
        edited: ``[B, H, W, C]`` edited images in [-1, 1].
        source_image_emb: ``[B, E]`` embeddings of the source images.
        delta_text: ``[E]`` or ``[B, E]`` text direction (see `text_direction`).
    """
    d = image_embed_fn(edited) - source_image_emb
    d = d / jnp.maximum(jnp.linalg.norm(d, axis=-1, keepdims=True), 1e-8)
    return jnp.sum(d * jnp.broadcast_to(delta_text, d.shape), axis=-1)


def edit_scores(clip_model, tokenizer, images, edited, source_text: str,
                target_text: str) -> dict[str, jax.Array]:
    """Per-image ``[B]`` scores of an edit ``images -> edited`` (both ``[B, H, W, C]``):

    * ``directional``: ``cos(E_I(edited) - E_I(images), E_T(target) - E_T(source))``;
    * ``identity_l1``: ``mean |edited - images|`` over pixels;
    * ``target_score_input`` / ``target_score_output``: the CLIP score ``100 max(cos, 0)`` of
      ``images`` / ``edited`` against the target text.

    Args:
        clip_model: a `CLIPModel` (``encode_image``, ``encode_text``: unit embeddings).
        tokenizer: texts -> ids ``[N, L]``.
    """
    images, edited = jnp.asarray(images, jnp.float32), jnp.asarray(edited, jnp.float32)
    text = clip_model.encode_text(jnp.asarray(tokenizer([source_text, target_text])))
    before, after = clip_model.encode_image(images), clip_model.encode_image(edited)
    score = lambda emb: 100.0 * jnp.maximum(emb @ text[1], 0.0)
    return dict(directional=directional_similarity(clip_model.encode_image, edited, before,
                                                   text_direction(text[0], text[1])),
                identity_l1=jnp.mean(jnp.abs(edited - images), axis=(1, 2, 3)),
                target_score_input=score(before), target_score_output=score(after))


def diffusionclip_edit(model: nnx.Module, sched, x0: jax.Array, image_embed_fn: Callable,
                       delta_text: jax.Array, *, make_denoiser: Callable | None = None,
                       t0: float = 0.5, num_inversion_steps: int = 20, num_decode_steps: int = 6,
                       finetune_steps: int = 10, learning_rate: float = 1e-4,
                       id_weight: float = 0.3, decode_fn: Callable | None = None) -> dict:
    """Edits ``x0`` toward ``delta_text`` by fine-tuning a copy of ``model`` (module docstring).

    Args:
        model: the ``nnx.Module`` whose parameters are fine-tuned; left unchanged.
        sched: :class:`~diffusion_jax.schedules.DiscreteSchedule`.
        x0: ``[B, H, W, C]`` inputs in the model's space (images in [-1, 1], or latents).
        image_embed_fn: images -> ``[B, E]`` CLIP image embeddings (differentiable).
        delta_text: ``[E]`` (or ``[B, E]``) unit text direction, see `text_direction`.
        make_denoiser: ``module -> Denoiser`` (:class:`~diffusion_jax.denoisers.Denoiser`),
            e.g. ``lambda m: build_denoiser(m, cond, diffusion=config.diffusion,
            schedule=sched)``; default ``build_denoiser(m)`` (unconditional, discrete eps).
        t0: inversion depth as a fraction of the T steps, in (0, 1].
        num_inversion_steps: DDIM steps of the inversion (no gradient).
        num_decode_steps: DDIM steps of the differentiated decoding (and the final one).
        finetune_steps: Adam steps on the parameters.
        learning_rate: Adam learning rate.
        id_weight: ``lambda_id`` of the identity L1 term (mean absolute pixel error).
        decode_fn: latents -> images for latent models (default: identity).

    Returns:
        ``{"output", "reconstruction", "latent", "loss", "directional", "identity", "params"}``:
        the edited images, the decoding with the original parameters (same latent and chain),
        the inverted latent, per-step loss / mean directional similarity / identity error
        (``[finetune_steps]``, each measured before that step's update), and the fine-tuned
        ``nnx.Param`` state.

    Raises:
        ValueError: ``t0`` outside (0, 1] or a step count below 1.
    """
    for name, value in (("num_inversion_steps", num_inversion_steps),
                        ("num_decode_steps", num_decode_steps), ("finetune_steps", finetune_steps)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    t_start = common.resolve_t_start(t0, sched.num_timesteps)
    decode_fn = (lambda z: z) if decode_fn is None else decode_fn
    make_denoiser = make_denoiser or denoisers.build_denoiser
    template = make_denoiser(model)  # its parameterisation; parameters come per call
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.checkpoint
    def apply(p, x, t):
        return make_denoiser(nnx.merge(graphdef, p, rest))(x, t)

    def denoiser(p):
        return template.wrap(lambda x, t: apply(p, x, t))

    def decode(p, latent):
        return inversion.ddim_decode(denoiser(p), sched, latent, num_steps=num_decode_steps,
                                     t_start=t_start)

    images0 = decode_fn(x0)
    latent = jax.jit(lambda p, x: inversion.ddim_invert(
        denoiser(p), sched, x, num_steps=num_inversion_steps, t_start=t_start))(params, x0)
    source_emb = jax.jit(image_embed_fn)(images0)

    def loss_fn(p):
        edited = decode_fn(decode(p, latent))
        directional = directional_similarity(image_embed_fn, edited, source_emb, delta_text)
        identity = jnp.mean(jnp.abs(edited - images0))
        loss = jnp.mean(1.0 - directional) + id_weight * identity
        return loss, (jnp.mean(directional), identity)

    tx = optax.adam(learning_rate)

    @jax.jit
    def step(p, opt_state):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, jnp.stack([loss, *aux])

    tuned, opt_state, history = params, tx.init(params), []
    for _ in range(finetune_steps):
        tuned, opt_state, stats = step(tuned, opt_state)
        history.append(stats)
    history = jnp.stack(history)
    final = jax.jit(decode)
    return dict(output=decode_fn(final(tuned, latent)),
                reconstruction=decode_fn(final(params, latent)), latent=latent,
                loss=history[:, 0], directional=history[:, 1], identity=history[:, 2],
                params=tuned)
