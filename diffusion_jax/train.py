"""Training: the train state, a pure sharded train step, and the training loop.

Data flow::

    data iterator (host-local numpy [B/P, H, W, C])
      -> sharding.shard_batch   (global jax.Array [B, H, W, C] split over ("data", "fsdp"))
      -> train_step(state, batch) -> (state, metrics)   (one jax.jit, state donated)
      -> logs (stdout, TensorBoard), sample grids (EMA params), checkpoints (orbax)

The same jitted step, with explicit in/out shardings from the rules table in
``sharding.py``, runs on 1 CPU, 1 GPU and multi-host TPU pods.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from diffusion_jax import (checkpoint, data, generate, image_io, objectives, resume, schedules,
                           sharding, workdir_lock)

NUM_QUARTILES = 4
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """SIGTERM / SIGINT stopped training; checkpoint ``step`` was saved and committed.

    Attributes:
        signum: the signal received.
        step: the step saved (the run resumes from it).
        exit_code: ``128 + signum`` (143 for SIGTERM, 130 for SIGINT), the shell's convention.
    """

    def __init__(self, signum: int, step: int, directory: str):
        self.signum, self.step, self.exit_code = signum, step, 128 + signum
        super().__init__(f"{signal.Signals(signum).name} received: saved checkpoint {step} in "
                         f"{directory}; rerun the same command to resume from it.")


class TrainState(NamedTuple):
    """Everything a training run needs to continue exactly; a pytree.

    Attributes:
        step: int32 ``[]``, optimiser steps taken.
        params: ``nnx.State`` of the model's ``nnx.Param`` variables.
        opt_state: the optax state (moments share ``params``' structure).
        ema_params: one ``nnx.State`` per ``config.optim.ema_decays`` entry, same order.
        rng: uint32 key data ``[2]``; step ``s`` uses ``fold_in(rng, s)``.
    """

    step: jax.Array
    params: nnx.State
    opt_state: Any
    ema_params: tuple[nnx.State, ...]
    rng: jax.Array


def make_lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Learning rate per step: linear warmup 0 -> lr over ``warmup_steps``, then constant or
    cosine decay to 0 at ``train.num_steps``.

    Raises:
        ValueError: unknown ``optim.schedule``.
    """
    optim, total = config.optim, config.train.num_steps
    lr, warmup = optim.learning_rate, optim.warmup_steps
    if optim.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
    else:
        raise ValueError(f"optim.schedule={optim.schedule!r} must be 'constant' or 'cosine'.")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm gradient clipping (if ``optim.grad_clip > 0``) then Adam / AdamW.

    Raises:
        ValueError: unknown ``optim.name``.
    """
    optim, lr = config.optim, make_lr_schedule(config)
    if optim.name == "adam":
        opt = optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    elif optim.name == "adamw":
        opt = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                          weight_decay=optim.weight_decay)
    else:
        raise ValueError(f"optim.name={optim.name!r} must be 'adam' or 'adamw'.")
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), opt)
    return opt


def init_train_state(config: ml_collections.ConfigDict,
                     tx: optax.GradientTransformation) -> TrainState:
    """A fresh state: parameters from ``key(config.seed)``, EMAs equal to the parameters."""
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    params = nnx.state(objectives.build_model(config, nnx.Rngs(init_key)), nnx.Param)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        ema_params=tuple(jax.tree.map(jnp.copy, params) for _ in config.optim.ema_decays),
        rng=jax.random.key_data(train_key))


def abstract_train_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Shapes and shardings of the train state, without allocating it.

    Returns:
        ``(graphdef, abstract_state, shardings)``: the model's graph definition, the state
        as ``jax.ShapeDtypeStruct`` leaves carrying their sharding, and the same pytree of
        `NamedSharding` (for ``jax.jit``).
    """
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: objectives.build_model(config, nnx.Rngs(0))))
    shapes = jax.eval_shape(lambda: init_train_state(config, tx))
    shardings = sharding.state_shardings(shapes, mesh)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return graphdef, abstract, shardings


def create_train_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                       shardings: TrainState) -> TrainState:
    """`init_train_state`, compiled so every array is created directly in its sharding."""
    return jax.jit(lambda: init_train_state(config, tx), out_shardings=shardings)()


class Built(NamedTuple):
    """Everything one training setup compiles from a config (see `build`)."""

    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    abstract: TrainState  # shapes and dtypes of the state
    shardings: TrainState  # where each state array lives on the mesh
    tx: optax.GradientTransformation
    schedule: Any
    step_fn: Callable  # jitted ``step_fn(state, batch) -> (state, metrics)``, state donated

    def init_state(self, config: ml_collections.ConfigDict) -> TrainState:
        """A fresh state, created directly in its shardings."""
        return create_train_state(config, self.tx, self.shardings)


def build(config: ml_collections.ConfigDict, *, devices=None) -> Built:
    """Mesh, optimiser, state layout and the jitted train step of ``config``.

    The one construction path shared by `train_and_evaluate`, the tests and the benchmarks.
    Compilation happens at the first call of ``step_fn``.

    Args:
        config: the full config.
        devices: devices for the mesh (default: all).
    """
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    schedule = schedules.schedule_from_config(config.diffusion)
    tx = make_optimizer(config)
    graphdef, abstract, shardings = abstract_train_state(config, tx, mesh)
    step_fn = jit_train_step(make_train_step(graphdef, schedule, tx, config), mesh, shardings)
    return Built(mesh, graphdef, abstract, shardings, tx, schedule, step_fn)


def make_train_step(graphdef: nnx.GraphDef, schedule, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict) -> Callable:
    """The pure step ``train_step(state, batch) -> (state, metrics)``.

    With ``k = train.grad_accum_steps``, the batch ``[B, ...]`` is split into k micro-batches
    of ``B / k`` (example ``j`` goes to micro-batch ``j mod k``, so every device holds part of
    each), whose gradients are averaged in a ``lax.scan``: for equal-size micro-batches this
    equals the gradient of the mean loss over the whole batch. Then::

        params <- params + tx.update(grads)            (clip, Adam / AdamW, lr schedule)
        ema_d  <- d_n * ema_d + (1 - d_n) * params      for each d in optim.ema_decays

    where ``d_n = d``, or with ``optim.ema_warmup`` ``d_n = min(d, (1 + n) / (10 + n))`` at
    step ``n`` (0 for the first update; `ema_decay_at`).

    Randomness: ``key = fold_in(rng, step)``; micro-batch ``i`` uses ``fold_in(key, i)``,
    split into timestep/noise, dropout, label-dropout and SR-augmentation keys.

    Args:
        graphdef: the model's graph definition.
        schedule: the `DiscreteSchedule` (T steps).
        tx: the optimiser (from `make_optimizer`).
        config: the full config.

    The loss is that of ``config.train.objective`` (`diffusion_jax.objectives`).

    Returns:
        ``train_step``. ``batch`` is ``dict(image=[B, H, W, C], label=int32 [B])`` (plus
        ``input_ids`` for text objectives); metrics are scalars: ``loss``, ``grad_norm``
        (before clipping), ``learning_rate``, and for diffusion objectives
        ``loss_q0..loss_q3`` (`quartile_metrics`), else the objective's own metrics averaged
        over micro-batches.
    """
    objective = objectives.get(objectives.objective_of(config))
    loss_fn, is_diffusion = objective.make_loss_fn(graphdef, schedule, config), objective.is_diffusion
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    lr_fn = make_lr_schedule(config)
    decays = tuple(config.optim.ema_decays)
    warmup = bool(config.optim.get("ema_warmup", False))
    num_micro = config.train.grad_accum_steps

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grads, loss, aux = _accumulate_grads(grad_fn, state.params, batch, key, num_micro)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = tuple(ema_update(e, params, ema_decay_at(d, state.step, warmup))
                    for e, d in zip(state.ema_params, decays))
        if is_diffusion:  # aux = (per_example [k, B / k], t [k, B / k])
            extra = quartile_metrics(aux[0].reshape(-1), aux[1].reshape(-1),
                                     schedule.num_timesteps)
        else:  # aux = {name: [k]}
            extra = jax.tree.map(jnp.mean, aux)
        metrics = dict(loss=loss, grad_norm=optax.global_norm(grads),
                       learning_rate=lr_fn(state.step), **extra)
        return TrainState(state.step + 1, params, opt_state, ema, state.rng), metrics

    return train_step


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh,
                   state_shardings: TrainState) -> Callable:
    """``jax.jit`` of the step with explicit shardings; the input state is donated."""
    return jax.jit(
        train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def ema_decay_at(decay: float, step, warmup: bool):
    """The decay used by the update at step ``step`` (0-based): ``decay``, or with
    ``warmup`` ``min(decay, (1 + step) / (10 + step))`` (0.1 at step 0), the warm-up of
    TensorFlow's ``ExponentialMovingAverage(num_updates=...)``."""
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: nnx.State, params: nnx.State, decay: float) -> nnx.State:
    """Exponential moving average ``ema <- decay * ema + (1 - decay) * params``, leafwise."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def quartile_metrics(per_example: jax.Array, t: jax.Array,
                     num_timesteps: int) -> dict[str, jax.Array]:
    """Mean loss of the examples whose timestep lies in each quarter of [0, T).

    Quarter ``q = floor(4 t / T)``; ``loss_q{i} = sum_{q_b = i} l_b / #{b: q_b = i}``,
    NaN when no example falls in quarter i.

    Args:
        per_example: ``[B]`` losses.
        t: int ``[B]`` timesteps in {0, ..., T-1}.
        num_timesteps: T.

    Returns:
        ``{"loss_q0": [], ..., "loss_q3": []}``.
    """
    quarter = (t.astype(jnp.int32) * NUM_QUARTILES) // num_timesteps  # [B]
    member = quarter[:, None] == jnp.arange(NUM_QUARTILES)  # [B, 4]
    counts = member.sum(axis=0)
    sums = jnp.sum(jnp.where(member, per_example[:, None], 0.0), axis=0)
    means = jnp.where(counts > 0, sums / jnp.maximum(counts, 1), jnp.nan)
    return {f"loss_q{i}": means[i] for i in range(NUM_QUARTILES)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       resume_step: int | None = None) -> TrainState:
    """Trains per ``config`` in ``workdir``, resuming from its latest checkpoint if any.

    Logs every ``train.log_every`` steps (stdout, TensorBoard events in ``workdir``),
    writes a sample grid from the first EMA to ``workdir/samples/`` every
    ``train.eval_every`` steps and checkpoints every ``train.checkpoint_every`` steps and at
    the end (an interval of 0 means never; the final checkpoint is always written).

    Resuming checks the stored config (`resume.check_config`): fields that change what the
    weights mean must be equal; changed safe fields are logged.

    SIGTERM / SIGINT (e.g. a preempted Cloud TPU VM) finish the current step, save a
    checkpoint of the state and the data position, wait for it to commit and raise
    `TrainingInterrupted`; a second signal exits at once (``os._exit(128 + signum)``). With
    several processes, every step all-gathers the processes' signal flags (a few bytes), so
    all hosts stop after the same step and write the same checkpoint even when only one of
    them was signalled.

    Args:
        config: the full config.
        workdir: checkpoints, logs and samples go here.
        resume_step: resume from this checkpoint instead of the latest; newer checkpoints are
            moved to ``workdir/checkpoints_set_aside/`` (the way past a broken checkpoint).

    Raises:
        FloatingPointError: the loss or gradient norm became NaN/Inf; no checkpoint of the
            bad state is written (the last good one stays the latest).
        TrainingInterrupted: a stop signal arrived; a checkpoint was saved.
        resume.ResumeError: the stored config differs in unsafe fields, or the checkpoint to
            resume from is broken (the message names the newest intact step).
        checkpoint.CheckpointSaveError: a checkpoint could not be written or did not commit
            within ``train.checkpoint_timeout_s``.
        ValueError: inconsistent config (intervals, batch size vs. devices, accumulation, mesh).
        workdir_lock.WorkdirLockedError: another run is training in ``workdir`` (process 0
            holds ``WORKDIR/train.lock`` while training; see `diffusion_jax.workdir_lock`).
    """
    _check_intervals(config.train)
    _maybe_initialize_distributed(config.distributed)
    with _workdir_lock(workdir):
        config = objectives.prepare_config(config, workdir)
        with _StopSignals() as stop:
            run = _setup(config, workdir, resume_step)
            timeout_s = config.train.checkpoint_timeout_s
            try:
                state = _train_loop(config, workdir, run, stop)
            except BaseException:
                _close_after_error(run.manager, timeout_s)
                raise
            checkpoint.close(run.manager, timeout_s)
        results = objectives.final_evaluation(config, run.graphdef,
                                              generate.sampling_params(state), workdir)
    if results is not None:
        _log(f"Final evaluation ({objectives.EVAL_FILE}): {results}")
    return state


def _workdir_lock(workdir: str):
    """`workdir_lock.hold` on process 0 (the other processes of a multi-host run share its
    workdir and are started with it); a no-op context elsewhere."""
    if jax.process_index() == 0:
        return workdir_lock.hold(workdir)
    return contextlib.nullcontext()


class _Run(NamedTuple):
    """What the training loop needs, built once by `_setup`."""

    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    state: TrainState
    step_fn: Callable
    sample_fn: Callable | None
    data_iter: Any
    host_batch_fn: Callable | None
    manager: Any


def _setup(config, workdir, resume_step) -> _Run:
    """Mesh, state (restored or fresh), compiled step, sampler, data and checkpoints."""
    _check_batch(config)
    built = build(config)
    mesh, graphdef, schedule = built.mesh, built.graphdef, built.schedule
    manager = checkpoint.make_manager(
        workdir, max_to_keep=config.train.keep_checkpoints,
        async_checkpointing=config.train.async_checkpointing)
    data_iter = data.make_train_iterator(
        config.data, batch_size=config.train.batch_size, seed=config.seed)
    if manager.latest_step() is not None or resume_step is not None:
        state, data_state, changed = resume.restore_for_resume(
            manager, built.abstract, config, resume_step)
        data_iter.set_state(data_state)
        _log(f"Restored step {int(state.step)} from {manager.directory}.")
        if changed:
            _log(f"Changed config fields: {resume.describe_changes(changed)}.")
    else:
        state = built.init_state(config)
    objective = objectives.get(objectives.objective_of(config))
    host_batch_fn = objective.host_batch_fn and objective.host_batch_fn(config, workdir)
    sample_fn = None
    if objective.sample_fn is not None and config.train.eval_every > 0:
        sample_fn = objective.sample_fn(config, graphdef, schedule, mesh)
    num_params = sum(x.size for x in jax.tree.leaves(built.abstract.params))
    _log(f"Model: {num_params:,} parameters; mesh {dict(mesh.shape)}; "
         f"{jax.process_count()} process(es), {jax.device_count()} device(s).")
    return _Run(mesh, graphdef, state, built.step_fn, sample_fn, data_iter, host_batch_fn, manager)


def _train_loop(config, workdir, run: _Run, stop: "_StopSignals") -> TrainState:
    """Steps from the state's step to ``train.num_steps``; logs, samples and checkpoints."""
    cfg = config.train
    state, total = run.state, cfg.num_steps
    logger = _MetricLogger(workdir, cfg.batch_size, int(state.step), total)
    for done in range(int(state.step) + 1, total + 1):  # `done` = steps after this one
        batch = next(run.data_iter)
        if run.host_batch_fn is not None:  # e.g. captions -> token ids
            batch = run.host_batch_fn(batch, done - 1)
        batch = sharding.shard_batch(batch, run.mesh)
        state, metrics = run.step_fn(state, batch)
        logger.add(metrics)
        signum = _agreed_signal(stop)
        save = _due(done, cfg.checkpoint_every) or done == total or signum
        sample = run.sample_fn is not None and _due(done, cfg.eval_every) and not signum
        if save or sample or _due(done, cfg.log_every):
            logger.flush(done, last_checkpoint=run.manager.latest_step())
        if sample:
            _write_samples(workdir, run.sample_fn, state, config.seed, done, logger)
        if save:
            checkpoint.save(run.manager, state, step=done, data_state=run.data_iter.get_state(),
                            config=config, timeout_s=cfg.checkpoint_timeout_s)
        if signum:
            checkpoint.wait(run.manager, cfg.checkpoint_timeout_s)
            logger.close()
            raise TrainingInterrupted(signum, done, str(run.manager.directory))
    logger.close()
    return state


def _close_after_error(manager, timeout_s: float) -> None:
    """Lets earlier saves commit while an error propagates; a second error is only logged."""
    try:
        checkpoint.close(manager, timeout_s)
    except checkpoint.CheckpointSaveError as e:
        _log(f"Also: {e}")


def _due(done: int, every: int) -> bool:
    """Whether step ``done`` is a multiple of the interval ``every`` (0 = never)."""
    return every > 0 and done % every == 0


class _StopSignals:
    """Context that turns the first SIGTERM / SIGINT into a flag (``signum``) the loop polls.

    A second signal exits the process at once. Handlers can only be installed from the main
    thread; elsewhere (e.g. training in a worker thread) signals keep their default meaning.
    """

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if self.signum:
            print(f"{name} received again: aborting without saving.", file=sys.stderr, flush=True)
            os._exit(128 + signum)  # pylint: disable=protected-access
        self.signum = signum
        print(f"{name} received: finishing this step and saving a checkpoint (send it again to "
              f"abort at once).", file=sys.stderr, flush=True)


def _agreed_signal(stop: _StopSignals) -> int:
    """The stop signal, agreed by all processes (the largest signal number any host got)."""
    if jax.process_count() == 1:
        return stop.signum
    return int(np.max(multihost_utils.process_allgather(np.int32(stop.signum))))


class _MetricLogger:
    """Collects per-step metrics; on `flush` checks them for NaN/Inf, then logs the means."""

    def __init__(self, workdir: str, batch_size: int, start: int, total: int):
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        from tqdm import tqdm  # pylint: disable=g-import-not-at-top
        self.is_host0 = jax.process_index() == 0
        self.writer = SummaryWriter(workdir) if self.is_host0 else None
        self.bar = tqdm(total=total, initial=start, disable=not self.is_host0, desc="train")
        self.batch_size, self.pending, self.last = batch_size, [], (start, time.time())

    def add(self, metrics):
        self.pending.append(metrics)
        self.bar.update(1)

    def flush(self, step: int, last_checkpoint: int | None):
        history = jax.device_get(self.pending)
        self.pending = []
        for i, m in enumerate(history):
            _check_finite(m, step - len(history) + i + 1, last_checkpoint)
        means = {k: float(np.nanmean([m[k] for m in history])) for k in history[0]}
        (last_step, last_time), now = self.last, time.time()
        means["images_per_sec"] = (step - last_step) * self.batch_size / max(now - last_time, 1e-9)
        self.last = (step, now)
        self.bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{means['images_per_sec']:.1f}")
        _log(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in means.items()))
        if self.writer is not None:
            for k, v in means.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()

    def close(self):
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _accumulate_grads(grad_fn, params, batch, key, num_micro):
    """Mean loss and gradient over ``num_micro`` micro-batches (`make_train_step`).

    Returns ``(grads, loss, aux)`` with every ``aux`` leaf stacked over micro-batches ``[k, ...]``.
    """
    if num_micro == 1:
        (loss, aux), grads = grad_fn(params, batch, jax.random.fold_in(key, 0))
        return grads, loss, jax.tree.map(lambda a: a[None], aux)
    micro = jax.tree.map(  # [B, ...] -> [k, B / k, ...]; example j -> micro-batch j mod k
        lambda x: x.reshape((-1, num_micro) + x.shape[1:]).swapaxes(0, 1), batch)

    def body(grad_sum, inputs):
        i, mb = inputs
        (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, (loss, aux) = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro))
    grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
    return grads, jnp.mean(loss), aux


def _write_samples(workdir, sample_fn, state, seed, step, logger):
    """Samples with the first EMA (or the raw params) and writes ``samples/step_<step>.png``."""
    images = image_io.to_uint8(sample_fn(generate.sampling_params(state), jax.random.key(seed)))
    grid = image_io.image_grid(images)
    if logger.is_host0:
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        image_io.save_png(os.path.join(workdir, "samples", f"step_{step:07d}.png"), grid)
        logger.writer.add_image("samples", grid, step, dataformats="HWC")


def _check_finite(metrics, step, last_checkpoint):
    """Raises FloatingPointError if the loss or gradient norm of ``step`` is NaN/Inf."""
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not (np.isfinite(loss) and np.isfinite(grad_norm)):
        raise FloatingPointError(
            f"Non-finite training metrics at step {step}: loss={loss}, grad_norm={grad_norm}. "
            f"Training stopped without saving this state; the last good checkpoint is step "
            f"{last_checkpoint}. Lower optim.learning_rate, set optim.grad_clip, or check the data.")


def _check_intervals(train_cfg):
    """Intervals are >= 0 (0 = never), the step count >= 0, at least one checkpoint is kept."""
    for name in ("log_every", "eval_every", "checkpoint_every", "num_steps"):
        if train_cfg[name] < 0:
            raise ValueError(f"train.{name}={train_cfg[name]} must be >= 0 (0 = never).")
    if train_cfg.keep_checkpoints < 1:
        raise ValueError(f"train.keep_checkpoints={train_cfg.keep_checkpoints} must be >= 1.")
    if not train_cfg.checkpoint_timeout_s > 0:
        raise ValueError(
            f"train.checkpoint_timeout_s={train_cfg.checkpoint_timeout_s} must be > 0.")


def _check_batch(config):
    """Batch size must split evenly into micro-batches and over the devices."""
    b, k = config.train.batch_size, config.train.grad_accum_steps
    if k < 1 or b % k:
        raise ValueError(
            f"train.grad_accum_steps={k} must be >= 1 and divide train.batch_size={b}.")
    if b % jax.device_count():
        raise ValueError(
            f"train.batch_size={b} must be divisible by the number of devices "
            f"({jax.device_count()}).")


def _maybe_initialize_distributed(dist_cfg):
    """``jax.distributed.initialize`` (before any device use) when ``distributed.initialize``."""
    if not dist_cfg.initialize:
        return
    kwargs = {k: dist_cfg[k] for k in ("coordinator_address", "num_processes", "process_id")
              if dist_cfg[k] is not None}
    jax.distributed.initialize(**kwargs)


def _log(message: str):
    """Prints on host 0 without breaking the progress bar."""
    if jax.process_index() == 0:
        from tqdm import tqdm  # pylint: disable=g-import-not-at-top
        tqdm.write(message)
