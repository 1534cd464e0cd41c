"""Web app without a browser: handlers, PNG parameters, progress, compiles, the command line.

A tiny random Stable Diffusion directory (tests/app_fixtures.py, no torch) is served by an
:class:`~diffusion_jax.app.engine.Engine`; the browser tests are in test_app_browser.py.
"""
import dataclasses

import jax
import numpy as np
import pytest
from app_fixtures import SIZE, gradient, tiny_pixel_engine, write_tiny_sd
from flax import nnx
from PIL import Image

gr = pytest.importorskip("gradio")

from diffusion_jax import pipelines  # noqa: E402
from diffusion_jax.app import __main__ as app_main  # noqa: E402
from diffusion_jax.app import engine as engine_lib  # noqa: E402
from diffusion_jax.app import handlers, metadata, progress, ui  # noqa: E402

STEPS = 4
SETTINGS = handlers.Settings(sampler="ddim", steps=STEPS, guidance=7.5, seed=5, batch_size=1)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def engine(sd_dir):
    return engine_lib.load_engine(checkpoint_dir=str(sd_dir))


def _read(path):
    return np.asarray(Image.open(path))


def test_text_to_image_png_equals_the_library_and_carries_its_parameters(engine, tmp_path):
    reports = []
    items, note = handlers.text_to_image(engine, str(tmp_path), "a photo of a cat", "",
                                         SETTINGS, None, None,
                                         lambda c, compiling: reports.append(compiling))
    # The same program the engine ran (test_app_browser.py compares with a plain load).
    expected = pipelines.text_to_image(engine.pipe, ["a photo of a cat"], jax.random.key(5),
                                       num_steps=STEPS, guidance_scale=7.5)
    assert len(items) == 1 and "Seed 5" in note
    for i, (path, _) in enumerate(items):
        np.testing.assert_array_equal(_read(path), expected[i])  # bitwise, through PNG
        params = handlers.read_parameters(path)
        assert params["prompt"] == "a photo of a cat" and params["seed"] == 5
        assert (params["sampler"], params["steps"], params["guidance"]) == ("ddim", STEPS, 7.5)
        assert params["checkpoint"] == engine.source and params["index"] == i
    assert engine.counter.count == engine.counter.total == STEPS  # one tick per UNet call
    assert reports and reports[0]  # the first run reported that it was compiling


def test_prompt_seed_guidance_and_eta_do_not_recompile(engine, tmp_path):
    settings = SETTINGS
    first, _ = handlers.text_to_image(engine, str(tmp_path), "a cat", "", settings, SIZE, SIZE)
    compiled = engine.compile_count()
    for change in (dict(guidance=3.0), dict(seed=9), dict(eta=0.5)):
        items, _ = handlers.text_to_image(engine, str(tmp_path), "hello", "",
                                          dataclasses.replace(settings, **change), SIZE, SIZE)
        assert np.abs(_read(items[0][0]).astype(int) - _read(first[0][0])).max() > 0
    assert engine.compile_count() == compiled


def test_compare_runs_each_sampler_on_one_seed_with_nfe_and_time(engine, tmp_path):
    settings = dataclasses.replace(SETTINGS, random_seed=True)
    items, table = handlers.compare(engine, str(tmp_path), "a cat", None, settings,
                                    [("ddim", STEPS), (None, 10), ("dpm_solver_pp", 3)])
    assert [caption.split(" · ")[:3] for _, caption in items] == [
        ["ddim", f"{STEPS} steps", f"NFE {STEPS}"], ["dpm_solver_pp", "3 steps", "NFE 3"]]
    seeds = {handlers.read_parameters(path)["seed"] for path, _ in items}
    assert len(seeds) == 1 and f"| ddim | {STEPS} | {STEPS} |" in table


def _editor(image, painted):
    layer = np.zeros(image.shape[:2] + (4,), np.uint8)
    layer[painted] = (255, 0, 255, 255)
    return {"background": np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]),
            "layers": [layer], "composite": None}


GOOD = np.full((SIZE, SIZE, 3), 128, np.uint8)
HOLE = np.zeros((SIZE, SIZE), bool)
HOLE[:, SIZE // 2:] = True


def test_inpainting_a_painted_mask_changes_only_the_painted_region(engine, tmp_path):
    """The brush layer of the image editor is the hole: pixels outside it come back exactly
    (known pixels are pasted), pixels under it are regenerated."""
    source = gradient(SIZE)
    items, _ = handlers.inpaint(engine, str(tmp_path), _editor(source, HOLE), None, "a cat", "",
                                SETTINGS)
    changed = np.abs(_read(items[0][0]).astype(int) - source).max(axis=-1) > 0   # [S, S]
    assert not changed[~HOLE].any()
    assert changed[HOLE].mean() > 0.5


def test_inversion_edit_equals_the_library_and_the_source_prompt_reconstructs(engine,
                                                                              tmp_path):
    image = gradient(SIZE)
    settings = dataclasses.replace(SETTINGS, guidance=1.0)  # one decoding program for both
    same, note = handlers.invert_edit(engine, str(tmp_path), image, "a cat", "a cat", settings)
    # The library, as pipelines.invert's docstring says: invert, then uniform-spacing DDIM.
    pixels = image[None].astype(np.float32) / 127.5 - 1.0
    z_t = pipelines.invert(engine.pipe, pixels, ["a cat"], num_steps=STEPS)
    decoded = {prompt: pipelines.text_to_image(
        engine.pipe._replace(ddim_timesteps=None), [prompt], jax.random.key(5), latents=z_t,
        num_steps=STEPS, sampler="ddim", guidance_scale=1.0)[0] for prompt in ("a cat", "hello")}
    reconstruction, edit = (_read(path) for path, _ in same)
    np.testing.assert_array_equal(reconstruction, decoded["a cat"])  # bitwise, through PNG
    np.testing.assert_array_equal(edit, reconstruction)              # target = source
    assert engine.counter.count == engine.counter.total == 3 * STEPS
    params = [handlers.read_parameters(path) for path, _ in same]
    assert [(p["task"], p["source_prompt"], p["prompt"]) for p in params] == [
        ("invert", "a cat", "a cat")] * 2 and "DDIM inversion, 4 steps" in note
    other, _ = handlers.invert_edit(engine, str(tmp_path), image, "a cat", "hello", settings)
    np.testing.assert_array_equal(_read(other[0][0]), reconstruction)
    np.testing.assert_array_equal(_read(other[1][0]), decoded["hello"])
    assert np.abs(_read(other[1][0]).astype(int) - reconstruction).max() > 0  # edited


def _page_ids(engine, out_dir):
    """``elem_id`` of every component of the page built for ``engine``."""
    return {getattr(block, "elem_id", None) for block in ui.build(engine, out_dir).blocks.values()}


def test_capabilities_offer_inversion_to_text_models_and_diffusionclip_only_with_clip(
        engine, sd_dir, tmp_path):
    assert "invert" in engine.tasks and "diffusionclip" not in engine.tasks  # no image tower
    assert engine.samplers_for("invert") == ["ddim"]
    with_clip = engine_lib.Engine(engine_lib.TEXT, str(sd_dir), pipe=engine.pipe,
                                  clip_workdir="runs/clip")
    assert "diffusionclip" in with_clip.tasks
    shown = _page_ids(engine, str(tmp_path))
    assert "invert_generate" in shown and "diffusionclip_generate" not in shown
    assert "diffusionclip_generate" in _page_ids(with_clip, str(tmp_path))
    with pytest.raises(handlers.InputError, match="names a CLIP stage"):
        handlers.diffusionclip(engine, "unused", GOOD, "a", "b", handlers.CLIPEdit())
    with pytest.raises(ValueError, match="latent.clip_workdir"):
        engine.clip()
    for edit, message in ((dict(t0=0.0), r"t0 \(inversion depth\) must lie in \(0, 1\]"),
                          (dict(finetune_steps=0), r"Fine-tuning steps must be a whole number"),
                          (dict(learning_rate=0.0), "Learning rate must be > 0")):
        with pytest.raises(handlers.InputError, match=message):  # before loading the CLIP
            handlers.diffusionclip(with_clip, "unused", GOOD, "a", "b",
                                   handlers.CLIPEdit(**edit))
    with pytest.raises(handlers.InputError, match="target text is empty"):
        handlers.diffusionclip(with_clip, "unused", GOOD, "a", " ", handlers.CLIPEdit())


@pytest.mark.parametrize("call, message", [
    (lambda e, d: handlers.text_to_image(e, d, "  ", "", SETTINGS, None, None),
     "prompt is empty"),
    (lambda e, d: handlers.text_to_image(e, d, "a cat", "", SETTINGS, 30, SIZE),
     "Height 30 is not a multiple of 4"),
    (lambda e, d: handlers.text_to_image(e, d, "a cat", "",
                                         dataclasses.replace(SETTINGS, steps=0), None, None),
     "Steps must be a whole number in [1, 1000], got 0"),
    (lambda e, d: handlers.text_to_image(e, d, "a cat", "", dataclasses.replace(
        SETTINGS, options_text="churn=lots"), None, None), "churn expects a value of type float"),
    (lambda e, d: handlers.text_to_image(e, d, "a cat", "", dataclasses.replace(
        SETTINGS, options_text="order=2, pred_type=x0"), None, None),
     "['pred_type'] cannot be set here"),
    (lambda e, d: handlers.inpaint(e, d, _editor(GOOD, HOLE), np.zeros((16, 16), np.uint8),
                                   "a cat", "", SETTINGS), "mask is 16x16 pixels but the image "
                                                           "is 32x32"),
    (lambda e, d: handlers.inpaint(e, d, _editor(GOOD, ~HOLE & HOLE), None, "a cat", "",
                                   SETTINGS), "mask is empty"),
    (lambda e, d: handlers.image_to_image(e, d, None, "a cat", "", 0.5, SETTINGS),
     "Upload an image"),
    (lambda e, d: handlers.image_to_image(e, d, GOOD[:30], "a cat", "", 0.5, SETTINGS),
     "height 30 is not a multiple of 4"),
    (lambda e, d: handlers.invert_edit(e, d, None, "a cat", "a dog", SETTINGS),
     "Upload an image"),
    (lambda e, d: handlers.invert_edit(e, d, GOOD, "", "a dog", SETTINGS),
     "source prompt is empty"),
    (lambda e, d: handlers.invert_edit(e, d, GOOD, "a cat", " ", SETTINGS),
     "target prompt is empty"),
    (lambda e, d: handlers.invert_edit(e, d, GOOD, "a cat", "a dog",
                                       dataclasses.replace(SETTINGS, steps=0)),
     "Steps must be a whole number in [1, 1000], got 0"),
    (lambda e, d: handlers.compare(e, d, "a cat", None, SETTINGS, [("ddim", 4)]),
     "Choose 2 to 4 samplers"),
    (lambda e, d: handlers.image_to_image(e, d, GOOD, "a cat", "", 0.5,
                                          dataclasses.replace(SETTINGS, sampler="langevin")),
     "cannot run img2img"),
])
def test_bad_inputs_name_the_problem_before_any_compile(engine, tmp_path, call, message):
    compiled = engine.compile_count()
    with pytest.raises(handlers.InputError) as err:
        call(engine, str(tmp_path))
    assert message in str(err.value)
    assert engine.compile_count() == compiled


def test_parameters_are_read_only_from_this_apps_pngs(tmp_path):
    image = np.zeros((4, 4, 3), np.uint8)
    options = handlers._sampler_options("churn=1.0, clip_x0=-1,1\norder=3")
    assert options == {"churn": 1.0, "clip_x0": (-1.0, 1.0), "order": 3}
    png = metadata.save_png(str(tmp_path / "a.png"), image, {"prompt": "x", "seed": 3,
                                                            "sampler_options": options})
    params = handlers.read_parameters(png)
    assert params["seed"] == 3
    assert handlers._sampler_options(params["options_text"]) == options  # round trip
    assert Image.open(png).text["prompt"] == "x"  # also readable as plain PNG text
    Image.fromarray(image).save(tmp_path / "plain.png")
    Image.fromarray(image).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    for name, message in (("plain.png", "carries no 'parameters'"), ("a.jpg", "JPEG image"),
                          ("notes.txt", "not an image")):
        with pytest.raises(handlers.InputError, match=message):
            handlers.read_parameters(str(tmp_path / name))


class _Scale(nnx.Module):
    """A stand-in network: ``model(x, t, cond) = 0.5 x``."""
    in_channels, num_levels = 4, 2

    def __call__(self, x, t, cond=None):
        return 0.5 * x


def test_progress_model_ticks_once_per_call_inside_jit_and_keeps_attributes():
    wrapped = progress.ProgressModel(_Scale())
    assert (wrapped.in_channels, wrapped.num_levels) == (4, 2)
    graphdef, state = nnx.split(wrapped)
    chain = jax.jit(lambda s, x: jax.lax.fori_loop(
        0, 3, lambda i, z: nnx.merge(graphdef, s)(z, jax.numpy.full((1,), i)), x))
    counter = progress.StepCounter()
    with progress.counting(counter, 3):
        out = chain(state, np.ones((1, 2, 2, 4), np.float32))
        jax.effects_barrier()
        with pytest.raises(RuntimeError, match="already active"):
            with progress.counting(progress.StepCounter(), 1):
                pass
    np.testing.assert_allclose(out, 0.125)
    assert counter.count == 3 and counter.fraction() == 1.0
    # The tick takes no operands: no device-to-host copy, no wait for the step's values.
    jaxpr = jax.make_jaxpr(lambda x: nnx.merge(graphdef, state)(x, jax.numpy.ones((1,))))(
        np.ones((1, 2, 2, 4), np.float32))
    (tick,) = [e for e in jaxpr.eqns if e.primitive.name == "debug_callback"]
    assert tick.invars == []


def test_pixel_model_samples_a_chosen_class_and_caches_its_program(tmp_path):
    engine = tiny_pixel_engine(tmp_path)
    assert engine.tasks == ("sample", "compare") and engine.class_names[3] == "3"
    settings = handlers.Settings(sampler="ddim", steps=3, guidance=2.0, seed=1, batch_size=2)
    items, _ = handlers.sample(engine, str(tmp_path), "3", settings)
    again, _ = handlers.sample(engine, str(tmp_path), "7", dataclasses.replace(settings,
                                                                               guidance=4.0))
    assert _read(items[0][0]).shape == (8, 8) and engine.compile_count() == 1
    assert handlers.read_parameters(again[0][0])["class_label"] == 7
    with pytest.raises(handlers.InputError, match="Pick a class"):
        handlers.sample(engine, str(tmp_path), None, settings)


def test_command_line_without_a_model_names_the_make_targets(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert app_main.main([]) == 2
    err = capsys.readouterr().err
    assert "make demo-t2i" in err and "make demo" in err
    assert app_main.main(["--workdir", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "WARNING" not in err  # local by default: no warning
    assert app_main.main(["--host", "0.0.0.0", "--workdir", str(tmp_path / "missing")]) == 1
    assert "WARNING: serving on 0.0.0.0" in capsys.readouterr().err
    assert app_main.host_warning("127.0.0.1") is None
    (tmp_path / "demo" / "workdir").mkdir(parents=True)
    assert app_main.default_source(str(tmp_path)).endswith("demo/workdir")
    (tmp_path / "demo_t2i" / "t2i").mkdir(parents=True)  # the text-to-image demo comes first
    assert app_main.default_source(str(tmp_path)).endswith("demo_t2i/t2i")


def test_a_failing_handler_becomes_a_page_message_not_a_crash():
    def broken():
        raise RuntimeError("device lost")

    with pytest.raises(gr.Error, match="Internal error \\(RuntimeError: device lost\\)"):
        ui._guarded(broken)()
    with pytest.raises(gr.Error, match="prompt is empty"):
        ui._guarded(lambda: handlers._prompt(""))()


def test_progress_bar_messages():
    calls = []
    report = ui._reporter(lambda value, desc, unit=None: calls.append((value, desc)))
    counter = progress.StepCounter()
    counter.reset(4)
    report(counter, True)
    counter.tick()
    report(counter, True)
    counter.reset(None)  # DiffusionCLIP: no count, no total
    report(counter, False)
    counter.tick()
    report(counter, False)
    assert calls == [(0.0, "compiling… (first run with these settings)"), ((1, 4), "step 1/4"),
                     (None, "running… (this task reports no steps)"),
                     ((1, None), "1 network evaluations")]
