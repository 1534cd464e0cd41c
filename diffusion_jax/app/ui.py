"""The Gradio page: one tab per task the loaded model supports, wired to :mod:`.handlers`.

Tabs: *Text to image*, *Image to image*, *Inpainting*, *Inversion edit* (text-to-image
models), *DiffusionCLIP* (text-to-image workdirs with a CLIP stage), *Class sampling* or
*Unconditional sampling* (pixel models) and *Compare samplers* (both). Every
generating button runs through one queue (``concurrency_id="device"``, limit 1), so the
device runs one chain at a time and concurrent sessions wait their turn. Errors in a handler
become a message in the page (``gr.Error``); the server keeps running.
"""
from __future__ import annotations

import dataclasses
import functools
import traceback

import gradio as gr

from diffusion_jax.app import handlers
from diffusion_jax.app.engine import TEXT, Engine

QUEUE = dict(concurrency_limit=1, concurrency_id="device")
# System fonts only: the default theme would ask Google Fonts for its typefaces.
THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"],
                   font_mono=["ui-monospace", "monospace"])
COMPARE_DEFAULTS = (("ddim", 20), ("dpm_solver_pp", 10), ("edm_heun", 10), (None, 10))


def theme() -> gr.themes.Base:
    """The page's theme, with system fonts (nothing fetched from the internet)."""
    return gr.themes.Default(**THEME_FONTS)


def build(engine: Engine, out_dir: str) -> gr.Blocks:
    """The page for ``engine``; generated PNGs are written under ``out_dir``."""
    with gr.Blocks(title="diffusion_jax", analytics_enabled=False) as demo:
        gr.Markdown(_header(engine))
        with gr.Tabs():
            if "text_to_image" in engine.tasks:
                with gr.Tab("Text to image", id="text_to_image"):
                    _text_to_image_tab(engine, out_dir)
            if "sample" in engine.tasks:
                title = "Class sampling" if engine.num_classes else "Unconditional sampling"
                with gr.Tab(title, id="sample"):
                    _sample_tab(engine, out_dir)
            if "img2img" in engine.tasks:
                with gr.Tab("Image to image", id="img2img"):
                    _img2img_tab(engine, out_dir)
            if "inpaint" in engine.tasks:
                with gr.Tab("Inpainting", id="inpaint"):
                    _inpaint_tab(engine, out_dir)
            if "invert" in engine.tasks:
                with gr.Tab("Inversion edit", id="invert"):
                    _invert_tab(engine, out_dir)
            if "diffusionclip" in engine.tasks:
                with gr.Tab("DiffusionCLIP", id="diffusionclip"):
                    _diffusionclip_tab(engine, out_dir)
            with gr.Tab("Compare samplers", id="compare"):
                _compare_tab(engine, out_dir)
    return demo


def _header(engine):
    kind = "text-to-image" if engine.kind == TEXT else (
        f"{engine.num_classes}-class" if engine.num_classes else "unconditional")
    size = engine.default_size
    sizes = (f"sizes: multiples of {engine.size_multiple} px" if engine.kind == TEXT
             else "fixed size")
    return (f"## diffusion_jax\n**Model:** {kind}, `{engine.source}` · default {size}x{size} px "
            f"({sizes}) · {engine.num_timesteps} training timesteps")


# ----------------------------------------------------------------------------- controls
@dataclasses.dataclass
class _Controls:
    """The shared settings of a tab, in :class:`handlers.Settings` order."""
    sampler: gr.Dropdown
    options_text: gr.Textbox
    steps: gr.Number
    guidance: gr.Slider
    eta: gr.Slider
    seed: gr.Number
    random_seed: gr.Checkbox
    batch_size: gr.Slider

    def inputs(self) -> list:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


def _controls(engine, task, *, batch=True, sampler=True, steps=True,
              noise=True) -> _Controls:
    """Sampler (with its options and a help line), steps, guidance, eta, seed, batch size;
    ``noise=False`` hides eta and the seed (a deterministic task)."""
    names = engine.samplers_for(task)
    default = engine.default_sampler if engine.default_sampler in names else names[0]
    with gr.Group():
        with gr.Row(visible=sampler or steps):
            pick = gr.Dropdown(names, value=default, label="Sampler", visible=sampler,
                               elem_id=f"{task}_sampler")
            count = gr.Number(engine.default_steps, label="Steps", precision=0, minimum=0,
                              visible=steps, elem_id=f"{task}_steps")
        options = gr.Textbox(label="Sampler options", placeholder="e.g. churn=10, order=3",
                             visible=sampler)
        hint = gr.Markdown(handlers.sampler_help(default), visible=sampler)
        pick.change(handlers.sampler_help, pick, hint, queue=False)
        with gr.Row():
            guidance = gr.Slider(0.0, 20.0, value=engine.default_guidance,
                                 step=0.1, label="Guidance scale (1 = none)",
                                 visible=engine.kind == TEXT or engine.num_classes > 0,
                                 elem_id=f"{task}_guidance")
            eta = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="eta (DDIM noise)",
                            visible=noise)
        with gr.Row(visible=noise):
            seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id=f"{task}_seed")
            random_seed = gr.Checkbox(False, label="Random seed")
            batch_size = gr.Slider(1, 4, value=1, step=1, label="Batch size", visible=batch)
    return _Controls(pick, options, count, guidance, eta, seed, random_seed, batch_size)


def _settings(values) -> handlers.Settings:
    return handlers.Settings(*values)


def _outputs(task):
    """Gallery (PNG, downloadable), note, and the state holding the shown files."""
    gallery = gr.Gallery(label="Images", columns=4, format="png", buttons=["download"],
                         type="filepath", elem_id=f"{task}_gallery")
    note = gr.Markdown(elem_id=f"{task}_note")
    paths = gr.State([])
    return gallery, note, paths


def _reporter(progress):
    """A :data:`handlers.Reporter` that drives Gradio's progress bar."""

    def report(counter, compiling):
        if counter.count == 0 and compiling:
            progress(0.0, desc="compiling… (first run with these settings)")
        elif counter.total:
            progress((min(counter.count, counter.total), counter.total),
                     desc=f"step {min(counter.count, counter.total)}/{counter.total}",
                     unit="steps")
        elif counter.count:
            progress((counter.count, None), desc=f"{counter.count} network evaluations")
        else:  # DiffusionCLIP: the fine-tuning reports no steps
            progress(None, desc="running… (this task reports no steps)")

    return report


def _guarded(fn):
    """Runs a handler; a bad input or a failed generation becomes a message in the page."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except handlers.InputError as err:
            raise gr.Error(str(err), title="Check the input", print_exception=False) from None
        except (ValueError, FileNotFoundError, FloatingPointError) as err:
            raise gr.Error(f"{type(err).__name__}: {err}", title="Generation failed") from None
        except Exception as err:  # pylint: disable=broad-except
            traceback.print_exc()
            raise gr.Error(f"Internal error ({type(err).__name__}: {err}); the server is still "
                           "running.", title="Generation failed") from None

    return run


def _show(result):
    """``(items, note)`` -> gallery value, note and the paths state."""
    items, note = result
    return items, note, [path for path, _ in items]


def _reuse_row(engine, task, paths, gallery, outputs, to_values):
    """The *reuse parameters* controls: from the selected gallery image or an uploaded PNG.

    ``to_values(params)`` maps the stored parameters to new values of ``outputs``.
    """
    selected = gr.State(None)
    gallery.select(_selected_path, [paths], selected, queue=False)
    with gr.Row():
        reuse = gr.Button("Reuse parameters of the selected image", size="sm",
                          elem_id=f"{task}_reuse")
        upload = gr.File(label="…or drop a PNG made here", height=90,
                         elem_id=f"{task}_reuse_file")

    def restore(path):
        return _restore(engine, path, to_values, len(outputs))

    # Queued (so an error shows as a message) but never behind a generation.
    reuse.click(restore, selected, outputs, concurrency_limit=None)
    upload.upload(restore, upload, outputs, concurrency_limit=None)


def _selected_path(files, evt: gr.SelectData):
    return files[evt.index] if 0 <= evt.index < len(files) else None


def _restore(engine, path, to_values, num_outputs):
    """New control values from the PNG at ``path``; a file without parameters leaves the
    controls as they are and says why (a warning, not an error on every control)."""
    try:
        params = handlers.read_parameters(path)
    except handlers.InputError as err:
        gr.Warning(str(err))
        return [gr.skip()] * num_outputs
    if params.get("checkpoint") and params["checkpoint"] != engine.source:
        gr.Warning(f"This image was made with {params['checkpoint']}; the app serves "
                   f"{engine.source}: the same settings may give another image.")
    return to_values(params)


def _settings_values(params):
    """Stored parameters -> values of a :class:`_Controls` (seed fixed, not random)."""
    return [params.get("sampler", "ddim"), params.get("options_text", ""),
            params.get("steps", 20), params.get("guidance", 7.5), params.get("eta", 0.0),
            params.get("seed", 0), False, params.get("batch_size", 1)]


# ----------------------------------------------------------------------------- tabs
def _prompts(task):
    """Prompt and negative prompt of a tab."""
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id=f"{task}_prompt")
    negative = gr.Textbox(label="Negative prompt", elem_id=f"{task}_negative")
    return prompt, negative


def _generate_button(task, text="Generate"):
    return gr.Button(text, variant="primary", elem_id=f"{task}_generate")


def _text_to_image_tab(engine, out_dir):
    task = "text_to_image"
    with gr.Row():
        with gr.Column(scale=2):
            prompt, negative = _prompts(task)
            with gr.Row():
                height = gr.Number(engine.default_size, label="Height", precision=0,
                                   step=engine.size_multiple, elem_id=f"{task}_height")
                width = gr.Number(engine.default_size, label="Width", precision=0,
                                  step=engine.size_multiple, elem_id=f"{task}_width")
            controls = _controls(engine, task)
            button = _generate_button(task)
        with gr.Column(scale=3):
            gallery, note, paths = _outputs(task)
            fields = [prompt, negative, height, width] + controls.inputs()
            _reuse_row(engine, task, paths, gallery, fields, lambda p: [
                p.get("prompt", ""), p.get("negative_prompt", ""),
                p.get("height") or engine.default_size, p.get("width") or engine.default_size,
                *_settings_values(p)])

    def run(prompt_, negative_, height_, width_, *values, progress=gr.Progress()):
        return _show(handlers.text_to_image(engine, out_dir, prompt_, negative_,
                                            _settings(values), height_, width_,
                                            _reporter(progress)))

    button.click(_guarded(run), fields, [gallery, note, paths], **QUEUE)


def _sample_tab(engine, out_dir):
    task = "sample"
    names = list(engine.class_names)

    def values(p):
        index = p.get("class_label")
        name = names[index] if index is not None and index < len(names) else None
        return [name, *_settings_values(p)]

    with gr.Row():
        with gr.Column(scale=2):
            label = gr.Dropdown(names, value=names[0] if names else None, label="Class",
                                visible=bool(names), elem_id=f"{task}_class")
            controls = _controls(engine, task)
            button = _generate_button(task)
        with gr.Column(scale=3):
            gallery, note, paths = _outputs(task)
            fields = [label] + controls.inputs()
            _reuse_row(engine, task, paths, gallery, fields, values)

    def run(label_, *values_, progress=gr.Progress()):
        return _show(handlers.sample(engine, out_dir, label_, _settings(values_),
                                     _reporter(progress)))

    button.click(_guarded(run), fields, [gallery, note, paths], **QUEUE)


def _img2img_tab(engine, out_dir):
    task = "img2img"
    with gr.Row():
        with gr.Column(scale=2):
            image = gr.Image(label="Input image", type="numpy", image_mode="RGB",
                             sources=["upload", "clipboard"], format="png",
                             elem_id=f"{task}_image")
            prompt, negative = _prompts(task)
            strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05,
                                 label="Strength (noise fraction; 1 = ignore the image)",
                                 elem_id=f"{task}_strength")
            controls = _controls(engine, task)
            button = _generate_button(task)
        with gr.Column(scale=3):
            gallery, note, paths = _outputs(task)

    def run(image_, prompt_, negative_, strength_, *values, progress=gr.Progress()):
        return _show(handlers.image_to_image(engine, out_dir, image_, prompt_, negative_,
                                             strength_, _settings(values),
                                             _reporter(progress)))

    button.click(_guarded(run), [image, prompt, negative, strength] + controls.inputs(),
                 [gallery, note, paths], **QUEUE)


def _inpaint_tab(engine, out_dir):
    task = "inpaint"
    with gr.Row():
        with gr.Column(scale=2):
            editor = gr.ImageEditor(
                label="Image: paint the region to regenerate", type="numpy",
                image_mode="RGBA", sources=["upload", "clipboard"], format="png",
                brush=gr.Brush(colors=["#ff00ff"], default_size=8, color_mode="fixed"),
                transforms=(), layers=False, elem_id=f"{task}_editor")
            mask = gr.Image(label="Mask (optional instead of the brush; white = regenerate)",
                            type="numpy", image_mode="L", sources=["upload"], format="png",
                            elem_id=f"{task}_mask")
            prompt, negative = _prompts(task)
            controls = _controls(engine, task)
            button = _generate_button(task)
        with gr.Column(scale=3):
            gallery, note, paths = _outputs(task)

    def run(editor_, mask_, prompt_, negative_, *values, progress=gr.Progress()):
        return _show(handlers.inpaint(engine, out_dir, editor_, mask_, prompt_, negative_,
                                      _settings(values), _reporter(progress)))

    button.click(_guarded(run), [editor, mask, prompt, negative] + controls.inputs(),
                 [gallery, note, paths], **QUEUE)


def _edit_inputs(task, source_label, target_label):
    """Input image, source text and target text of an editing tab."""
    image = gr.Image(label="Input image", type="numpy", image_mode="RGB",
                     sources=["upload", "clipboard"], format="png", elem_id=f"{task}_image")
    source = gr.Textbox(label=source_label, elem_id=f"{task}_source")
    target = gr.Textbox(label=target_label, elem_id=f"{task}_prompt")
    return image, source, target


def _invert_tab(engine, out_dir):
    task = "invert"
    with gr.Row():
        with gr.Column(scale=2):
            image, source, target = _edit_inputs(
                task, "Source prompt (describes the image)",
                "Target prompt (the edit; the source prompt again reconstructs the image)")
            controls = _controls(engine, task, batch=False, sampler=False, noise=False)
            button = _generate_button(task, "Invert and edit")
        with gr.Column(scale=3):
            gallery, note, paths = _outputs(task)

    def run(image_, source_, target_, *values, progress=gr.Progress()):
        return _show(handlers.invert_edit(engine, out_dir, image_, source_, target_,
                                          _settings(values), _reporter(progress)))

    button.click(_guarded(run), [image, source, target] + controls.inputs(),
                 [gallery, note, paths], **QUEUE)


def _diffusionclip_tab(engine, out_dir):
    task = "diffusionclip"
    defaults = handlers.CLIPEdit()
    with gr.Row():
        with gr.Column(scale=2):
            image, source, target = _edit_inputs(task, "Source text (describes the image)",
                                                 "Target text (the edit)")
            t0 = gr.Slider(0.05, 1.0, value=defaults.t0, step=0.05,
                           label="t0 (inversion depth, fraction of the timesteps)")
            with gr.Row():
                inversion = gr.Number(defaults.inversion_steps, label="Inversion steps",
                                      precision=0, minimum=0, elem_id=f"{task}_steps")
                decode = gr.Number(defaults.decode_steps, label="Decode steps", precision=0,
                                   minimum=0, elem_id=f"{task}_decode_steps")
                finetune = gr.Number(defaults.finetune_steps, label="Fine-tuning steps",
                                     precision=0, minimum=0, elem_id=f"{task}_finetune_steps")
            with gr.Row():
                rate = gr.Number(defaults.learning_rate, label="Learning rate")
                weight = gr.Number(defaults.id_weight, label="Identity weight")
            button = _generate_button(task, "Edit")
        with gr.Column(scale=3):
            gallery, note, paths = _outputs(task)

    def run(image_, source_, target_, *values, progress=gr.Progress()):
        return _show(handlers.diffusionclip(engine, out_dir, image_, source_, target_,
                                            handlers.CLIPEdit(*values), _reporter(progress)))

    button.click(_guarded(run), [image, source, target, t0, inversion, decode, finetune, rate,
                                 weight], [gallery, note, paths], **QUEUE)


def _compare_tab(engine, out_dir):
    task = "compare"
    names = engine.samplers_for(task)
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=2, visible=engine.kind == TEXT,
                                elem_id=f"{task}_prompt")
            classes = list(engine.class_names)
            label = gr.Dropdown(classes, value=classes[0] if classes else None, label="Class",
                                visible=bool(classes), elem_id=f"{task}_class")
            rows = []
            for i, (name, steps) in enumerate(COMPARE_DEFAULTS):
                with gr.Row():
                    pick = gr.Dropdown([None] + names, value=name if name in names else None,
                                       label=f"Sampler {i + 1}", elem_id=f"{task}_sampler_{i}")
                    count = gr.Number(steps, label="Steps", precision=0, minimum=0,
                                      elem_id=f"{task}_steps_{i}")
                rows += [pick, count]
            controls = _controls(engine, task, batch=False, sampler=False, steps=False)
            button = _generate_button(task, "Compare")
        with gr.Column(scale=3):
            gallery, note, _ = _outputs(task)

    def run(prompt_, label_, *values, progress=gr.Progress()):
        runs = list(zip(values[0:8:2], values[1:8:2]))
        return handlers.compare(engine, out_dir, prompt_, label_, _settings(values[8:]), runs,
                                _reporter(progress))

    button.click(_guarded(run), [prompt, label] + rows + controls.inputs(), [gallery, note],
                 **QUEUE)
