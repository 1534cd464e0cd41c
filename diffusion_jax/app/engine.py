"""The loaded model behind the web app: what it can do, and one generation at a time.

An :class:`Engine` wraps either a text-to-image :class:`~diffusion_jax.pipelines.Pipeline`
(a Stable Diffusion directory, or a ``latent_diffusion`` workdir trained here) or a pixel-space
model of a training workdir (class-conditional or unconditional). A text-to-image workdir
trained here also names its CLIP stage (``config.latent.clip_workdir``), whose image tower
DiffusionCLIP needs: only such a model offers that task (a Stable Diffusion directory has no
CLIP image tower). Its network is wrapped in
:class:`~diffusion_jax.app.progress.ProgressModel`, so every run reports its steps, and the
same compiled programs serve every request: for text models the pipelines' own jitted program
(prompt, seed, guidance scale and ``eta`` are its arguments); for pixel models one
:func:`~diffusion_jax.generate.make_sample_fn` per batch size / sampler / static options,
kept in a cache.

    engine = load_engine(workdir="demo_t2i/t2i")
    images = engine.generate(Request(task="text_to_image", prompt="a coat", seed=3))
"""
from __future__ import annotations

import dataclasses
import os
import threading

import jax
import ml_collections
import numpy as np
from flax import nnx

from diffusion_jax import (captions, checkpoint, conditioning, denoisers, generate, image_io,
                           latent_generate, loading, metrics_clip, objectives, pipelines,
                           samplers, sharding, stage_pipeline)
from diffusion_jax.app import progress
from diffusion_jax.applications import diffusionclip, tasks

TEXT, PIXEL = tasks.TEXT, tasks.PIXEL
COMPARE = "compare"  # the sampler-comparison tab: every model has it
_TAB_OF = {(TEXT, "sample"): "text_to_image"}  # a text model's sample tab


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation: every setting that decides the images (stored in each PNG).

    Attributes:
        task: ``text_to_image``, ``img2img``, ``inpaint``, ``invert``, ``diffusionclip`` (text
            models) or ``sample`` (pixel).
        prompt, negative_prompt: text models (``invert``, ``diffusionclip``: ``prompt`` is the
            target text).
        source_prompt: ``invert`` / ``diffusionclip``: the text describing the input image.
        sampler: a name in :data:`~diffusion_jax.samplers.SAMPLERS`.
        sampler_options: extra :class:`~diffusion_jax.samplers.SamplerOptions` fields.
        steps: sampler steps (>= 1).
        guidance: guidance scale ``s``, Stable Diffusion's convention for every model (1 = no
            guidance; :mod:`diffusion_jax.denoisers`).
        eta: DDIM ``eta``.
        seed: PRNG seed of the batch.
        batch_size: images per run; image ``i`` of a batch depends on the batch size.
        height, width: pixels (text models; ``None``: the model's size).
        strength: img2img noise fraction in (0, 1].
        class_label: pixel class-conditional models (``None``: unconditional).
        t0, decode_steps, finetune_steps, learning_rate, id_weight: ``diffusionclip``'s
            inversion depth (fraction of T), DDIM steps of the differentiated decoding, Adam
            steps and rate, identity L1 weight (``steps``: its inversion steps).
    """
    task: str = "text_to_image"
    prompt: str = ""
    negative_prompt: str = ""
    source_prompt: str = ""
    sampler: str = "ddim"
    sampler_options: tuple[tuple[str, object], ...] = ()
    steps: int = 20
    guidance: float = 7.5
    eta: float = 0.0
    seed: int = 0
    batch_size: int = 1
    height: int | None = None
    width: int | None = None
    strength: float = 0.6
    class_label: int | None = None
    t0: float = 0.5
    decode_steps: int = 6
    finetune_steps: int = 10
    learning_rate: float = 1e-4
    id_weight: float = 0.3


class Engine:
    """A loaded model, its capabilities and a serialised :meth:`generate` (see module doc).

    Args:
        kind: :data:`TEXT` or :data:`PIXEL`.
        source: the checkpoint or workdir path (recorded in every PNG).
        pipe: the text pipeline (``kind == TEXT``).
        loaded: ``(graphdef, params, config, schedule)`` of a pixel model (``kind == PIXEL``).
        clip_workdir: the CLIP stage of a text model trained here (enables ``diffusionclip``;
            loaded with :func:`~diffusion_jax.metrics_clip.load_clip` on first use).
    """

    def __init__(self, kind: str, source: str, *, pipe: pipelines.Pipeline | None = None,
                 loaded: loading.Loaded | None = None, clip_workdir: str | None = None):
        self.kind, self.source = kind, os.path.abspath(source) if source else ""
        self.clip_workdir = clip_workdir or None
        self._clip = None
        self.counter = progress.StepCounter()
        self._lock = threading.Lock()
        self._seen: set = set()
        self._sample_fns: dict = {}
        if kind == TEXT:
            self.pipe = pipe._replace(unet=progress.ProgressModel(pipe.unet))
            self.config = None
        else:
            graphdef, params = nnx.split(progress.ProgressModel(loaded.model))
            self.loaded = loaded._replace(graphdef=graphdef, params=params)
            self.config = loaded.config

    # ----------------------------------------------------------------------- capabilities
    @property
    def tasks(self) -> tuple[str, ...]:
        """The tabs this model supports, from the task table
        (:data:`~diffusion_jax.applications.tasks.TASK_TABLE`), and ``compare``;
        ``diffusionclip`` only with a CLIP stage."""
        names = [_TAB_OF.get((self.kind, name), name)
                 for name in tasks.tasks_for(self.kind, "app")
                 if name != "diffusionclip" or self.clip_workdir]
        return tuple(names) + (COMPARE,)

    @property
    def num_timesteps(self) -> int:
        schedule = self.pipe.schedule if self.kind == TEXT else self.loaded.schedule
        return int(schedule.num_timesteps)

    @property
    def default_size(self) -> int:
        """Image height = width the model was made for, in pixels."""
        return self.pipe.sample_size if self.kind == TEXT else int(self.config.data.image_size)

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this (autoencoder x UNet factor); a pixel
        model has one fixed size."""
        if self.kind != TEXT:
            return self.default_size
        unet_levels = getattr(self.pipe.unet, "num_levels", 1)
        return pipelines.latent_factor(self.pipe.vae) * 2 ** (unet_levels - 1)

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional pixel model (0 otherwise)."""
        if self.kind == TEXT or not self.config.model.class_conditional:
            return 0
        return int(self.config.data.num_classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the classes, from the dataset where known, else ``"class i"``."""
        return class_names(self.config) if self.num_classes else ()

    @property
    def default_steps(self) -> int:
        return int(self.pipe.options.num_steps if self.kind == TEXT
                   else self.config.sample.num_steps)

    @property
    def default_guidance(self) -> float:
        """The guidance scale ``s`` the checkpoint samples with (its
        ``config.sample.guidance_scale``; 7.5 for a text-to-image pipeline)."""
        if self.config is None:
            return denoisers.LEGACY_TEXT_GUIDANCE
        return denoisers.default_guidance_scale(self.config)

    @property
    def default_sampler(self) -> str:
        return "ddim" if self.kind == TEXT else str(self.config.sample.sampler)

    def samplers_for(self, task: str) -> list[str]:
        """Registered samplers that can run ``task`` (img2img needs a part-way start,
        inpainting a per-step hook; inversion and DiffusionCLIP are DDIM); the flow samplers
        only for a flow-matching model."""
        is_flow = self.config is not None and self.config.diffusion.get("kind") == "flow"
        entries = [(n, e) for n, e in samplers.SAMPLERS.items() if is_flow or not e.flow]
        if task in ("invert", "diffusionclip"):
            return ["ddim"]
        if task == "img2img":
            return [n for n, e in entries if e.supports_t_start]
        if task == "inpaint":
            return [n for n, e in entries if e.supports_step_hook]
        return [n for n, _ in entries]

    # ----------------------------------------------------------------------- running
    def options(self, request: Request) -> samplers.SamplerOptions:
        """The run's sampler options: the model's defaults, ``steps``, ``eta`` and the
        request's extra options.

        Raises:
            ValueError: an unknown or invalid option (named).
        """
        fields = dict(request.sampler_options, num_steps=request.steps, eta=request.eta)
        if self.kind == TEXT:
            base = dataclasses.asdict(self.pipe.options)
            unknown = sorted(set(fields) - set(base))
            if unknown:
                raise ValueError(f"unknown sampler option(s) {unknown}; expected some of "
                                 f"{sorted(base)}.")
            return samplers.make_options(**{**base, **fields})
        return samplers.options_from_config(self.config, **fields)

    def evaluations(self, request: Request) -> int | None:
        """Network evaluations of the run (``None``: not known in advance, e.g. DiffusionCLIP,
        whose fine-tuning re-runs the network in its backward pass)."""
        total = samplers.num_evaluations(request.sampler, self.options(request),
                                         self.num_timesteps)
        if total is None or request.task == "diffusionclip":
            return None
        if request.task == "img2img":
            return max(1, int(round(total * request.strength)))
        if request.task == "invert":
            return 3 * total  # inversion, reconstruction, edit
        return total

    def is_compiled(self, request: Request) -> bool:
        """Whether a program for the request's static settings (task, sampler, static
        options, batch size, sizes) has already run: if not, the next run compiles."""
        return _static_key(request) in self._seen

    def generate(self, request: Request, image=None, mask=None) -> np.ndarray:
        """Runs the request; one at a time (concurrent calls wait).

        Args:
            request: :class:`Request`.
            image: ``[H, W, 3]`` uint8 input of img2img / inpaint / invert / diffusionclip.
            mask: ``[H, W]`` bool hole of inpaint (True = regenerate).

        Returns:
            ``[B, H, W, C]`` uint8 images; ``invert`` and ``diffusionclip``: ``[2B, H, W, C]``,
            the B reconstructions then the B edits.

        Raises:
            ValueError: bad settings (named); FloatingPointError: a non-finite image.
        """
        with self._lock, progress.counting(self.counter, self.evaluations(request)):
            out = self._run(request, image, mask)
            self._seen.add(_static_key(request))
            return out

    def _run(self, request, image, mask):
        key = jax.random.key(request.seed)
        if self.kind == PIXEL:
            return self._sample_pixels(request, key)
        pipe = self.pipe._replace(options=self.options(request))
        kwargs = dict(negative_prompts=request.negative_prompt, guidance_scale=request.guidance,
                      sampler=request.sampler, num_steps=request.steps, eta=request.eta)
        prompts = [request.prompt] * request.batch_size
        if request.task == "text_to_image":
            return pipelines.text_to_image(pipe, prompts, key, height=request.height,
                                           width=request.width, **kwargs)
        images = np.repeat(_to_float(image)[None], request.batch_size, axis=0)
        if request.task == "invert":
            return self._invert(request, images)
        if request.task == "diffusionclip":
            return self._diffusionclip(request, images)
        if request.task == "img2img":
            return pipelines.img2img(pipe, images, prompts, key, strength=request.strength,
                                     **kwargs)
        if request.task == "inpaint":
            hole = np.asarray(mask, np.float32)[..., None]
            return pipelines.inpaint(pipe, images, hole, prompts, key, **kwargs)
        raise ValueError(f"task {request.task!r} needs a pixel model; this is text-to-image.")

    def _invert(self, request, images):
        """DDIM inversion under the source prompt (no guidance), decoded by DDIM with uniform
        spacing from the same ``z_T``: under the source prompt without guidance (the
        reconstruction) and under the target prompt with the request's guidance (the edit)."""
        source = [request.source_prompt] * len(images)
        z_t = pipelines.invert(self.pipe, images, source, num_steps=request.steps)
        pipe = self.pipe._replace(ddim_timesteps=None)
        outputs = [pipelines.text_to_image(pipe, prompts, jax.random.key(request.seed),
                                           latents=z_t, num_steps=request.steps, sampler="ddim",
                                           eta=0.0, guidance_scale=scale)
                   for prompts, scale in ((source, 1.0),
                                          ([request.prompt] * len(images), request.guidance))]
        return np.concatenate(outputs)

    def _diffusionclip(self, request, images):
        """:func:`~diffusion_jax.pipelines.diffusionclip` from the source to the target text.

        It runs the plain UNet, without the progress tick: its count would mix forward,
        rematerialised and backward evaluations, and a program with a host callback is never
        stored in JAX's persistent compilation cache, which this task (traced anew per call)
        can otherwise reuse."""
        out = pipelines.diffusionclip(
            self.pipe._replace(unet=self.pipe.unet.model), images, self.clip(),
            request.source_prompt, request.prompt,
            t0=request.t0, num_inversion_steps=request.steps,
            num_decode_steps=request.decode_steps, finetune_steps=request.finetune_steps,
            learning_rate=request.learning_rate, id_weight=request.id_weight)
        samplers.check_finite(np.asarray(out["output"]), "ddim")
        return image_io.to_uint8(np.concatenate([out["reconstruction"], out["output"]]))

    def clip(self):
        """``(CLIPModel, tokenizer)`` of the CLIP stage (loaded once).

        Raises:
            ValueError: the model has no CLIP stage; FileNotFoundError: it is gone.
        """
        if self.clip_workdir is None:
            raise ValueError("DiffusionCLIP needs a CLIP image tower: serve a text-to-image "
                             "workdir trained here whose config names latent.clip_workdir.")
        if self._clip is None:
            self._clip = metrics_clip.load_clip(self.clip_workdir)
        return self._clip

    def edit_scores(self, request: Request, images, edited) -> dict[str, float]:
        """CLIP scores of an edit (:func:`~diffusion_jax.applications.diffusionclip.edit_scores`,
        averaged over the batch) of uint8 ``images`` -> ``edited`` ``[B, H, W, 3]``."""
        with self._lock:
            scores = diffusionclip.edit_scores(*self.clip(), _to_float(images),
                                               _to_float(edited), request.source_prompt,
                                               request.prompt)
        return {name: float(np.mean(value)) for name, value in scores.items()}

    def _sample_pixels(self, request, key):
        if request.task != "sample":
            raise ValueError(f"task {request.task!r} needs a text-to-image model.")
        options = self.options(request)
        static = (request.batch_size, request.sampler,
                  dataclasses.replace(options, eta=0.0))
        if static not in self._sample_fns:
            mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)),
                                      jax.devices()[:1])
            self._sample_fns[static] = generate.make_sample_fn(
                self.loaded.graphdef, self.loaded.schedule, self.config, mesh,
                num_samples=request.batch_size, sampler=request.sampler, options=options)
        cond, scale = None, None
        if self.num_classes:
            if request.class_label is None:
                raise ValueError("this model is class-conditional: pick a class.")
            cond = conditioning.class_condition(request.class_label, request.batch_size)
            scale = float(request.guidance)
        images = self._sample_fns[static](self.loaded.params, key, cond, guidance_scale=scale,
                                          eta=request.eta)
        return image_io.to_uint8(images)

    def compile_count(self) -> int:
        """Programs compiled so far (the text pipelines' jit cache, or pixel sample fns)."""
        if self.kind == TEXT:
            return latent_generate.program._cache_size()  # pylint: disable=protected-access
        return len(self._sample_fns)


def load_engine(*, checkpoint_dir: str | None = None, workdir: str | None = None,
                step: int | None = None) -> Engine:
    """An :class:`Engine` from exactly one of a Stable Diffusion directory and a workdir.

    Raises:
        ValueError: neither or both given; a workdir whose model the app cannot serve.
        FileNotFoundError: the path, ``model_index.json`` or the checkpoint is missing.
    """
    if (checkpoint_dir is None) == (workdir is None):
        raise ValueError("pass exactly one of --checkpoint and --workdir.")
    if checkpoint_dir is not None:
        if not os.path.isfile(os.path.join(checkpoint_dir, "model_index.json")):
            raise FileNotFoundError(f"--checkpoint={checkpoint_dir} has no model_index.json: "
                                    "expected a Stable Diffusion directory (diffusers layout "
                                    "or converted by diffusion_jax.convert.pipeline).")
        return Engine(TEXT, checkpoint_dir, pipe=pipelines.load(checkpoint_dir))
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir={workdir} does not exist.")
    manager = checkpoint.make_manager(workdir, create=False, async_checkpointing=False)
    config = checkpoint.load_config(manager, step)
    if objectives.objective_of(config) == "latent_diffusion":
        pipe, config = stage_pipeline.load_pipeline_and_config(workdir, step=step)
        return Engine(TEXT, workdir, pipe=pipe, clip_workdir=config.latent.get("clip_workdir"))
    if config.model.cond_image_channels > 0:
        raise ValueError(f"{workdir} holds a super-resolution model; the app serves "
                         "text-to-image and class / unconditional models.")
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)),
                              jax.devices()[:1])
    return Engine(PIXEL, workdir, loaded=loading.load(workdir=workdir, step=step, mesh=mesh))


def class_names(config) -> tuple[str, ...]:
    """Class names of ``config``'s dataset: digits 0-9, Fashion-MNIST's, else ``class i``."""
    n = int(config.data.num_classes)
    data = config.data
    if data.source == "digits":
        return tuple(str(i) for i in range(n))
    if "fashion" in str(data.get("name", "")) + str(data.get("folder", "")) and n == 10:
        return captions.FASHION_MNIST_CLASSES
    return tuple(f"class {i}" for i in range(n))


def _static_key(request: Request):
    """The settings that select a compiled program (everything but the traced ones)."""
    traced = ("prompt", "negative_prompt", "source_prompt", "seed", "guidance", "eta",
              "class_label")
    fields = dataclasses.asdict(request)
    return tuple(sorted((k, repr(v)) for k, v in fields.items() if k not in traced))


def _to_float(image) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> float32 in [-1, 1]."""
    return np.asarray(image, np.float32) / 127.5 - 1.0
