"""Training objectives: what `diffusion_jax.train`'s one train step optimises.

``config.train.objective`` picks an entry of one table (`get`); every objective goes through
the same train step, sharding, EMA and checkpoints, and names the model archs it trains
(``config.model.arch``, `diffusion_jax.models.build`; ``""`` = its first). Pixel diffusion and
the stages Stable Diffusion trains separately (Rombach et al., 2022; Radford et al., 2021):

* ``"diffusion"`` (arch ``unet`` or ``dit``): the denoising loss of ``config.diffusion.kind`` on images
  ``x: [B, H, W, C]`` with the condition of ``config.model`` (labels, a low-res image);
  DDPM's discrete loss, continuous-time DSM of an SDE or EDM (`_denoising_loss`). Its sample
  grid is written during training.
* ``"autoencoder"`` (arch ``autoencoder_kl``): the KL autoencoder on images,
  ``z ~ q(z | x)``, ``x_hat = decode(z)``::

      loss = l1 mean|x - x_hat| + l2 mean (x - x_hat)^2 + kl KL(q(z|x) || N(0, I)) / (H W C)

* ``"clip"`` (arch ``clip``): `CLIPModel` (text transformer + image CNN), symmetric InfoNCE
  with the learned temperature (`contrastive.clip_loss`) on captions drawn for each image from
  the training templates (`captions.random_captions`); with ``clip.positives = "label"`` every
  pair of the same class counts as a positive. The caption tokenizer is written to
  ``WORKDIR/tokenizer``.
* ``"latent_diffusion"`` (arch ``cond_unet``, settings in ``config.model``): the denoising
  loss of ``config.diffusion.kind`` on ``z = scale * sample(q(z | x))`` of the frozen
  autoencoder, conditioned on the frozen CLIP text encoder's token states; their states are replaced by
  the empty prompt's with probability ``latent.caption_drop_prob`` on device
  (``conditioning.text_condition``, like label dropout; for classifier-free guidance).
  ``scale = 1 / std(z)`` measured once on training latents (as SD
  chose 0.18215) and stored in the config and in ``WORKDIR/latent_scale.json``. The frozen
  stages are pinned: the step and a sha256 of the parameters of each
  (`loading.params_digest`) are recorded at the first start in ``WORKDIR/frozen_stages.json``
  and in the config (``latent.autoencoder_step`` / ``_sha256``, ``latent.clip_step`` /
  ``_sha256``); resuming and sampling load exactly those steps (`load_frozen_stage`) and
  refuse when one is gone or its content changed, so training a stage further never silently
  changes a trained text-to-image model. Its sample grid is `latent_grid_prompts` through
  `latent_generate.sample`, the program of ``pipelines.text_to_image``.

An `Objective` gives the archs, the loss, a host-side batch transform (captions are strings,
tokenised before the batch is sharded), a training-time sample grid and a final evaluation on
the test split.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from diffusion_jax import (caption_tokenizer, captions, checkpoint, clip_tokenizer, conditioning,
                           contrastive, data, denoisers, generate, latent_generate, loading, losses,
                           samplers)
from diffusion_jax.models import build
from diffusion_jax.sde import parameterization

OBJECTIVES = ("diffusion", "autoencoder", "clip", "latent_diffusion")
TOKENIZER_SUBDIR = "tokenizer"
SCALE_FILE = "latent_scale.json"
STAGES_FILE = "frozen_stages.json"
FROZEN_STAGES = ("autoencoder", "clip")  # objective = the name of its latent.* fields
EVAL_FILE = "eval.json"


class Objective(NamedTuple):
    """What `train` needs of an objective.

    Attributes:
        archs: the ``model.arch`` values it trains; the first is the default.
        make_loss_fn: ``(graphdef, schedule, config) -> loss_fn(params, batch, key) ->
            (loss, aux)``; ``aux`` is ``(per_example [b], t [b])`` for diffusion objectives
            (the train step's quartile metrics), else a dict of scalar metrics.
        is_diffusion: whether ``aux`` is ``(per_example, t)``.
        host_batch_fn: ``(config, workdir) -> fn(batch, step) -> batch`` run on the host before
            sharding, or None.
        evaluate: ``(config, graphdef, params, workdir) -> dict`` of test-split numbers, or
            None.
        sample_fn: ``(config, graphdef, schedule, mesh) -> fn(params, key) -> images [N, H, W,
            C]`` in [-1, 1], the grid written every ``train.eval_every`` steps, or None.
    """
    archs: tuple[str, ...]
    make_loss_fn: Callable
    is_diffusion: bool
    host_batch_fn: Callable | None
    evaluate: Callable | None
    sample_fn: Callable | None


def objective_of(config) -> str:
    """``config.train.objective``; ``"diffusion"`` for configs stored before the field existed."""
    return config.train.get("objective", "diffusion")


def get(name: str) -> Objective:
    """The objective called ``name``.

    Raises:
        ValueError: an unknown name.
    """
    table = {"diffusion": _DIFFUSION, "autoencoder": _AUTOENCODER, "clip": _CLIP,
             "latent_diffusion": _LATENT}
    if name not in table:
        raise ValueError(f"train.objective={name!r} must be one of {OBJECTIVES}.")
    return table[name]


def with_arch(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with ``model.arch`` resolved: ``""`` becomes the objective's first arch (a
    copy); a set arch is checked.

    Raises:
        ValueError: an unknown objective or arch, or an arch the objective does not train
            (names both).
    """
    objective, arch = objective_of(config), config.model.get("arch", "")
    archs = get(objective).archs
    if arch and arch not in archs:
        build.get(arch)  # an unknown arch is named as such
        raise ValueError(f"model.arch={arch!r} is not trained by train.objective={objective!r}, "
                         f"which trains {' or '.join(map(repr, archs))}.")
    if arch:
        return config
    config = copy.deepcopy(config)
    config.model.arch = archs[0]
    return config


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """The network ``config`` trains: `build.build_model` of `with_arch` ``(config)``."""
    return build.build_model(with_arch(config), rngs=rngs)


def prepare_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the fields that depend on files resolved (deterministically,
    so a resumed run resolves them to the stored values).

    * every objective: ``model.arch`` (`with_arch`), so each checkpoint records its arch.
    * ``clip``: builds the caption tokenizer into ``WORKDIR/tokenizer`` (once) and sets
      ``clip.vocab_size`` to its size.
    * ``latent_diffusion``: reads the frozen stages' configs for ``latent.latent_channels`` and
      ``latent.cross_attention_dim``, and sets ``latent.scale_factor`` (when 0) from
      ``WORKDIR/latent_scale.json``, measuring it first if that file does not exist.

    Raises:
        ValueError: a resolved field disagrees with a value set in the config, or the stages
            do not fit together (image size, channels).
        FileNotFoundError: a stage workdir has no checkpoint.
    """
    objective = objective_of(config)
    config = copy.deepcopy(with_arch(config))
    if objective not in ("clip", "latent_diffusion"):
        return config
    if objective == "clip":
        tok = _workdir_tokenizer(config, workdir)
        _resolve(config.clip, "vocab_size", tok.backend.get_vocab_size())
    else:
        _prepare_latent(config, workdir)
    return config


def final_evaluation(config, graphdef, params, workdir: str) -> dict[str, float] | None:
    """Runs the objective's test-split evaluation and writes ``WORKDIR/eval.json`` (host 0).

    Returns None when the objective has none or ``final_eval.num_images`` is -1.
    """
    if config.final_eval.num_images < 0:
        return None
    evaluate = get(objective_of(config)).evaluate
    if evaluate is None:
        return None
    results = evaluate(config, graphdef, params, workdir)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, EVAL_FILE), "w") as f:
            json.dump(results, f, indent=2)
    return results


def load_stage(workdir: str, objective: str, step: int | None = None):
    """The first-EMA model of a finished ``objective`` stage (step ``step``, default the
    latest): `diffusion_jax.loading.Loaded`.

    Raises:
        ValueError: ``workdir`` holds a run of another objective.
    """
    return loading.load(workdir=workdir, step=step, kinds=(objective,))


def load_frozen_stage(config, objective: str):
    """The frozen ``objective`` stage (``"autoencoder"`` or ``"clip"``) of a
    ``latent_diffusion`` config at its pinned step, checked against the recorded sha256.

    A config without a pin (a run from before stages were pinned) loads the stage's latest
    step, with a warning.

    Raises:
        FileNotFoundError: the pinned step is gone (names it and the steps found).
        ValueError: the pinned step's parameters differ from the recorded ones (names the
            recorded and the found step and sha256).
    """
    lat = config.latent
    directory = lat[f"{objective}_workdir"]
    step, digest = lat.get(f"{objective}_step", 0), lat.get(f"{objective}_sha256", "")
    if not step:
        print(f"Warning: this text-to-image run records no step of its {objective} stage (it "
              f"predates pinning); using the latest checkpoint of {directory}, which may not "
              "be the one it was trained with.", file=sys.stderr, flush=True)
        return load_stage(directory, objective)
    _check_pinned_step(directory, objective, step, digest)
    loaded = load_stage(directory, objective, step)
    found = loading.params_digest(loaded.params)
    if found != digest:
        raise ValueError(
            f"the {objective} stage changed: this text-to-image run was trained with step "
            f"{step} of {directory} (sha256 {digest}), but step {step} there now has sha256 "
            f"{found}; restore that checkpoint or train the text-to-image stage again.")
    return loaded


def latent_stages(config):
    """``(vae, text_encoder, tokenizer)``: the frozen stages a ``latent_diffusion`` config
    trains and samples with, at their pinned steps (`load_frozen_stage`): the autoencoder with
    its ``scaling_factor`` set to ``latent.scale_factor``, the CLIP text tower, and the caption
    tokenizer of ``<clip workdir>/tokenizer``. Raises as `load_frozen_stage`."""
    vae = load_frozen_stage(config, "autoencoder").model
    vae.scaling_factor = float(config.latent.scale_factor)
    text_encoder = load_frozen_stage(config, "clip").model.text_model
    tok = clip_tokenizer.load_tokenizer(os.path.join(config.latent.clip_workdir,
                                                     TOKENIZER_SUBDIR))
    return vae, text_encoder, tok


def latent_grid_prompts(num: int) -> list[str]:
    """The prompts of the ``latent_diffusion`` training grid: ``"a photo of <class i mod 10>"``
    for ``i < num`` (a training caption template, first class noun; one per class, in class
    order, repeated)."""
    prompts = captions.class_prompts("a photo of {}")
    return [prompts[i % len(prompts)] for i in range(num)]


# ------------------------------------------------------------------------- pixel diffusion

def _diffusion_loss_fn(graphdef, schedule, config):
    """``loss_fn(params, batch, key) -> (loss, (per_example [b], t [b]))``: the denoising loss
    of ``config.diffusion.kind`` on ``batch["image"]`` (`_denoising_loss`), with the training
    condition (label dropout, SR low-res image) of ``config.model``."""
    parameterization.check_config(config.diffusion, config.model.time_input)

    def loss_fn(params, batch, key):
        loss_key, dropout_key, label_key, cond_key = jax.random.split(key, 4)
        model = nnx.merge(graphdef, params)
        cond = conditioning.training_condition(config, schedule, batch, label_key=label_key,
                                               image_key=cond_key)

        def denoise(x_t, t):
            return model(x_t, t, cond, deterministic=False, dropout_key=dropout_key)

        return _denoising_loss(denoise, schedule, batch["image"], loss_key, config.diffusion)

    return loss_fn


def _denoising_loss(denoise, schedule, x0, key, diff):
    """``(loss, (per_example [b], t [b]))`` of ``diff.kind`` on data ``x0 [b, ...]``.

    ``discrete``: DDPM's loss (`losses.denoising_loss`, ``pred_type``, weighting); a continuous
    kind (``vp``, ``subvp``, ``ve``, ``edm``, ``flow``): `parameterization.training_loss`,
    where ``t`` is the noise level's quantile bucket in {0..T-1}.
    """
    if parameterization.kind_of(diff) == "discrete":
        loss, per_example, t = losses.denoising_loss(
            denoise, schedule, x0, key, pred_type=diff.pred_type,
            weighting=diff.loss_weighting, min_snr_gamma=diff.min_snr_gamma)
    else:
        loss, per_example, t = parameterization.training_loss(
            denoise, diff, x0, key, schedule.num_timesteps)
    return loss, (per_example, t)


def _diffusion_sample_fn(config, graphdef, schedule, mesh):
    """``config.sample.num_samples`` images from ``config.sample``'s sampler."""
    return generate.make_sample_fn(graphdef, schedule, config, mesh,
                                   num_samples=config.sample.num_samples)


# ----------------------------------------------------------------------------- autoencoder

def _autoencoder_loss_fn(graphdef, schedule, config):
    """The loss of the module docstring; aux: means of l1, l2, kl (nats / example), psnr."""
    del schedule
    w = config.autoencoder

    def loss_fn(params, batch, key):
        model = nnx.merge(graphdef, params)
        x = batch["image"]
        posterior = model.encode(x)
        err = model.decode(posterior.sample(key)) - x
        l1 = jnp.mean(jnp.abs(err), axis=(1, 2, 3))
        l2 = jnp.mean(jnp.square(err), axis=(1, 2, 3))
        kl = posterior.kl()
        per_example = w.l1_weight * l1 + w.l2_weight * l2 + w.kl_weight * kl / x[0].size
        aux = dict(l1=l1.mean(), l2=l2.mean(), kl=kl.mean(), psnr=jnp.mean(psnr(l2)))
        return per_example.mean(), aux

    return loss_fn


def psnr(mse: jax.Array) -> jax.Array:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2): ``10 log10(2^2 / mse)``."""
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def _evaluate_autoencoder(config, graphdef, params, workdir):
    """Reconstruction ``decode(mode(q(z|x)))`` of the test split: mean PSNR and MSE per image."""
    del workdir
    images, _ = _eval_images(config)

    @jax.jit
    def mse(p, x):
        model = nnx.merge(graphdef, p)
        return jnp.mean(jnp.square(model.decode(model.encode(x).mode()) - x), axis=(1, 2, 3))

    errors = np.concatenate([np.asarray(mse(params, x)) for x in _chunks(images, config)])
    return dict(psnr=float(np.mean(psnr(errors))), mse=float(errors.mean()),
                num_images=int(errors.size), split=config.final_eval.split)


# ------------------------------------------------------------------------------------ clip

def _clip_loss_fn(graphdef, schedule, config):
    """Symmetric InfoNCE; aux: the capped temperature inverse and in-batch recall@1."""
    del schedule
    by_label = config.clip.positives == "label"
    if config.clip.positives not in ("pair", "label"):
        raise ValueError(f"clip.positives={config.clip.positives!r} must be 'pair' or 'label'.")

    def loss_fn(params, batch, key):
        del key
        model = nnx.merge(graphdef, params)
        out = model(batch["input_ids"], batch["image"])
        labels = batch["label"]
        mask = labels[:, None] == labels[None, :] if by_label else None
        loss = contrastive.clip_loss(out.image_embeds, out.text_embeds, out.logit_scale,
                                     positive_mask=mask)
        i2t, t2i = contrastive.retrieval_accuracy(out.image_embeds, out.text_embeds)
        scale = jnp.exp(jnp.minimum(out.logit_scale, contrastive.MAX_LOG_SCALE))
        return loss, dict(logit_scale=scale, batch_recall_i2t=i2t, batch_recall_t2i=t2i)

    return loss_fn


def _caption_batch_fn(config, *, tokenizer_dir):
    """``fn(batch, step)`` adding ``input_ids [b, L]`` of captions drawn from the training
    templates, seeded by ``(seed, step, process)`` (caption dropout is on device, in the
    latent loss)."""
    tok = clip_tokenizer.load_tokenizer(tokenizer_dir)
    train_templates, _ = _template_split(config)
    attribute_prob = config.captions.attribute_prob

    def fn(batch, step):
        seed = (config.seed, step, jax.process_index())
        texts = captions.random_captions(batch["image"], batch["label"],
                                         templates=train_templates, seed=seed,
                                         attribute_prob=attribute_prob)
        return dict(batch, input_ids=tok(texts))

    return fn


def _evaluate_clip(config, graphdef, params, workdir):
    """Zero-shot accuracy and retrieval recall@1 on the test split.

    * ``zero_shot_acc``: class = argmax_k cos(image, text("a photo of <class k>")).
    * ``zero_shot_acc_heldout``: the class text embedding averaged over the held-out templates.
    * ``recall1_*``: each test image gets a caption from the held-out templates; in pools of
      1000 pairs (fewer: one pool), the top-1 partner (image -> text, text -> image) is its own pair
      (``_pair``) or a pair of the same class (``_class``; captions of one class are often
      identical strings, so the pair number is bounded well below 1).
    """
    images, labels = _eval_images(config)
    tok = clip_tokenizer.load_tokenizer(os.path.join(workdir, TOKENIZER_SUBDIR))
    model_fn = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_image(x))
    text_fn = jax.jit(lambda p, ids: nnx.merge(graphdef, p).encode_text(ids))
    img = np.concatenate([np.asarray(model_fn(params, x)) for x in _chunks(images, config)])
    _, heldout = _template_split(config)
    results = dict(num_images=int(labels.size), split=config.final_eval.split)
    for name, templates in (("zero_shot_acc", ("a photo of {}",)),
                            ("zero_shot_acc_heldout", heldout)):
        emb = np.mean([np.asarray(text_fn(params, tok(captions.class_prompts(t))))
                       for t in templates], axis=0)
        results[name] = float(np.mean(np.argmax(img @ emb.T, axis=1) == labels))
    texts = captions.random_captions(images, labels, templates=heldout, seed=(config.seed, 7))
    txt = np.concatenate([np.asarray(text_fn(params, tok(texts[i:i + 1000])))
                          for i in range(0, len(texts), 1000)])
    results.update(_pool_recall(img, txt, labels, pool=1000))
    return results


def _pool_recall(img, txt, labels, *, pool):
    """Mean recall@1 over consecutive pools of ``pool`` pairs (one pool of all pairs when
    there are fewer; see `_evaluate_clip`)."""
    pool = min(pool, len(labels))
    sums = dict(recall1_i2t_pair=0.0, recall1_t2i_pair=0.0, recall1_i2t_class=0.0,
                recall1_t2i_class=0.0)
    count = 0
    for i in range(0, len(labels) - pool + 1, pool):
        sim = img[i:i + pool] @ txt[i:i + pool].T
        lab = labels[i:i + pool]
        i2t, t2i = sim.argmax(axis=1), sim.argmax(axis=0)
        own = np.arange(pool)
        sums["recall1_i2t_pair"] += np.mean(i2t == own)
        sums["recall1_t2i_pair"] += np.mean(t2i == own)
        sums["recall1_i2t_class"] += np.mean(lab[i2t] == lab)
        sums["recall1_t2i_class"] += np.mean(lab[t2i] == lab)
        count += 1
    return {k: float(v / max(count, 1)) for k, v in sums.items()}


# ------------------------------------------------------------------------ latent diffusion

def _latent_loss_fn(graphdef, schedule, config):
    """The denoising loss of ``config.diffusion.kind`` (`_denoising_loss`) on scaled latents
    of the frozen autoencoder, conditioned on the frozen text encoder's states ``[b, L, D]``,
    each replaced by the empty prompt's states with probability ``latent.caption_drop_prob``
    (:func:`~diffusion_jax.conditioning.text_condition`, on device); aux ``(per_example, t)``."""
    parameterization.check_config(config.diffusion, config.model.time_input)
    vae, text_model, tok = latent_stages(config)
    scale = config.latent.scale_factor
    null_text = text_model(jnp.asarray(tok([""]))).last_hidden_state       # [1, L, D]

    def loss_fn(params, batch, key):
        latent_key, loss_key = jax.random.split(key)
        z = jax.lax.stop_gradient(vae.encode(batch["image"]).sample(latent_key) * scale)
        states = jax.lax.stop_gradient(text_model(batch["input_ids"]).last_hidden_state)
        cond = conditioning.text_condition(states, null_text=null_text,
                                           drop_prob=config.latent.caption_drop_prob,
                                           key=jax.random.fold_in(key, 2))
        unet = nnx.merge(graphdef, params)
        return _denoising_loss(lambda x_t, t: unet(x_t, t, cond), schedule, z,
                               loss_key, config.diffusion)

    return loss_fn


def _latent_sample_fn(config, graphdef, schedule, mesh):
    """``sample_fn(params, key) -> [N, H, W, C]`` in [-1, 1], ``N = sample.num_samples``: the
    UNet ``nnx.merge(graphdef, params)`` with the frozen stages (`latent_stages`)
    through `latent_generate.sample` on `latent_grid_prompts` (null: the empty prompt) with
    ``config.sample``'s sampler, options and guidance scale, split over ``mesh``; ``z_T`` from
    ``fold_in(key, 0)``, the chain from ``fold_in(key, 1)``. That is
    ``pipelines.text_to_image(stage_pipeline.load_pipeline(workdir), prompts, key,
    guidance_scale=s, sampler=..., num_steps=..., mesh=mesh, output="float")`` of the same
    parameters."""
    vae, text_encoder, tok = latent_stages(config)
    prompts = latent_grid_prompts(config.sample.num_samples)
    ids, null_ids = tok(prompts), tok([""])
    sampler, options = config.sample.sampler, samplers.options_from_config(config)
    samplers.check_sampler(sampler)
    scale = denoisers.default_guidance_scale(config)
    size = config.data.image_size // latent_generate.latent_factor(vae)
    shape = (len(prompts), size, size, config.latent.latent_channels)

    def sample_fn(params, key):
        unet = latent_generate.sampling_unet(nnx.merge(graphdef, params), config.diffusion)
        out, status = latent_generate.sample(
            (unet, vae, text_encoder), schedule, ids, null_ids, key, shape=shape,
            sampler=sampler, options=options, guidance_scale=scale, mesh=mesh)
        return latent_generate.finish(out, sampler, "float", status)

    return sample_fn


def measure_scale_factor(vae, images: np.ndarray, key: jax.Array, batch_size: int = 512
                         ) -> tuple[float, float]:
    """``(1 / std(z), std(z))`` over posterior samples ``z`` of ``images`` (SD's rule)."""
    encode = jax.jit(lambda x, k: vae.encode(x).sample(k))
    zs = [np.asarray(encode(images[i:i + batch_size], jax.random.fold_in(key, i)))
          for i in range(0, len(images), batch_size)]
    std = float(np.concatenate(zs).std())
    return 1.0 / std, std


def _prepare_latent(config, workdir):
    """Resolves the ``latent`` fields (`prepare_config`)."""
    lat = config.latent
    for name in ("autoencoder_workdir", "clip_workdir"):
        if not lat[name]:
            raise ValueError(f"latent.{name} must name the workdir of that trained stage.")
        lat[name] = os.path.abspath(lat[name])
    _pin_frozen_stages(config, workdir)
    ae_cfg = _stage_config(lat.autoencoder_workdir, "autoencoder", lat.autoencoder_step)
    clip_cfg = _stage_config(lat.clip_workdir, "clip", lat.clip_step)
    for field in ("image_size", "num_channels"):
        if ae_cfg.data[field] != config.data[field]:
            raise ValueError(f"data.{field}={config.data[field]} differs from the autoencoder "
                             f"stage's {ae_cfg.data[field]} ({lat.autoencoder_workdir}).")
    _resolve(lat, "latent_channels", ae_cfg.autoencoder.latent_channels)
    _resolve(lat, "cross_attention_dim", clip_cfg.clip.hidden_size)
    _resolve(config.captions, "max_length", clip_cfg.captions.max_length)
    if lat.scale_factor <= 0:
        lat.scale_factor = _stored_scale_factor(config, workdir)


def _pin_frozen_stages(config, workdir):
    """Sets ``latent.<stage>_step`` / ``_sha256`` from ``WORKDIR/frozen_stages.json`` and checks
    those steps exist. Until the run has a checkpoint, each stage is pinned afresh to
    ``latent.<stage>_step`` (0: its latest step) and the file (re)written (host 0). A workdir
    with checkpoints but no file (trained before pinning) is pinned to the stages' latest steps
    from now on, with a warning."""
    lat, path = config.latent, os.path.join(workdir, STAGES_FILE)
    trained = _latest_step(workdir, missing_ok=True) is not None
    if trained and os.path.isfile(path):
        record = _read_stages_record(path)
    else:
        record = {}
        for objective in FROZEN_STAGES:
            directory = lat[f"{objective}_workdir"]
            step = lat[f"{objective}_step"] or _latest_step(directory)
            _stage_config(directory, objective, step)  # the right kind, before building it
            digest = loading.params_digest(load_stage(directory, objective, step).params)
            record[objective] = dict(workdir=directory, step=int(step), sha256=digest)
        if trained:
            print(f"Warning: {workdir} has checkpoints but no {STAGES_FILE} (trained before "
                  "frozen stages were pinned): pinning the stages' current steps from now on "
                  f"({_describe_record(record)}); they may differ from those it was trained "
                  "with.", file=sys.stderr, flush=True)
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            with open(path, "w") as f:
                json.dump(record, f, indent=2)
    for objective in FROZEN_STAGES:  # their content is checked when loaded (load_frozen_stage)
        _resolve(lat, f"{objective}_step", record[objective]["step"])
        _resolve(lat, f"{objective}_sha256", record[objective]["sha256"])
        _check_pinned_step(lat[f"{objective}_workdir"], objective, lat[f"{objective}_step"],
                           lat[f"{objective}_sha256"])


def _read_stages_record(path):
    with open(path) as f:
        record = json.load(f)
    for objective in FROZEN_STAGES:
        if not isinstance(record.get(objective), dict) or not {"step", "sha256"} <= set(
                record[objective]):
            raise ValueError(f"{path} has no step and sha256 of the {objective} stage.")
    return record


def _describe_record(record):
    return ", ".join(f"{name} step {r['step']} sha256 {r['sha256'][:12]}"
                     for name, r in record.items())


def _latest_step(workdir, missing_ok=False):
    """The newest checkpoint step of ``workdir`` (None with ``missing_ok`` when there is none).

    Raises:
        FileNotFoundError: no checkpoint.
    """
    if missing_ok and not os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR)):
        return None
    manager = checkpoint.make_manager(workdir, create=False, async_checkpointing=False)
    steps = manager.all_steps()
    if not steps and not missing_ok:
        raise FileNotFoundError(f"no checkpoint found in {str(manager.directory)!r}.")
    return max(steps) if steps else None


def _check_pinned_step(directory, objective, step, digest):
    """FileNotFoundError naming the pinned and the found steps when ``step`` is gone."""
    manager = checkpoint.make_manager(directory, create=False, async_checkpointing=False)
    steps = sorted(manager.all_steps())
    if step not in steps:
        raise FileNotFoundError(
            f"the {objective} stage this text-to-image run was trained with, step {step} of "
            f"{directory} (sha256 {digest}), is gone (steps found: {steps or 'none'}); "
            f"restore that checkpoint or train the text-to-image stage again.")


def _stored_scale_factor(config, workdir):
    """``WORKDIR/latent_scale.json``'s factor; measured on training images and written first
    when the file does not exist."""
    path = os.path.join(workdir, SCALE_FILE)
    if not os.path.isfile(path):
        vae = load_frozen_stage(config, "autoencoder").model
        images = next(data.make_train_iterator(
            config.data, batch_size=config.latent.scale_num_images, seed=config.seed))["image"]
        factor, std = measure_scale_factor(vae, images, jax.random.key(config.seed))
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            with open(path, "w") as f:
                json.dump(dict(scale_factor=factor, latent_std=std, num_images=len(images)), f)
        return factor
    with open(path) as f:
        return float(json.load(f)["scale_factor"])


# ------------------------------------------------------------------------------ shared

def _workdir_tokenizer(config, workdir):
    """``WORKDIR/tokenizer``: built from the caption vocabulary on first use, then loaded."""
    directory = os.path.join(workdir, TOKENIZER_SUBDIR)
    if not os.path.isfile(os.path.join(directory, "vocab.json")):
        tok = caption_tokenizer.build_caption_tokenizer(max_length=config.captions.max_length)
        if tok.eos_token_id != config.clip.eos_token_id:
            raise ValueError(f"caption tokenizer: <|endoftext|> has id {tok.eos_token_id}, "
                             f"expected clip.eos_token_id={config.clip.eos_token_id}")
        if jax.process_index() == 0:
            caption_tokenizer.save_caption_tokenizer(tok, directory)
        return tok
    tok = clip_tokenizer.load_tokenizer(directory)
    if tok.max_length != config.captions.max_length:
        raise ValueError(f"captions.max_length={config.captions.max_length} differs from the "
                         f"tokenizer in {directory} ({tok.max_length}).")
    return tok


def _template_split(config):
    return captions.split_templates(num_heldout=config.captions.num_heldout,
                                    seed=config.captions.template_seed)


def _stage_config(workdir, objective, step=None):
    """The stored config of a stage workdir (step ``step``, default the latest), checked to be
    of ``objective``."""
    manager = checkpoint.make_manager(workdir, create=False, async_checkpointing=False)
    stored = checkpoint.load_config(manager, step)
    if objective_of(stored) != objective:
        raise ValueError(f"{workdir} holds a {objective_of(stored)!r} run; expected "
                         f"train.objective={objective!r}.")
    return stored


def _resolve(section, name, value):
    """Sets ``section[name]`` to ``value`` when 0; a different nonzero value is an error."""
    if section[name] and section[name] != value:
        raise ValueError(f"{name}={section[name]} in the config, but the stage files give "
                         f"{value}; leave it 0 to take theirs.")
    section[name] = value


def _eval_images(config):
    """``final_eval.num_images`` (0 = all) images and labels of ``final_eval.split``."""
    data_cfg = copy.deepcopy(config.data)
    data_cfg.split = config.final_eval.split
    num = config.final_eval.num_images or None
    return data.load_eval_images(data_cfg, num)


def _chunks(images, config):
    step = config.final_eval.batch_size
    return (images[i:i + step] for i in range(0, len(images), step))


def _clip_host_batch(config, workdir):
    return _caption_batch_fn(config, tokenizer_dir=os.path.join(workdir, TOKENIZER_SUBDIR))


def _latent_host_batch(config, workdir):
    del workdir  # the tokenizer is the CLIP stage's
    return _caption_batch_fn(
        config, tokenizer_dir=os.path.join(config.latent.clip_workdir, TOKENIZER_SUBDIR))


_DIFFUSION = Objective(("unet", "dit"), _diffusion_loss_fn, True, None, None, _diffusion_sample_fn)
_AUTOENCODER = Objective(("autoencoder_kl",), _autoencoder_loss_fn, False, None,
                         _evaluate_autoencoder, None)
_CLIP = Objective(("clip",), _clip_loss_fn, False, _clip_host_batch, _evaluate_clip, None)
_LATENT = Objective(("cond_unet",), _latent_loss_fn, True, _latent_host_batch, None,
                    _latent_sample_fn)
