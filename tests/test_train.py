"""Train step and loop: loss goes down, EMA / accumulation / quartiles / schedule match closed
forms, NaNs stop training without touching the last checkpoint."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from training_fixtures import micro_config

from diffusion_jax import checkpoint, data, objectives, schedules, sharding, train


def _setup(config):
    built = train.build(config)
    return built.mesh, built.init_state(config), built.step_fn, built.abstract


def _digit_batch(config, n=16, offset=0):
    images, labels = data.load_eval_images(config.data, offset + n)
    return {"image": images[offset:], "label": labels[offset:]}


def test_quartile_metrics_for_known_timesteps():
    t = jnp.array([0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 15, 14])  # T = 16: quarters of width 4
    loss = jnp.arange(12, dtype=jnp.float32)
    m = train.quartile_metrics(loss, t, 16)
    np.testing.assert_allclose([m[f"loss_q{i}"] for i in range(4)],
                               [np.mean([0, 1, 2, 3]), np.mean([4, 5, 6, 7]), np.nan,
                                np.mean([8, 9, 10, 11])])
    m = jax.jit(train.quartile_metrics, static_argnums=2)(jnp.array([1.0, 3.0]),
                                                          jnp.array([99, 0]), 100)
    np.testing.assert_allclose([m[f"loss_q{i}"] for i in range(4)], [3.0, np.nan, np.nan, 1.0])


@pytest.mark.parametrize("decay", [0.0, 0.9, 0.9999])
def test_ema_update_closed_form(decay):
    ema = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
    params = {"a": jnp.array([5.0, -2.0]), "b": jnp.array(0.0)}
    out = train.ema_update(ema, params, decay)
    np.testing.assert_allclose(out["a"], decay * np.array([1.0, 2.0]) + (1 - decay) * np.array(
        [5.0, -2.0]), rtol=1e-6)
    np.testing.assert_allclose(out["b"], decay * 3.0, rtol=1e-6)


@pytest.mark.parametrize("schedule, warmup, expected", [
    ("constant", 0, {0: 1e-3, 50: 1e-3, 100: 1e-3}),
    ("constant", 10, {0: 0.0, 5: 5e-4, 10: 1e-3, 90: 1e-3}),
    ("cosine", 10, {0: 0.0, 10: 1e-3, 55: 5e-4, 100: 0.0}),  # cosine over steps 10..100
])
def test_learning_rate_schedule(schedule, warmup, expected):
    config = micro_config()
    config.optim.learning_rate, config.optim.schedule = 1e-3, schedule
    config.optim.warmup_steps, config.train.num_steps = warmup, 100
    lr = train.make_lr_schedule(config)
    for step, value in expected.items():
        np.testing.assert_allclose(float(lr(step)), value, atol=1e-9)


def test_bad_optimizer_fields_are_named():
    config = micro_config()
    config.optim.name = "sgd"
    with pytest.raises(ValueError, match="optim.name"):
        train.make_optimizer(config)
    config = micro_config()
    config.optim.schedule = "linear"
    with pytest.raises(ValueError, match="optim.schedule"):
        train.make_lr_schedule(config)


def test_loss_decreases_and_ema_follows_params():
    config = micro_config()
    mesh, state, step_fn, _ = _setup(config)
    p0 = jax.device_get(state.params)
    batch = sharding.shard_batch(_digit_batch(config), mesh)
    state, metrics = step_fn(state, batch)
    p1 = jax.device_get(state.params)
    for decay, ema in zip(config.optim.ema_decays, jax.device_get(state.ema_params)):
        jax.tree.map(lambda e, a, b, d=decay: np.testing.assert_allclose(
            e, d * a + (1 - d) * b, rtol=1e-5, atol=1e-7), ema, p0, p1)
    assert int(state.step) == 1
    np.testing.assert_allclose(metrics["learning_rate"], config.optim.learning_rate, rtol=1e-6)
    losses = [float(metrics["loss"])]
    for _ in range(39):
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), losses


def _deterministic_loss(denoise, sched, x0, key, **_):
    """A per-example loss with t and noise fixed by the example itself (no key), so a batch
    and its micro-batches see the same targets."""
    del key
    t = (jnp.abs(x0).sum(axis=(1, 2, 3)) * 7).astype(jnp.int32) % sched.num_timesteps
    noise = jnp.sin(3.0 * x0 + 1.0)
    ab = sched.alphas_cumprod[t][:, None, None, None]
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise
    per_example = jnp.mean(jnp.square(denoise(x_t, t) - noise), axis=(1, 2, 3))
    return jnp.mean(per_example), per_example, t


def test_grad_accumulation_equals_one_big_batch(monkeypatch):
    monkeypatch.setattr(objectives.losses, "denoising_loss", _deterministic_loss)
    results = []
    for k in (1, 2):
        config = micro_config()
        config.model.dropout = 0.0
        config.train.grad_accum_steps = k
        mesh, state, step_fn, _ = _setup(config)
        state, metrics = step_fn(state, sharding.shard_batch(_digit_batch(config), mesh))
        results.append((jax.device_get(state), jax.device_get(metrics)))
    (big, m_big), (acc, m_acc) = results
    for key in ("loss", "grad_norm", "loss_q0", "loss_q1", "loss_q2", "loss_q3"):
        np.testing.assert_allclose(m_acc[key], m_big[key], rtol=1e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), acc, big)


def test_sr_training_conditions_on_the_upsampled_low_res_image(monkeypatch):
    """cond_image_channels > 0: the loss is the model's given bicubic(area_mean_2x2(x0))."""
    monkeypatch.setattr(objectives.losses, "denoising_loss", _deterministic_loss)
    config = micro_config()
    config.model.dropout = 0.0
    config.model.cond_image_channels = config.data.num_channels  # sr.factor = 2, no augmentation
    mesh, state, step_fn, _ = _setup(config)
    batch = _digit_batch(config)
    state, _ = step_fn(state, sharding.shard_batch(batch, mesh))  # zero-init output conv moves
    params = jax.device_get(state.params)
    _, metrics = step_fn(state, sharding.shard_batch(batch, mesh))

    model = nnx.merge(nnx.graphdef(objectives.build_model(config, rngs=nnx.Rngs(0))), params)
    x0 = jnp.asarray(batch["image"])                                       # [16, 8, 8, 1]
    low = x0.reshape(16, 4, 2, 4, 2, 1).mean(axis=(2, 4))                  # [16, 4, 4, 1]
    sched = schedules.schedule_from_config(config.diffusion)
    loss_of = jax.jit(lambda c: _deterministic_loss(
        lambda x, t: model(x, t, {"image": c}), sched, x0, None)[0])
    losses = [float(loss_of(c))
              for c in (jax.image.resize(low, x0.shape, "bicubic"), jnp.zeros_like(x0))]
    np.testing.assert_allclose(metrics["loss"], losses[0], rtol=1e-5)
    assert abs(losses[1] - losses[0]) > 1e-4 * losses[0]  # the condition changes the loss


class _NanAfter:
    """Wraps a data iterator; batches after the first ``n`` have NaN images."""

    def __init__(self, it, n):
        self.it, self.n = it, n

    def __next__(self):
        batch = next(self.it)
        if self.it.get_state()["next_index"] > self.n:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    config = micro_config()
    good = jax.device_get(train.train_and_evaluate(config, workdir))  # steps 1-4, saves 2, 4
    make_iterator = data.make_train_iterator
    monkeypatch.setattr(train.data, "make_train_iterator",
                        lambda *a, **kw: _NanAfter(make_iterator(*a, **kw), 4))
    config.unlock().train.num_steps = 8
    with pytest.raises(FloatingPointError, match=r"step 5: loss=nan.*last good checkpoint is "
                                                 r"step 4"):
        train.train_and_evaluate(config, workdir)
    manager = checkpoint.make_manager(workdir, create=False)
    assert manager.all_steps() == [2, 4]
    _, abstract, _ = train.abstract_train_state(
        config, train.make_optimizer(config), sharding.make_mesh(config.mesh))
    restored, data_state = checkpoint.restore(manager, abstract)
    assert data_state == {"next_index": 4}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), good)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2", "4"] or sorted(
        os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_ema_decay_at_warms_up_then_holds_the_decay():
    np.testing.assert_allclose(train.ema_decay_at(0.999, 0, True), 0.1)
    np.testing.assert_allclose(train.ema_decay_at(0.999, 90, True), 91 / 100, rtol=1e-6)
    np.testing.assert_allclose(train.ema_decay_at(0.9, 10 ** 6, True), 0.9, rtol=1e-6)
    assert train.ema_decay_at(0.999, 0, False) == 0.999


def test_ema_warmup_step_mixes_params_with_warmed_up_decay():
    config = micro_config()
    config.optim.ema_decays, config.optim.ema_warmup = (0.999,), True
    mesh, state, step_fn, _ = _setup(config)
    batch = sharding.shard_batch(_digit_batch(config), mesh)
    params = [jax.device_get(state.params)]
    ema = jax.device_get(state.ema_params[0])
    for n in range(3):  # hand-computed EMA with d_n = (1 + n) / (10 + n)
        state, _ = step_fn(state, batch)
        params.append(jax.device_get(state.params))
        d = (1 + n) / (10 + n)
        ema = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, ema, params[-1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(state.ema_params[0]), ema)
    # Without warm-up, 0.999 would keep ~99.7 % of the initial weights after three steps.
    moved = jax.tree.map(lambda e, p0, p3: np.abs(e - p0).sum() / max(np.abs(p3 - p0).sum(), 1e-12),
                         ema, params[0], params[-1])
    assert min(jax.tree.leaves(moved)) > 0.5
