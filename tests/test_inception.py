"""FID Inception-v3: parity with torch-fidelity's PyTorch network on one weights file.

The reference is torch-fidelity 0.4.0's ``feature_extractor_inceptionv3.py`` (plain torch, the
same FID architecture and state_dict layout as pytorch-fid's ``pt_inception-...pth``). Its package
``__init__`` imports torchvision, which cannot be imported beside this torch build, so the
package is registered without running ``__init__`` and only the needed submodules are loaded.
Nothing is downloaded: the reference is built with random weights and saved to a temp file,
which both networks then load.
"""
import importlib
import os
import importlib.util
import sys
import types
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models import inception

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.parity

PARITY_RTOL = 1e-3  # max |ours - torch| / max |torch| over the 2048-d features


def _torch_fidelity_module(name):
    """Imports ``torch_fidelity.<name>`` without running the package's ``__init__``."""
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            pytest.skip("needs torch-fidelity: pip install --no-deps torch-fidelity==0.4.0")
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["torch_fidelity"] = package
    return importlib.import_module(f"torch_fidelity.{name}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch reference network loaded from the file, path of its random-weight state_dict)."""
    torch.set_num_threads(2)
    module = _torch_fidelity_module("feature_extractor_inceptionv3")
    cls = module.FeatureExtractorInceptionV3
    # Build the architecture without weights: skip torch-fidelity's own file read.
    with mock.patch.object(cls, "load_state_dict"), \
            mock.patch.object(module.torch, "load", return_value={}):
        net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):  # He init keeps activations O(1) through the ReLUs
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 0.01, generator=gen)
    path = str(tmp_path_factory.mktemp("inception") / "random_fid_inception.pth")
    torch.save(net.state_dict(), path)
    # The reference's own loading path must accept the file (strict load_state_dict).
    return cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=path), path


def test_pool3_features_match_torch_fidelity(reference):
    net, path = reference
    rng = np.random.default_rng(1)
    # Non-square, not 299: pixel noise, and a blocky image with structure at a coarser scale.
    noise = rng.integers(0, 256, size=(3, 37, 45))
    blocks = np.kron(rng.integers(0, 256, size=(3, 4, 5)), np.ones((10, 9)))[:, :37, :45]
    pixels = np.stack([noise, blocks]).astype(np.uint8)
    with torch.no_grad():
        (expected,) = net(torch.from_numpy(pixels))
    expected = expected.numpy()

    model = inception.load_fid_inception(path)
    images = jnp.asarray(pixels.transpose(0, 2, 3, 1).astype(np.float32) / 127.5 - 1.0)
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, images))

    assert got.shape == (2, inception.FEATURE_DIM)
    # The features must depend on the input, or the check below proves little.
    assert np.abs(expected[0] - expected[1]).mean() > 0.05 * np.abs(expected).mean()
    rel_err = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel_err < PARITY_RTOL, rel_err


@pytest.mark.parametrize("in_hw,out_hw", [((8, 8), (299, 299)), ((37, 45), (20, 61))])
def test_tf1_resize_matches_torch_fidelity(in_hw, out_hw):
    interp = _torch_fidelity_module("interpolate_compat_tensorflow")
    x = np.random.default_rng(2).uniform(0, 255, size=(2, 3, *in_hw)).astype(np.float32)
    expected = interp.interpolate_bilinear_2d_like_tensorflow1x(
        torch.from_numpy(x), size=out_hw, align_corners=False).numpy().transpose(0, 2, 3, 1)
    got = inception.bilinear_resize(jnp.asarray(x.transpose(0, 2, 3, 1)), *out_hw,
                                    half_pixel=False)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("in_hw,out_hw", [((8, 8), (299, 299)), ((37, 45), (20, 61))])
def test_half_pixel_resize_matches_torch_interpolate(in_hw, out_hw):
    x = np.random.default_rng(3).uniform(0, 255, size=(2, 3, *in_hw)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x), size=out_hw, mode="bilinear", align_corners=False)
    got = inception.bilinear_resize(jnp.asarray(x.transpose(0, 2, 3, 1)), *out_hw,
                                    half_pixel=True)
    np.testing.assert_allclose(np.asarray(got), expected.numpy().transpose(0, 2, 3, 1),
                               rtol=0, atol=1e-3)


@pytest.mark.parametrize("preprocessing", ["tf", "pytorch_fid"])
def test_preprocess_range_and_constant_image(preprocessing):
    # A constant image stays constant after resizing; white maps to 127/128 (tf) or 1.
    images = jnp.ones((1, 5, 7, 3))
    out = np.asarray(inception.preprocess(images, preprocessing))
    assert out.shape == (1, 299, 299, 3)
    expected = 127.0 / 128.0 if preprocessing == "tf" else 1.0
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_missing_weights_file_explains_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        inception.load_fid_inception(str(tmp_path / "absent.pth"))


def test_incomplete_or_foreign_state_dict_is_rejected(reference, tmp_path):
    _, path = reference
    state = {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
    missing = dict(state)
    del missing["Mixed_6c.branch7x7_2.bn.running_var"]
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(ValueError, match="Mixed_6c.branch7x7_2.bn.running_var"):
        inception.load_fid_inception(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "extra.npz", **state, **{"Mixed_8a.conv.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="Mixed_8a.conv.weight"):
        inception.load_fid_inception(str(tmp_path / "extra.npz"))


def test_zero_init_and_bad_preprocessing():
    model = inception.FIDInceptionV3(rngs=None)
    assert np.abs(np.asarray(model.Mixed_7c.branch_pool.conv.kernel[...])).max() == 0.0
    with pytest.raises(ValueError, match="preprocessing"):
        inception.FIDInceptionV3(preprocessing="bicubic")


def test_truncated_weights_file_names_the_file(tmp_path):
    pth, npz = str(tmp_path / "weights.pth"), str(tmp_path / "weights.npz")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, pth)
    np.savez(npz, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3), np.float32)})
    for path, what in ((pth, "PyTorch state_dict"), (npz, ".npz")):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        with pytest.raises(ValueError, match=rf"weights file '{path}' is not a readable {what}"):
            inception.load_fid_inception(path)
