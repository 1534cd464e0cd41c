"""What each button of the web app does, as plain functions testable without a browser.

Every handler takes the values of the page's controls, checks them (an :class:`InputError`
names the control and what it expects), builds an :class:`~diffusion_jax.app.engine.Request`,
runs it while reporting progress, and writes each image as a PNG with its parameters
(:mod:`diffusion_jax.app.metadata`). They return gallery items ``(path, caption)`` and a
short Markdown note; the page (:mod:`diffusion_jax.app.ui`) turns errors into messages.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import secrets
import time
import uuid
from typing import Callable

import numpy as np

from diffusion_jax import denoisers, samplers
from diffusion_jax.app import metadata
from diffusion_jax.app.engine import TEXT, Engine, Request

MAX_STEPS = 1000
# Sampler options the text box refuses, and why.
RESERVED_OPTIONS = {"num_steps": "use Steps", "eta": "use the eta slider",
                    "pred_type": "the checkpoint decides what its model predicts",
                    "timesteps": "the checkpoint's scheduler decides them"}
MAX_SEED = 2 ** 31 - 1
# report(counter, compiling): called a few times a second while a chain runs.
Reporter = Callable[[object, bool], None]


class InputError(ValueError):
    """A control of the page holds a value the model cannot run (message names it)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The controls shared by every generating tab (raw values from the page)."""
    sampler: str = "ddim"
    options_text: str = ""
    steps: float = 20
    guidance: float = 7.5
    eta: float = 0.0
    seed: float = 0
    random_seed: bool = False
    batch_size: float = 1


@dataclasses.dataclass(frozen=True)
class CLIPEdit:
    """The DiffusionCLIP controls (raw values from the page); see
    :func:`~diffusion_jax.applications.diffusionclip.diffusionclip_edit`."""
    t0: float = 0.5
    inversion_steps: float = 20
    decode_steps: float = 6
    finetune_steps: float = 10
    learning_rate: float = 1e-4
    id_weight: float = 0.3


def text_to_image(engine: Engine, out_dir: str, prompt: str, negative_prompt: str,
                  settings: Settings, height, width, report: Reporter | None = None):
    """Text-to-image. Returns ``(items, note)`` (see the module docstring)."""
    request = _request(engine, settings, "text_to_image", prompt=_prompt(prompt),
                       negative_prompt=negative_prompt or "",
                       height=_size(engine, "height", height), width=_size(engine, "width",
                                                                           width))
    return _generate(engine, out_dir, request, report)


def image_to_image(engine: Engine, out_dir: str, image, prompt: str, negative_prompt: str,
                   strength: float, settings: Settings, report: Reporter | None = None):
    """SDEdit / img2img of an uploaded ``image [H, W, 3]`` uint8. Returns ``(items, note)``."""
    image = _input_image(engine, image)
    if not 0.0 < float(strength) <= 1.0:
        raise InputError(f"Strength must lie in (0, 1], got {strength}.")
    request = _request(engine, settings, "img2img", prompt=_prompt(prompt),
                       negative_prompt=negative_prompt or "", strength=float(strength),
                       height=image.shape[0], width=image.shape[1])
    return _generate(engine, out_dir, request, report, image=image)


def inpaint(engine: Engine, out_dir: str, editor: dict | None, mask_upload, prompt: str,
            negative_prompt: str, settings: Settings, report: Reporter | None = None):
    """Inpainting of the editor's background where the brush painted (or where an uploaded
    mask is white). Returns ``(items, note)``.

    Args:
        editor: the image editor's value ``{"background", "layers", "composite"}`` (numpy).
        mask_upload: optional ``[H, W(, C)]`` mask image (white = regenerate), used instead
            of the brush strokes.
    """
    editor = editor or {}
    image = _input_image(engine, editor.get("background"))
    mask = mask_from_upload(mask_upload) if mask_upload is not None \
        else mask_from_layers(editor.get("layers") or [], image.shape[:2])
    if mask.shape != image.shape[:2]:
        raise InputError(f"The mask is {mask.shape[1]}x{mask.shape[0]} pixels but the image is "
                         f"{image.shape[1]}x{image.shape[0]}: they must be the same size.")
    if not mask.any():
        raise InputError("The mask is empty: paint over the region to regenerate.")
    request = _request(engine, settings, "inpaint", prompt=_prompt(prompt),
                       negative_prompt=negative_prompt or "", height=image.shape[0],
                       width=image.shape[1])
    return _generate(engine, out_dir, request, report, image=image, mask=mask)


def invert_edit(engine: Engine, out_dir: str, image, source_prompt: str, target_prompt: str,
                settings: Settings, report: Reporter | None = None):
    """DDIM inversion -> edit of an uploaded ``image [H, W, 3]`` uint8: its ``z_T`` under the
    source prompt, decoded by DDIM under the source prompt without guidance (the
    reconstruction) and under the target prompt with the guidance scale (the edit).

    Returns:
        ``(items, note)``: the reconstruction, then the edit. The reconstruction's PNG stores
        ``prompt = source_prompt`` and guidance 1 (the settings that reproduce it).
    """
    image = _input_image(engine, image)
    source = _text(source_prompt, "The source prompt is empty: describe the uploaded image.")
    target = _text(target_prompt, "The target prompt is empty: describe the edited image "
                                  "(the source prompt again reconstructs the input).")
    settings = dataclasses.replace(settings, sampler="ddim", options_text="", eta=0.0,
                                   random_seed=False, batch_size=1)
    request = _request(engine, settings, "invert", prompt=target, source_prompt=source,
                       height=image.shape[0], width=image.shape[1])
    images = _run(engine, request, report, image)
    reconstruction = dataclasses.replace(request, prompt=source, guidance=1.0)
    items = (_write(engine, out_dir, reconstruction, images[:1], "reconstruction (source prompt)")
             + _write(engine, out_dir, request, images[1:], f"edit: {target}"))
    note = (f"DDIM inversion, {request.steps} steps · reconstruction without guidance · edit "
            f"with guidance {request.guidance:g} · {images.shape[2]}x{images.shape[1]} px")
    return items, note


def diffusionclip(engine: Engine, out_dir: str, image, source_text: str, target_text: str,
                  edit: CLIPEdit, report: Reporter | None = None):
    """DiffusionCLIP of an uploaded ``image [H, W, 3]`` uint8 from ``source_text`` toward
    ``target_text``: the UNet is fine-tuned so that the CLIP image direction follows the text
    direction (:func:`~diffusion_jax.pipelines.diffusionclip`).

    Returns:
        ``(items, note)``: the reconstruction (original UNet) and the edit, and a note with the
        edit's CLIP scores (directional similarity, identity L1, target score before / after).
    """
    if "diffusionclip" not in engine.tasks:
        raise InputError("DiffusionCLIP needs a text-to-image workdir trained here whose "
                         "config names a CLIP stage (latent.clip_workdir).")
    image = _input_image(engine, image)
    source = _text(source_text, "The source text is empty: describe the uploaded image.")
    target = _text(target_text, "The target text is empty: describe the edit.")
    t0 = float(edit.t0)
    if not 0.0 < t0 <= 1.0:
        raise InputError(f"t0 (inversion depth) must lie in (0, 1], got {edit.t0}.")
    learning_rate, id_weight = float(edit.learning_rate), float(edit.id_weight)
    if not np.isfinite(learning_rate) or learning_rate <= 0:
        raise InputError(f"Learning rate must be > 0, got {edit.learning_rate}.")
    if not np.isfinite(id_weight) or id_weight < 0:
        raise InputError(f"Identity weight must be >= 0, got {edit.id_weight}.")
    settings = Settings(steps=edit.inversion_steps, guidance=1.0)
    request = _request(engine, settings, "diffusionclip", prompt=target, source_prompt=source,
                       height=image.shape[0], width=image.shape[1], t0=t0,
                       decode_steps=_integer("Decode steps", edit.decode_steps, 1, MAX_STEPS),
                       finetune_steps=_integer("Fine-tuning steps", edit.finetune_steps, 1,
                                               MAX_STEPS),
                       learning_rate=learning_rate, id_weight=id_weight)
    images = _run(engine, request, report, image)
    scores = engine.edit_scores(request, image[None], images[1:])
    items = (_write(engine, out_dir, request, images[:1], "reconstruction (original UNet)")
             + _write(engine, out_dir, request, images[1:], f"edit: {source} → {target}"))
    note = ("| directional | identity L1 | target score: input | edit |\n|---|---|---|---|\n"
            f"| {scores['directional']:.4f} | {scores['identity_l1']:.4f} | "
            f"{scores['target_score_input']:.2f} | {scores['target_score_output']:.2f} |")
    return items, note


def sample(engine: Engine, out_dir: str, class_name: str | None, settings: Settings,
           report: Reporter | None = None):
    """Class-conditional or unconditional sampling of a pixel model. Returns ``(items, note)``."""
    request = _request(engine, settings, "sample", class_label=_class_label(engine, class_name))
    return _generate(engine, out_dir, request, report)


def compare(engine: Engine, out_dir: str, prompt: str, class_name: str | None,
            settings: Settings, runs, report: Reporter | None = None):
    """The same seed and prompt (or class) through 2-4 samplers, one image each.

    Args:
        runs: ``[(sampler or None, steps), ...]``; rows without a sampler are skipped.

    Returns:
        ``(items, note)``: one image per run captioned with its NFE and wall time, and a
        Markdown table of them.
    """
    chosen = [(name, steps) for name, steps in runs if name]
    if not 2 <= len(chosen) <= 4:
        raise InputError(f"Choose 2 to 4 samplers to compare, got {len(chosen)}.")
    settings = dataclasses.replace(settings, batch_size=1)
    if engine.kind == TEXT:
        base = dict(task="text_to_image", prompt=_prompt(prompt))
    else:
        base = dict(task="sample", class_label=_class_label(engine, class_name))
    requests = [_request(engine, dataclasses.replace(settings, sampler=name, steps=steps),
                         compared=[n for n, _ in chosen], **base) for name, steps in chosen]
    if settings.random_seed:  # one seed for every run
        requests = [dataclasses.replace(r, seed=requests[0].seed) for r in requests]
    items, rows = [], ["| sampler | steps | NFE | wall time |", "|---|---|---|---|"]
    for request in requests:
        compiling = not engine.is_compiled(request)
        start = time.perf_counter()
        images = _run(engine, request, report)
        wall = time.perf_counter() - start
        nfe = engine.evaluations(request)
        note = " (incl. compile)" if compiling else ""
        caption = f"{request.sampler} · {request.steps} steps · NFE {nfe} · {wall:.2f} s{note}"
        items += _write(engine, out_dir, request, images, caption)
        rows.append(f"| {request.sampler} | {request.steps} | {nfe} | {wall:.2f} s{note} |")
    return items, f"Seed {requests[0].seed}.\n\n" + "\n".join(rows)


def read_parameters(path: str | None) -> dict:
    """The settings stored in a PNG made by the app, as control values.

    Returns:
        The :class:`Request` fields plus ``options_text`` (``name=value, ...``) and
        ``checkpoint``.

    Raises:
        InputError: no file, not a PNG, or no parameters of this app in it.
    """
    if not path:
        raise InputError("Select an image in the gallery or upload a PNG made by this app.")
    try:
        params = metadata.read_params(path)
    except (ValueError, FileNotFoundError) as err:
        raise InputError(str(err)) from None
    options = params.get("sampler_options") or {}
    params["options_text"] = ", ".join(
        f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in options.items())
    return params


def sampler_help(name: str) -> str:
    """One line naming the options the sampler ``name`` reads, as its registry entry declares
    them (for the page; ``num_steps`` is the steps box, ``pred_type`` the model's)."""
    entry = samplers.SAMPLERS.get(name)
    fields = [] if entry is None or entry.options is None else [
        f for f in dataclasses.fields(entry.options) if f.name != "num_steps"]
    if not fields:
        return f"`{name}`: no options besides steps."
    shown = ", ".join(f"{f.name}={f.default}" for f in fields)
    return f"`{name}` options (name=value, comma-separated; defaults): {shown}"


def mask_from_layers(layers, shape) -> np.ndarray:
    """``[H, W]`` bool hole: any pixel a brush layer painted (alpha > 0).

    Args:
        layers: the editor's layers, each ``[H, W, 4]`` RGBA (or ``[H, W, 3]``: non-black).
        shape: ``(H, W)`` of the image (the result when there are no layers).
    """
    mask = np.zeros(shape, bool)
    for layer in layers:
        layer = np.asarray(layer)
        painted = layer[..., 3] > 0 if layer.shape[-1] == 4 else layer.max(axis=-1) > 0
        if painted.shape != mask.shape:
            return painted  # the caller reports the size mismatch
        mask |= painted
    return mask


def mask_from_upload(upload) -> np.ndarray:
    """``[H, W]`` bool hole from an uploaded mask image: white (> 127) = regenerate."""
    upload = np.asarray(upload)
    if upload.ndim == 3:
        upload = upload[..., :3].mean(axis=-1)
    return upload > 127


def _generate(engine, out_dir, request, report, image=None, mask=None):
    """Runs ``request`` and writes its PNGs; returns ``(items, note)``."""
    images = _run(engine, request, report, image, mask)
    items = _write(engine, out_dir, request, images, None)
    note = (f"Seed {request.seed} · {request.sampler} · {request.steps} steps · "
            f"{images.shape[2]}x{images.shape[1]} px")
    return items, note


def _run(engine, request, report, image=None, mask=None) -> np.ndarray:
    """``engine.generate`` in a worker thread, calling ``report`` while it runs; settings
    errors become :class:`InputError`."""
    compiling = not engine.is_compiled(request)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(engine.generate, request, image, mask)
        while True:
            try:
                return future.result(timeout=0.1)
            except concurrent.futures.TimeoutError:
                if report is not None:
                    report(engine.counter, compiling)
            except ValueError as err:
                raise InputError(str(err)) from None


def _write(engine, out_dir, request, images, caption):
    """Saves each image as a PNG with the request's parameters; returns gallery items."""
    os.makedirs(out_dir, exist_ok=True)
    params = dataclasses.asdict(request)
    params["sampler_options"] = dict(request.sampler_options)
    params["checkpoint"] = engine.source
    items = []
    for i, image in enumerate(images):
        path = os.path.join(out_dir, f"{request.task}_{request.seed}_{i}_"
                                     f"{uuid.uuid4().hex[:8]}.png")
        metadata.save_png(path, image, {**params, "index": i})
        items.append((path, caption or f"seed {request.seed} · image {i + 1}"))
    return items


def _request(engine, settings, task, compared=None, **fields) -> Request:
    """A checked :class:`Request` from the shared controls and the tab's own fields.

    A sampler option the sampler does not read is refused; when ``compared`` samplers share the
    options box, each takes the options it reads and an option none of them reads is refused.
    """
    if settings.sampler not in engine.samplers_for(task):
        raise InputError(f"Sampler {settings.sampler!r} cannot run {task}; choose one of "
                         f"{engine.samplers_for(task)}.")
    steps = _integer("Steps", settings.steps, 1, MAX_STEPS)
    batch = _integer("Batch size", settings.batch_size, 1, 16)
    seed = secrets.randbelow(MAX_SEED + 1) if settings.random_seed \
        else _integer("Seed", settings.seed, 0, MAX_SEED)
    guidance = float(settings.guidance)
    try:
        denoisers.check_guidance_scale(guidance, "Guidance scale")
    except ValueError as err:
        raise InputError(str(err)) from None
    options = _sampler_options(settings.options_text)
    try:
        if compared:  # one box for the compared samplers: each takes the options it reads
            samplers.check_options(settings.sampler, [k for k in options if not any(
                k in samplers.SAMPLERS[name].fields for name in compared)])
            options = {k: v for k, v in options.items()
                       if k in samplers.SAMPLERS[settings.sampler].fields}
        samplers.check_options(settings.sampler, options)  # another sampler's: refused
    except ValueError as err:
        raise InputError(f"Sampler options: {err}") from None
    request = Request(task=task, sampler=settings.sampler, steps=steps, guidance=guidance,
                      eta=float(settings.eta), seed=seed, batch_size=batch,
                      sampler_options=tuple(sorted(options.items())), **fields)
    try:
        engine.evaluations(request)  # validates every sampler option
    except ValueError as err:
        raise InputError(f"Sampler options: {err}") from None
    return request


def _sampler_options(text) -> dict:
    """``"churn=10, clip_x0=-1,1"`` -> ``{"churn": 10.0, "clip_x0": (-1.0, 1.0)}``: items are
    separated by newlines or by commas that start a new ``name=``.

    Raises:
        InputError: an unparsable item, or a setting with its own control or fixed by the
            checkpoint (:data:`RESERVED_OPTIONS`).
    """
    items = [item.strip() for item in re.split(r"\n|,\s*(?=[A-Za-z_]\w*\s*=)", text or "")]
    try:
        options = samplers.parse_options([item.replace(" ", "") for item in items if item])
    except ValueError as err:
        raise InputError(f"Sampler options: {err}") from None
    reserved = sorted(set(options) & set(RESERVED_OPTIONS))
    if reserved:
        raise InputError(f"Sampler options: {reserved} cannot be set here "
                         f"({'; '.join(RESERVED_OPTIONS[name] for name in reserved)}).")
    return options


def _integer(name, value, low, high) -> int:
    if value is None or not float(value).is_integer() or not low <= value <= high:
        raise InputError(f"{name} must be a whole number in [{low}, {high}], got {value}.")
    return int(value)


def _prompt(prompt) -> str:
    return _text(prompt, "The prompt is empty: describe the image to generate.")


def _text(value, message) -> str:
    """``value`` unless it is empty or blank (then :class:`InputError` with ``message``)."""
    if not value or not value.strip():
        raise InputError(message)
    return value


def _size(engine, name, value) -> int:
    value = engine.default_size if value in (None, "") else value
    multiple = engine.size_multiple
    if not float(value).is_integer() or value < multiple or value % multiple:
        raise InputError(f"{name.capitalize()} {value} is not a multiple of {multiple} (the "
                         f"autoencoder's and UNet's downsampling); try "
                         f"{max(multiple, int(value) // multiple * multiple)}.")
    return int(value)


def _input_image(engine, image) -> np.ndarray:
    """The uploaded image as uint8 ``[H, W, 3]`` of allowed sizes."""
    if image is None:
        raise InputError("Upload an image first.")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.dtype != np.uint8:
        raise InputError(f"The upload is not an RGB image (array of shape {image.shape}).")
    for name, value in (("height", image.shape[0]), ("width", image.shape[1])):
        if value % engine.size_multiple:
            raise InputError(f"The image {name} {value} is not a multiple of "
                             f"{engine.size_multiple}; crop or resize it.")
    return image[..., :3]


def _class_label(engine, class_name) -> int | None:
    if not engine.num_classes:
        return None
    if class_name not in engine.class_names:
        raise InputError(f"Pick a class: one of {list(engine.class_names)}.")
    return engine.class_names.index(class_name)
