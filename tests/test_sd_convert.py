"""A tiny random diffusers StableDiffusionPipeline through convert_pipeline / load_pipeline."""
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sd_fixtures import CLIP_SMALL, TOL, UNET_LINEAR, VAE_SMALL, nchw, perturb, run, write_vocab
from training_fixtures import REPO

from diffusion_jax.cli import convert as cli_convert
from diffusion_jax.convert import pipeline, scheduler, unet_cond

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                 prediction_type="v_prediction", timestep_spacing="trailing")
PROMPTS = ["a photo of a cat", ""]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small random SD pipeline written by diffusers' save_pretrained; returns (dir, pipe)."""
    root = tmp_path_factory.mktemp("sd")
    write_vocab(root / "vocab", {"model_max_length": 16})
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(
        vae=perturb(diffusers.AutoencoderKL(**VAE_SMALL), 1),
        text_encoder=perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
            **CLIP_SMALL, hidden_act="quick_gelu", eos_token_id=2)), 2),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "vocab"),
        unet=perturb(diffusers.UNet2DConditionModel(**UNET_LINEAR), 3),
        scheduler=diffusers.DDIMScheduler(**SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "diffusers")
    return root / "diffusers", pipe


@pytest.fixture(scope="module")
def converted(saved, tmp_path_factory):
    """The pipeline converted through the command-line entry point."""
    out = tmp_path_factory.mktemp("converted")
    cli_convert.pipeline(["--src", str(saved[0]), "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def stored(converted):
    """The converted pipeline loaded back (float32)."""
    return pipeline.load_pipeline(converted)


def test_converted_pipeline_matches_every_diffusers_component(saved, stored):
    _, pipe = saved
    sd = stored
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True,
                         return_tensors="pt").input_ids
    np.testing.assert_array_equal(sd.tokenizer(PROMPTS), ids.numpy())
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
    ours_states = run(lambda m, i: m(i).last_hidden_state, sd.text_encoder,
                      jnp.asarray(ids.numpy()))
    np.testing.assert_allclose(np.asarray(ours_states), states.numpy(), atol=TOL, rtol=0)

    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([999, 10])
    with torch.no_grad():
        pred = pipe.unet(torch.from_numpy(latents), torch.from_numpy(t), states).sample.numpy()
        image = pipe.vae.decode(torch.from_numpy(latents) / pipe.vae.config.scaling_factor).sample
    got = run(lambda m, x, t, c: m(x, t, {"text": c}), sd.unet, latents.transpose(0, 2, 3, 1),
              jnp.asarray(t), jnp.asarray(states.numpy()))
    np.testing.assert_allclose(nchw(got), pred, atol=TOL, rtol=0)
    decoded = run(lambda m, z: m.decode(z / m.scaling_factor), sd.vae,
                  latents.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(nchw(decoded), image.numpy(), atol=TOL, rtol=0)

    assert sd.scheduler.pred_type == "v"
    for n in (4, 10):
        pipe.scheduler.set_timesteps(n)
        np.testing.assert_array_equal(scheduler.inference_timesteps(sd.scheduler, n),
                                      pipe.scheduler.timesteps.numpy())
    assert sd.info["unet"]["sample_size"] == 16
    assert sd.info["pipeline_class"] == "StableDiffusionPipeline"


def test_load_pipeline_reads_a_diffusers_directory_directly(saved, stored):
    direct = pipeline.load_pipeline(saved[0])
    for name in ("unet", "vae", "text_encoder"):
        a, b = (nnx.to_pure_dict(nnx.state(getattr(sd, name), nnx.Param))
                for sd in (direct, stored))
        jax.tree.map(np.testing.assert_array_equal, a, b)
    assert direct.scheduler.timestep_spacing == stored.scheduler.timestep_spacing == "trailing"


def test_dtype_overrides_set_compute_and_parameter_dtypes(converted):
    unet, record = unet_cond.load_converted(converted / "unet", dtype=jnp.bfloat16)
    assert unet.dtype == jnp.bfloat16 and record["format"] == unet_cond.FORMAT
    assert unet.conv_in.kernel[...].dtype == jnp.float32  # parameters stay float32
    half, _ = unet_cond.load_converted(converted / "unet", param_dtype=jnp.bfloat16)
    assert half.conv_in.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half.conv_in.kernel[...], np.float32),
                               np.asarray(unet.conv_in.kernel[...]), rtol=1e-2)


def test_index_errors_name_the_component(saved, tmp_path):
    src = saved[0]
    index = json.loads((src / "model_index.json").read_text())
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        pipeline.load_pipeline(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for change, message in (({"unet": ["diffusers", "UNet2DModel"]}, "'unet'"),
                            ({"controlnet": ["diffusers", "ControlNetModel"]}, "controlnet"),
                            ({"_class_name": "StableDiffusionXLPipeline"},
                             "_class_name='StableDiffusionXLPipeline' is not supported"),
                            ({"scheduler": ["diffusers", "FooScheduler"]},  # converted before
                             r"component 'scheduler' is \['diffusers', 'FooScheduler'\]")):
        (bad / "model_index.json").write_text(json.dumps({**index, **change}))
        with pytest.raises(ValueError, match=message):
            pipeline.load_pipeline(bad)


def _tree_digest(root):
    """{relative path: bytes} of every file under ``root``."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy_source(saved, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(saved[0], src)
    return src


def test_convert_refuses_in_place_and_nested_outputs_before_writing(saved, tmp_path, capsys):
    src = _copy_source(saved, tmp_path)
    before = _tree_digest(src)
    (tmp_path / "link").symlink_to(src)
    for out, message in ((src, "is the source directory"), (tmp_path / "link", "is the source"),
                         (src / "converted", "inside --src"), (tmp_path, "contains --src")):
        with pytest.raises(SystemExit) as exc:
            cli_convert.pipeline(["--src", str(src), "--out", str(out)])
        assert exc.value.code not in (0, None)
        assert message in str(exc.value.code) and str(exc.value.code).count("\n") == 0
        assert _tree_digest(src) == before, out
    assert not (src / "converted").exists()


def test_a_failed_conversion_leaves_no_output_and_replaces_an_old_one_whole(
        saved, converted, tmp_path, monkeypatch):
    save = pipeline.common.save_component

    def failing(directory, model, record):
        if directory.endswith("vae"):
            raise OSError("disk full")
        save(directory, model, record)

    out = tmp_path / "out"
    monkeypatch.setattr(pipeline.common, "save_component", failing)
    with pytest.raises(OSError, match="disk full"):
        pipeline.convert_pipeline(saved[0], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no out, no temp dir
    shutil.copytree(converted, out)                           # an earlier conversion stays
    before = _tree_digest(out)
    with pytest.raises(OSError, match="disk full"):
        pipeline.convert_pipeline(saved[0], out)
    assert _tree_digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(pipeline.common, "save_component", save)
    pipeline.convert_pipeline(saved[0], out)                 # replaced by a complete one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert pipeline.load_pipeline(out).info["pipeline_class"] == "StableDiffusionPipeline"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a converted pipeline"):
        pipeline.convert_pipeline(saved[0], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"



def test_convert_cli_bad_sources_are_one_line_errors(saved, tmp_path):
    """Missing index, bad JSON, random-bytes weights: one ``error:`` line naming the file."""
    empty, bad_json, bad_weights = (tmp_path / n for n in ("empty", "bad_json", "bad_weights"))
    empty.mkdir()
    shutil.copytree(saved[0], bad_json)
    (bad_json / "model_index.json").write_text('{"unet": ["diffusers"')
    shutil.copytree(saved[0], bad_weights)
    weights = bad_weights / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(np.random.default_rng(0).bytes(4096))
    for src, name in ((empty, "model_index.json"), (bad_json, "model_index.json"),
                      (bad_weights, "diffusion_pytorch_model.safetensors")):
        with pytest.raises(SystemExit) as exc:
            cli_convert.pipeline(["--src", str(src), "--out", str(tmp_path / "out")])
        line = str(exc.value.code)
        assert line.startswith("convert.pipeline: error:") and name in line, line
        assert "\n" not in line
    assert not (tmp_path / "out").exists()
    proc = subprocess.run([sys.executable, "-m", "diffusion_jax.convert.pipeline", "--src",
                           str(empty), "--out", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "model_index.json" in proc.stderr



def _edit_json(relative, **fields):
    def edit(directory):
        path = directory / relative
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return edit

def test_converted_config_with_foreign_model_arguments_is_a_value_error(converted, tmp_path):
    out = tmp_path / "converted"
    shutil.copytree(converted, out)
    _edit_json("unet/config.json", kwargs={"foo": 1})(out)
    with pytest.raises(ValueError, match=r"unet/config.json: the model arguments do not fit "
                                         r"diffusion_jax.cond_unet/1 \(.*'foo'"):
        pipeline.load_pipeline(out)
