"""Web app in a real browser: Debian's headless Chromium driven by Playwright.

The server runs in this process (on a free 127.0.0.1 port) with the tiny random pipeline and
CLIP of app_fixtures.py, so the test can compare the page's PNGs with the library, count the
compiled programs and see what a handler received. Nothing waits a fixed time: each step
polls for a positive signal (an image in the gallery, an upload shown, the editor's layers
holding a stroke, ...) with a generous timeout for a loaded host, and fails at once, with its
text, when the page shows an error instead. Screenshots of the tabs go to a temporary folder,
or to ``$APP_SCREENSHOTS`` (``APP_SCREENSHOTS=docs/figures`` refreshes the README's figures).
"""
import base64
import io
import json
import os
import shutil
import socket
import time
import urllib.request

import jax
import numpy as np
import pytest
from app_fixtures import SIZE, gradient, tiny_pixel_engine, tiny_text_engine
from PIL import Image
from scipy import ndimage

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from diffusion_jax import image_io, pipelines  # noqa: E402
from diffusion_jax.app import __main__ as app_main  # noqa: E402
from diffusion_jax.app import engine as engine_lib  # noqa: E402
from diffusion_jax.app import handlers, ui  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 300_000  # generous: CI runs these beside another pytest worker on 2 cores
STEPS = 4
ERRORS = "[data-testid=toast-body].error"  # Gradio's error messages (gr.Error)
EDITOR = "#inpaint_editor"
# What the inpainting editor will send: Gradio's ImageEditor reads its canvas layers with
# get_blobs() when Generate is pressed; the same call, on the editor it exposes as
# window.editor, returns them now, as PNG data URLs.
EDITOR_BLOBS = """async () => {
  const editor = window.editor;
  if (!editor || !document.querySelector('%s').contains(editor.app.canvas)) return null;
  const url = blob => blob && new Promise(done => {
    const reader = new FileReader();
    reader.onload = () => done(reader.result);
    reader.readAsDataURL(blob);
  });
  const blobs = await editor.get_blobs();
  return {background: await url(blobs.background),
          layers: await Promise.all(blobs.layers.filter(Boolean).map(url))};
}""" % EDITOR


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(engine, out_dir, ports=(), attempts=5):
    """Starts the app for ``engine`` on a free port; returns ``(url, demo)``.

    A port free when probed can be taken by another process (the other pytest worker, ...)
    before the server binds it; gradio then raises ``OSError`` and the next port is tried,
    ``attempts`` in all: first ``ports``, then fresh free ones.
    """
    demo = ui.build(engine, out_dir)
    ports = iter(ports)
    for attempt in range(attempts):
        port = next(ports, None) or _free_port()
        try:
            app_main.launch(demo, "127.0.0.1", port, block=False)
        except OSError:
            if attempt + 1 == attempts:
                raise
            continue
        return f"http://127.0.0.1:{port}/", demo


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``(url, engine)`` of a running app serving the tiny pipeline (with a CLIP stage)."""
    root = tmp_path_factory.mktemp("app")
    engine = tiny_text_engine(root)
    url, demo = _serve(engine, str(root / "out"))
    yield url, engine
    demo.close()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (make test installs it).")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = os.environ.get("APP_SCREENSHOTS") or str(tmp_path_factory.mktemp("shots"))
    os.makedirs(folder, exist_ok=True)
    return folder


def _open(browser, url, button="#text_to_image_generate"):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)  # Playwright's 30 s is short for a loaded CI host
    outside = []
    page.on("request", lambda r: None if r.url.startswith(url) or r.url.startswith("data:")
            else outside.append(r.url))
    page.goto(url, wait_until="load")
    page.locator(button).wait_for(timeout=TIMEOUT_MS)
    page.outside_requests = outside
    return page


def _wait_until(poll, what):
    """``poll()``'s first truthy value, polled until ``TIMEOUT_MS``; fails naming ``what``."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        value = poll()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"gave up after {TIMEOUT_MS / 1000:.0f} s waiting for {what}")


def _errors(page):
    """Texts of the error messages the page shows now."""
    return set(page.locator(ERRORS).all_inner_texts())


def _shown(page, task, old=None, errors=frozenset()):
    """The first image of the tab's gallery once it differs from ``old``: ``(src, png)``.

    Fails at once if the page shows an error message not in ``errors``.
    """
    image = page.locator(f"#{task}_gallery img").first

    def poll():
        new = _errors(page) - set(errors)
        if new:
            pytest.fail(f"{task}: the page showed an error instead of images: {sorted(new)}")
        src = image.get_attribute("src") if image.count() else None
        return src if src and src != old else None

    src = _wait_until(poll, f"a new image in #{task}_gallery")
    return src, Image.open(io.BytesIO(page.request.get(src).body()))


def _generate(page, task, old=None):
    """Clicks the tab's generate button; returns :func:`_shown`'s ``(src, png)``."""
    errors = _errors(page)
    page.locator(f"#{task}_generate").click()
    return _shown(page, task, old, errors)


def _fill_text_to_image(page, prompt):
    page.locator("#text_to_image_prompt textarea").fill(prompt)
    page.locator("#text_to_image_steps input").fill(str(STEPS))
    page.locator("#text_to_image_seed input").fill("7")


def test_serving_moves_to_another_port_when_the_probed_one_is_taken(server, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        url, demo = _serve(server[1], str(tmp_path), ports=[port])
        try:
            assert not url.endswith(f":{port}/")
            with urllib.request.urlopen(url, timeout=TIMEOUT_MS / 1000) as page:
                assert page.status == 200
        finally:
            demo.close()


def test_generate_equals_the_library_reuses_the_program_and_restores_parameters(
        server, browser, shots):
    url, engine = server
    page = _open(browser, url)
    _fill_text_to_image(page, "a photo of a cat")
    src, png = _generate(page, "text_to_image")
    plain = pipelines.load(engine.source)
    expected = pipelines.text_to_image(plain, ["a photo of a cat"], jax.random.key(7),
                                       num_steps=STEPS, guidance_scale=7.5)[0]
    np.testing.assert_array_equal(np.asarray(png), expected)  # bitwise, after PNG
    assert '"prompt": "a photo of a cat"' in png.text["parameters"]
    assert (png.text["seed"], png.text["steps"], png.text["sampler"]) == ("7", "4", "ddim")
    compiled = engine.compile_count()
    # Move the guidance slider (keyboard on the range input), regenerate: no compile.
    slider = page.locator("#text_to_image_guidance input[type=range]")
    slider.focus()
    for _ in range(5):
        slider.press("ArrowLeft")
    sync_api.expect(page.locator("#text_to_image_guidance input[type=number]")).to_have_value(
        "7", timeout=TIMEOUT_MS)  # the page updates the number box after the key events
    _, again = _generate(page, "text_to_image", old=src)
    assert '"guidance": 7.0' in again.text["parameters"]
    assert np.abs(np.asarray(again, int) - expected).max() > 0
    assert engine.compile_count() == compiled
    # Reuse parameters: select the image, change the prompt, restore it.
    page.locator("#text_to_image_gallery img").first.click()
    page.locator("#text_to_image_prompt textarea").fill("something else")
    page.locator("#text_to_image_seed input").fill("99")
    page.locator("#text_to_image_reuse").click()
    page.wait_for_function("document.querySelector('#text_to_image_prompt textarea').value"
                           " === 'a photo of a cat'", timeout=TIMEOUT_MS)
    assert page.locator("#text_to_image_seed input").input_value() == "7"
    page.screenshot(path=os.path.join(shots, "app_text_to_image.png"), full_page=True)
    assert page.outside_requests == []  # nothing fetched from the internet
    page.close()


def test_bad_input_shows_a_message_and_the_next_request_works(server, browser, tmp_path):
    url, _ = server
    page = _open(browser, url)
    (tmp_path / "notes.txt").write_text("not an image")
    page.locator("#text_to_image_reuse_file input[type=file]").set_input_files(
        str(tmp_path / "notes.txt"))
    page.get_by_text("notes.txt is not an image").first.wait_for(timeout=TIMEOUT_MS)
    _fill_text_to_image(page, "   ")
    page.locator("#text_to_image_generate").click()
    page.get_by_text("The prompt is empty").first.wait_for(timeout=TIMEOUT_MS)
    page.locator("#text_to_image_prompt textarea").fill("a cat")
    page.locator("#text_to_image_height input").fill("30")
    page.locator("#text_to_image_generate").click()
    page.get_by_text("Height 30 is not a multiple of 4").first.wait_for(timeout=TIMEOUT_MS)
    page.locator("#text_to_image_height input").fill("32")
    _, png = _generate(page, "text_to_image")
    assert png.size == (32, 32)
    page.close()


def test_two_sessions_generating_at_once_both_get_their_images(server, browser):
    url, _ = server
    pages = [_open(browser, url) for _ in range(2)]
    for i, page in enumerate(pages):
        _fill_text_to_image(page, f"a cat number {i}")
    for page in pages:
        page.locator("#text_to_image_generate").click()
    for i, page in enumerate(pages):
        _, png = _shown(page, "text_to_image")
        assert f'"prompt": "a cat number {i}"' in png.text["parameters"]
        page.close()


def _decode(data_url):
    """The image of a PNG data URL, ``[H, W, C]`` uint8."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def _editor_blobs(page):
    """What the inpainting editor would send if Generate were pressed now:
    ``(background [H, W, 3] uint8, mask [H, W] bool)``, or ``None`` while it has no image."""
    blobs = page.evaluate(EDITOR_BLOBS)
    if blobs is None:
        pytest.fail("Gradio's ImageEditor no longer exposes the inpainting editor as "
                    "window.editor: this test cannot read back what it will send")
    if not blobs["background"]:
        return None
    background = _decode(blobs["background"])[..., :3]
    layers = [_decode(url) for url in blobs["layers"]]
    return background, handlers.mask_from_layers(layers, background.shape[:2])


def _holding_stroke(page, column):
    """:func:`_editor_blobs` once the editor's mask covers most of ``column``, else ``None``."""
    blobs = _editor_blobs(page)
    return blobs if blobs and blobs[1][:, column].mean() > 0.8 else None


def _image_on_screen(page, size):
    """Where the editor's canvas shows the uploaded ``gradient(size)``: ``(x, y, scale)``,
    the page coordinates of its top-left corner and screen pixels per image pixel, or
    ``None`` while the canvas does not show it whole (a filled square of its colours: red
    and green >= 100, blue < 64, the largest such region, so toolbar icons do not count)."""
    canvas = page.locator(f"{EDITOR} canvas").first
    box = canvas.bounding_box()
    pixels = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"), int)
    regions, count = ndimage.label((pixels[..., :2] >= 100).all(-1) & (pixels[..., 2] < 64))
    if not count:
        return None
    largest = 1 + np.argmax(ndimage.sum_labels(regions > 0, regions, range(1, count + 1)))
    rows, cols = ndimage.find_objects(regions)[largest - 1]
    height, width = rows.stop - rows.start, cols.stop - cols.start
    filled = (regions[rows, cols] == largest).mean()
    if min(height, width) < size or abs(height - width) > 2 or filled < 0.99:
        return None
    return box["x"] + cols.start, box["y"] + rows.start, height / size


def _settled(poll):
    """A poll for :func:`_wait_until` that is truthy once ``poll()`` gave the same truthy
    value twice in a row (e.g. an image that has stopped moving on screen)."""
    last = [None]

    def settled():
        value, last[0] = last[0], poll()
        return value if value and value == last[0] else None

    return settled


def test_inpainting_a_drawn_mask_changes_only_the_painted_region(server, browser, shots,
                                                                 tmp_path, monkeypatch):
    """A brush stroke drawn with the mouse down the right part of the uploaded image: the
    handler receives the image and a mask under the stroke, and the page's PNG keeps every
    other pixel (known pixels are pasted back: the VAE's error there is zero, as in
    test_app.py) while regenerating the painted ones.

    Each step waits for the editor's own state: its tools appear once its canvas is set up
    (an upload before that is dropped), the brush is selected once the upload is on the
    canvas, the stroke is drawn where the screenshot shows the image once it stands still,
    and Generate is pressed once the editor's layers (what it will send) hold the stroke.
    """
    url, _ = server
    received, inpaint = [], handlers.inpaint

    def spy(engine, out_dir, editor, *args, **kwargs):  # the editor value the page sent
        received.append(editor)
        return inpaint(engine, out_dir, editor, *args, **kwargs)

    monkeypatch.setattr(handlers, "inpaint", spy)
    source = gradient(SIZE)
    Image.fromarray(source).save(tmp_path / "input.png")
    page = _open(browser, url)
    page.get_by_role("tab", name="Inpainting").click()
    page.locator(f"{EDITOR} button[aria-label=Brush]").wait_for(timeout=TIMEOUT_MS)
    page.locator(f"{EDITOR} input[type=file]").first.set_input_files(str(tmp_path / "input.png"))
    page.locator(f"{EDITOR} button[aria-label=Brush].highlight").wait_for(timeout=TIMEOUT_MS)
    background, mask = _wait_until(lambda: _editor_blobs(page), "the upload in the editor")
    np.testing.assert_array_equal(background, source)
    assert not mask.any()
    left, top, scale = _wait_until(_settled(lambda: _image_on_screen(page, SIZE)),
                                   "the uploaded image standing still in the editor's canvas")
    column = SIZE - 6  # a vertical stroke down the right part (the brush is 16 px wide)
    x = left + (column + 0.5) * scale
    page.mouse.move(x, top + 2.5 * scale)
    page.mouse.down()
    for row in range(3, SIZE - 2):
        page.mouse.move(x, top + (row + 0.5) * scale)
    page.mouse.up()
    _, drawn = _wait_until(lambda: _holding_stroke(page, column),
                           "the stroke in the editor's layers")
    page.locator("#inpaint_prompt textarea").fill("a cat")
    page.locator("#inpaint_steps input").fill(str(STEPS))
    _, png = _generate(page, "inpaint")
    page.screenshot(path=os.path.join(shots, "app_inpaint.png"), full_page=True)
    page.close()
    (editor,) = received
    np.testing.assert_array_equal(np.asarray(editor["background"])[..., :3], source)
    mask = handlers.mask_from_layers(editor["layers"], (SIZE, SIZE))               # [S, S]
    np.testing.assert_array_equal(mask, drawn)  # what the editor held is what was sent
    assert mask[3:SIZE - 3, column].all() and not mask[:, :SIZE // 2].any(), \
        "the mask the page sent is not under the stroke"
    out = np.asarray(png, int)
    np.testing.assert_array_equal(out[~mask], source[~mask])
    assert (np.abs(out - source).max(-1) > 0)[mask].mean() > 0.5


def test_diffusionclip_tab_equals_the_library_and_shows_its_scores(server, browser, shots,
                                                                  tmp_path):
    """The cheapest edit (2 inversion and 2 decoding steps, 1 fine-tuning step): the page's
    reconstruction and edit equal pipelines.diffusionclip's bit for bit (its fine-tuning
    program comes from the compilation cache the page's run filled), the note shows the
    edit's CLIP scores and the PNG the settings."""
    url, engine = server
    image = gradient(SIZE)
    Image.fromarray(image).save(tmp_path / "input.png")
    page = _open(browser, url)
    page.get_by_role("tab", name="DiffusionCLIP").click()
    page.locator("#diffusionclip_image input[type=file]").set_input_files(
        str(tmp_path / "input.png"))
    page.locator("#diffusionclip_image img").first.wait_for(timeout=TIMEOUT_MS)
    page.locator("#diffusionclip_source textarea").fill("a photo")
    page.locator("#diffusionclip_prompt textarea").fill("a cat")
    for name, value in (("steps", 2), ("decode_steps", 2), ("finetune_steps", 1)):
        page.locator(f"#diffusionclip_{name} input").fill(str(value))
    _generate(page, "diffusionclip")
    gallery = page.locator("#diffusionclip_gallery img")
    _wait_until(lambda: gallery.count() == 2 and page.locator("#diffusionclip_note table").count(),
                "both images and the CLIP scores")
    reconstruction, edit = (Image.open(io.BytesIO(page.request.get(
        gallery.nth(i).get_attribute("src")).body())) for i in range(2))
    note = page.locator("#diffusionclip_note").inner_text()
    page.screenshot(path=os.path.join(shots, "app_diffusionclip.png"), full_page=True)
    page.close()
    expected = pipelines.diffusionclip(
        pipelines.load(engine.source), image[None].astype(np.float32) / 127.5 - 1.0, engine.clip(), "a photo",
        "a cat", t0=0.5, num_inversion_steps=2, num_decode_steps=2, finetune_steps=1,
        learning_rate=1e-4, id_weight=0.3)
    np.testing.assert_array_equal(np.asarray(reconstruction),
                                  image_io.to_uint8(expected["reconstruction"])[0])
    np.testing.assert_array_equal(np.asarray(edit), image_io.to_uint8(expected["output"])[0])
    assert np.abs(np.asarray(edit, int) - np.asarray(reconstruction)).max() > 0  # fine-tuned
    request = engine_lib.Request(task="diffusionclip", prompt="a cat", source_prompt="a photo")
    scores = engine.edit_scores(request, image[None], np.asarray(edit)[None])
    assert f"{scores['directional']:.4f}" in note and f"{scores['identity_l1']:.4f}" in note
    params = json.loads(edit.text["parameters"])
    assert (params["task"], params["source_prompt"], params["prompt"], params["steps"],
            params["t0"], params["decode_steps"], params["finetune_steps"]) == (
        "diffusionclip", "a photo", "a cat", 2, 0.5, 2, 1)


def test_screenshots_of_the_other_tabs(server, browser, shots, tmp_path):
    url, _ = server
    page = _open(browser, url)
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "gray.png")
    page.get_by_role("tab", name="Image to image").click()
    page.locator("#img2img_image input[type=file]").set_input_files(str(tmp_path / "gray.png"))
    page.locator("#img2img_prompt textarea").fill("a photo of a cat")
    page.locator("#img2img_image img").first.wait_for(timeout=TIMEOUT_MS)  # the upload shows
    page.screenshot(path=os.path.join(shots, "app_img2img.png"), full_page=True)
    page.get_by_role("tab", name="Compare samplers").click()
    page.locator("#compare_prompt textarea").fill("a photo of a cat")
    for i, steps in enumerate((STEPS, 3, 3)):
        page.locator(f"#compare_steps_{i} input").fill(str(steps))
    page.locator("#compare_generate").click()
    page.locator("#compare_note table").wait_for(timeout=TIMEOUT_MS)
    page.locator("#compare_gallery img").nth(2).wait_for(timeout=TIMEOUT_MS)  # may come later
    page.screenshot(path=os.path.join(shots, "app_compare.png"), full_page=True)
    # Inversion edit at guidance 1 (test_app.py compiled this program into the shared cache).
    page.get_by_role("tab", name="Inversion edit").click()
    page.locator("#invert_image input[type=file]").set_input_files(str(tmp_path / "gray.png"))
    page.locator("#invert_source textarea").fill("a photo of a cat")
    page.locator("#invert_prompt textarea").fill("a photo of a dog")
    page.locator("#invert_steps input").fill(str(STEPS))
    page.locator("#invert_guidance input[type=number]").fill("1")
    page.locator("#invert_guidance input[type=number]").press("Enter")
    page.locator("#invert_generate").click()
    page.locator("#invert_gallery img").nth(1).wait_for(timeout=TIMEOUT_MS)
    page.get_by_text("edit with guidance 1").first.wait_for(timeout=TIMEOUT_MS)
    page.screenshot(path=os.path.join(shots, "app_invert.png"), full_page=True)
    page.close()


def test_class_sampling_tab_of_a_pixel_model(browser, shots, tmp_path):
    engine = tiny_pixel_engine(tmp_path / "pixel_model")
    url, demo = _serve(engine, str(tmp_path / "out"))
    try:
        page = _open(browser, url, "#sample_generate")
        assert page.get_by_role("tab", name="Text to image").count() == 0  # not offered
        page.locator("#sample_class input").click()
        page.get_by_role("option", name="3", exact=True).click()
        page.locator("#sample_steps input").fill("3")
        _, png = _generate(page, "sample")
        assert png.size == (8, 8) and '"class_label": 3' in png.text["parameters"]
        page.screenshot(path=os.path.join(shots, "app_sample.png"), full_page=True)
        page.close()
    finally:
        demo.close()
