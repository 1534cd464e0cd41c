"""DiT (models/dit.py, convert/dit.py, arch "dit"): diffusers parity on a tiny random
`DiTTransformer2DModel`, pinned parameter counts, adaLN-Zero, bf16 / remat, the factory and
its bad-input errors, and run_train / run_sample on a tiny class-conditional DiT."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from training_fixtures import REPO, subprocess_env

from configs import tiny
from diffusion_jax import checkpoint, loading, objectives, sharding
from diffusion_jax.cli import convert as cli_convert
from diffusion_jax.convert import common
from diffusion_jax.convert import dit as convert_dit
from diffusion_jax.models import build, dit
from diffusion_jax.models.layers import LOGICAL_AXIS_NAMES

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# a tiny diffusers DiT: 8x8x4 latents, patch 2 (16 tokens), width 2 x 8, 2 blocks, 5 classes
TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
            num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=5, norm_eps=1e-5)
SMALL = dict(image_size=8, in_channels=1, patch_size=2, hidden_size=16, depth=2, num_heads=2,
             num_classes=3, learn_sigma=False)


def _diffusers_dit(**kwargs):
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(**kwargs).eval()


def _count_torch(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``(diffusers model, our converted DiT, output dir)`` of the tiny random model."""
    root = tmp_path_factory.mktemp("dit")
    ref = _diffusers_dit(**TINY)
    ref.save_pretrained(root / "src")
    cli_convert.dit(["--src", str(root / "src"), "--out", str(root / "out")])
    model, record = convert_dit.load_converted(root / "out")
    return ref, model, record


def test_dit_xl_2_has_the_pinned_parameter_count_as_diffusers():
    ours = common.abstract_count(lambda: dit.DiT(**dit.XL_2, rngs=nnx.Rngs(0)))
    with torch.device("meta"):  # shapes only, no 3 GB of weights
        ref = diffusers.DiTTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
            num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    assert ours == _count_torch(ref) == 749_826_464


def test_converted_tiny_dit_matches_diffusers(converted):
    ref, model, record = converted
    assert record["format"] == "diffusion_jax.dit/1" and record["arch"] == "dit"
    assert common.abstract_count(lambda: convert_dit.build_dit(record["kwargs"])) == \
        _count_torch(ref)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)           # NCHW, as diffusers
    t = np.array([0, 417, 999])
    y = np.array([4, 0, 5])                                           # 5 = the null label
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t),
                   torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    got = model.predict(x_nhwc, jnp.asarray(t, jnp.int32), {"label": jnp.asarray(y, jnp.int32)})
    assert got.shape == (3, 8, 8, 8) and np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    eps = model(x_nhwc, jnp.asarray(t, jnp.int32), {"label": jnp.asarray(y, jnp.int32)})
    np.testing.assert_array_equal(np.asarray(eps), np.asarray(got)[..., :4])
    null = model.predict(x_nhwc, jnp.asarray(t, jnp.int32))             # no label: the null one
    np.testing.assert_array_equal(null, model.predict(x_nhwc, jnp.asarray(t, jnp.int32),
                                                      {"label": jnp.full((3,), 5)}))


def test_sincos_table_matches_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    for dim, grid, base in ((16, 4, 4), (24, 6, 3)):
        want = get_2d_sincos_pos_embed(dim, grid, base_size=base, output_type="pt").numpy()
        np.testing.assert_allclose(dit.sincos_pos_embed(dim, grid, grid, base), want, atol=1e-6)


@pytest.mark.parametrize("change, match", [
    (dict(norm_type="ada_norm_single"), "norm_type='ada_norm_single'"),
    (dict(out_channels=5), "out_channels=5 must be in_channels=4 or twice it"),
    (dict(activation_fn="geglu"), "activation_fn='geglu'"),
    (dict(caption_channels=8), r"unsupported config field\(s\) \['caption_channels'\]"),
    (dict(_class_name="Transformer2DModel"), "expected 'DiTTransformer2DModel'")])
def test_unsupported_diffusers_configs_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        convert_dit.config_to_kwargs({**TINY, **change})


def test_adaln_zero_starts_at_zero_output_and_learns():
    """Zero-initialised modulations and output: f = 0 at init, but the output layer's gradient
    is not zero, so a step moves it (the identity-block start of adaLN-Zero)."""
    model = dit.DiT(**SMALL, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([3, 70])
    assert float(jnp.abs(_apply(model, x, t)).max()) == 0.0
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, t) - x) ** 2))(params)
    assert float(jnp.abs(grads["proj_out_2"]["kernel"].value).max()) > 0


def test_every_param_has_logical_axis_names():
    model = nnx.eval_shape(lambda: dit.DiT(**SMALL, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == len(var.shape), path
        assert set(names) <= set(LOGICAL_AXIS_NAMES) | {None}, path


def _apply(model, *args):
    """``model(*args)`` compiled (eager NNX dispatch is slow on a loaded host)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, a: nnx.merge(graphdef, s)(*a))(state, args)


def test_fsdp_shards_every_dit_matrix():
    """On a data x fsdp mesh the rules table splits every kernel (all but the label tables)
    over "fsdp", as it does the UNet's."""
    config = objectives.with_arch(_dit_config(class_conditional=True))
    config.mesh.data, config.mesh.fsdp = 4, 2
    _, params = loading.abstract_params(config, sharding.make_mesh(config.mesh))
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]:
        name = jax.tree_util.keystr(path)
        if leaf.ndim >= 2 and "embedding_table" not in name:
            assert "fsdp" in tuple(leaf.sharding.spec), (name, leaf.sharding.spec)


def _perturbed(**kwargs):
    """A DiT whose zero-initialised layers are made random (else every output is 0)."""
    model = dit.DiT(**SMALL, **kwargs, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noise = jax.jit(lambda ls, ks: [p + 0.1 * jax.random.normal(k, p.shape, p.dtype)
                                    for p, k in zip(ls, ks)])
    leaves = noise(leaves, list(keys))
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def test_bfloat16_compute_close_to_float32():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t, cond = jnp.array([3, 70]), {"label": jnp.array([1, 3])}
    ref = _apply(_perturbed(), x, t, cond)
    got = _apply(_perturbed(dtype=jnp.bfloat16), x, t, cond)
    assert got.dtype == jnp.float32
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert 0.0 < rel < 3e-2, rel  # > 0: the compute really ran in bfloat16


def test_remat_gives_identical_outputs_and_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([3, 70])

    def loss_and_grad(model):
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(x, t) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    remat = _perturbed(remat=True)
    graphdef, state = nnx.split(remat)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x, t))(state)
    assert sum(e.primitive.name in ("checkpoint", "remat2", "remat") for e in jaxpr.eqns) == 2
    (l0, g0), (l1, g1) = loss_and_grad(_perturbed()), loss_and_grad(remat)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def _dit_config(**model):
    config = tiny.get_config()
    config.model.update({**dict(arch="dit", hidden_size=16, depth=1, num_heads=2), **model})
    return config


def test_the_factory_builds_the_config_dit_and_the_objective_trains_it():
    config = objectives.with_arch(_dit_config(class_conditional=True))
    model = nnx.eval_shape(lambda: build.build_model(config, rngs=nnx.Rngs(0)))
    assert isinstance(model, dit.DiT) and model.num_classes == 10 and model.out_channels == 1
    assert model.pos_embed.proj.kernel.value.shape == (2, 2, 1, 16)
    assert build.arch_of_format("diffusion_jax.dit/1") == "dit"


@pytest.mark.parametrize("change, match", [
    (dict(patch_size=3), r"data.image_size=8 must be a multiple of model.patch_size=3"),
    (dict(num_heads=3), r"num_heads=3 must be >= 1 and divide hidden_size=16"),
    (dict(dtype="float64"), r"model.dtype='float64' must be one of \('float32'"),
    (dict(cond_image_channels=1), r"model.cond_image_channels=1: the dit arch takes no image")])
def test_bad_dit_settings_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        build.build_model(_dit_config(**change), rngs=nnx.Rngs(0))


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)


DIT_FLAGS = ("--config=configs/tiny.py", "--config.model.arch=dit",
             "--config.model.hidden_size=16", "--config.model.depth=1",
             "--config.model.num_heads=2", "--config.model.class_conditional=True",
             "--config.model.cond_drop_prob=0.2")


@pytest.mark.slow
def test_run_train_and_run_sample_a_class_conditional_dit(tmp_path):
    workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
    proc = _run("run_train.py", *DIT_FLAGS, f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 4: " in proc.stdout
    proc = _run("run_sample.py", f"--workdir={workdir}", "--steps=3", "--num_samples=4",
                "--class_label=7", "--guidance_scale=2", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    npz = np.load(os.path.join(out, "samples.npz"))
    assert npz["images"].shape == (4, 8, 8, 1) and (npz["labels"] == 7).all()
    manager = checkpoint.make_manager(workdir, create=False, async_checkpointing=False)
    assert checkpoint.load_config(manager, 4).model.arch == "dit"


@pytest.mark.parametrize("arg, needle", [
    ("--config.model.patch_size=3",
     "data.image_size=8 must be a multiple of model.patch_size=3"),
    ("--config.model.arch=ditt",
     "model.arch='ditt' must be one of ('unet', 'dit', ")])
def test_run_train_bad_dit_input_exits_1_with_one_line(tmp_path, arg, needle):
    proc = _run("run_train.py", *DIT_FLAGS, arg, f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert needle in lines[-1] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
