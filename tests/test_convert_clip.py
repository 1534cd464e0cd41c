"""transformers CLIPModel (random tiny weights, saved to disk) -> our CLIPModel: text and image
embeddings and logits match PyTorch; the converted component round-trips through orbax."""
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from diffusion_jax.convert import clip as convert_clip  # noqa: E402
from diffusion_jax.convert import common  # noqa: E402
from diffusion_jax import metrics_clip  # noqa: E402
from diffusion_jax.models import clip_vision  # noqa: E402
from sd_fixtures import write_vocab  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=526, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, bos_token_id=524, eos_token_id=525,
                         pad_token_id=525),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=24, intermediate_size=40,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # non-trivial norms and scale so a missed parameter shows
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(2.0)
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    write_vocab(path / "tokenizer", {"model_max_length": 16})  # ids: bos 524, eos 525
    return model, str(path)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 520, size=(3, 10))
    ids[:, 0], ids[0, 6], ids[1, 9], ids[2, 3] = 524, 525, 525, 525  # eos at varied positions
    images = rng.uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
    return ids, images


def test_converted_clip_matches_transformers(checkpoint):
    ref, path = checkpoint
    ours, record = convert_clip.load_transformers(path)
    ids, images = _inputs()
    mean = np.asarray(clip_vision.OPENAI_CLIP_MEAN, np.float32)
    std = np.asarray(clip_vision.OPENAI_CLIP_STD, np.float32)
    pixels = ((images + 1) / 2 - mean) / std                            # CLIP's processor
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(
            pixels.transpose(0, 3, 1, 2)))
    got = nnx.jit(lambda m, i, x: m(i, x))(ours, ids, images)
    np.testing.assert_allclose(got.text_embeds, out.text_embeds.numpy(), atol=2e-5)
    np.testing.assert_allclose(got.image_embeds, out.image_embeds.numpy(), atol=2e-5)
    np.testing.assert_allclose(got.logits_per_image, out.logits_per_image.numpy(), atol=2e-4)
    assert record["kwargs"]["vision"]["patch_size"] == 8


def test_gray_and_resized_inputs(checkpoint):
    ref, path = checkpoint
    ours, _ = convert_clip.load_transformers(path)
    gray = np.random.default_rng(1).uniform(-1, 1, size=(2, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(ours.encode_image(gray),
                               ours.encode_image(np.repeat(gray, 3, axis=-1)), atol=1e-6)
    small = ours.encode_image(gray[:, ::2, ::2])                       # 16 -> 32 bicubic
    assert small.shape == (2, 16) and np.all(np.isfinite(small))


def test_round_trip_and_errors(checkpoint, tmp_path):
    _, path = checkpoint
    ours, record = convert_clip.load_transformers(path)
    common.save_component(tmp_path / "converted", ours, record)
    again, _ = convert_clip.load_converted(tmp_path / "converted")
    ids, images = _inputs(2)
    np.testing.assert_array_equal(again.encode_text(ids), ours.encode_text(ids))
    bad = common.read_json(f"{path}/config.json", "x")
    bad["vision_config"]["use_bogus"] = 1
    with pytest.raises(ValueError, match="use_bogus"):
        convert_clip.config_to_kwargs(bad)
    with pytest.raises(FileNotFoundError):
        convert_clip.load_transformers(tmp_path / "nothing")


def test_clip_score_with_converted_checkpoint_matches_transformers(checkpoint):
    ref, path = checkpoint
    model, tok = metrics_clip.load_clip(path)
    texts = ["hello cat", "a photo"]
    ids = tok(texts)
    assert ids[0, 0] == 524 and 525 in ids[0]
    _, images = _inputs(3)
    pixels = ((images + 1) / 2 - np.asarray(clip_vision.OPENAI_CLIP_MEAN, np.float32)) / \
        np.asarray(clip_vision.OPENAI_CLIP_STD, np.float32)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids, dtype=torch.long),
                  pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
    cos = (out.image_embeds * out.text_embeds).sum(-1).numpy()
    expected = np.mean(np.maximum(100 * cos, 0))
    got = metrics_clip.clip_score(model, tok, images, texts)
    assert got == pytest.approx(expected, abs=2e-3)
    image_fn, text_fn = metrics_clip.clip_embedders(model, tok)
    np.testing.assert_allclose(image_fn(images), out.image_embeds.numpy(), atol=2e-5)
    np.testing.assert_allclose(text_fn(texts), out.text_embeds.numpy(), atol=2e-5)
