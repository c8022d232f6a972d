"""The training loop: `train(TrainConfig) -> TrainResult`.

    from train.config import TrainConfig
    from train.loop import train
    result = train(TrainConfig(model="lenet5", model_kwargs={"input_padding": 2}, epochs=3,
                               out_dir="runs/lenet5"))
    result.best_accuracy, result.model          # best weights, eval mode

How a step runs (see `make_functions`): the data set lives on the device as uint8; each
update gathers its batch by index from a permutation that is a pure function of
(seed, epoch), augments it with per-example keys folded from (seed, step), and runs
`accumulate` forward/backward passes in a `lax.scan`, averaging the gradients before one
optax update. The jitted functions are pure, over `nnx.split` state: NNX's Python-side graph
handling happens once, at trace time, not on every step. Because nothing depends on the
host's history, a run resumed from a mid-epoch checkpoint repeats an uninterrupted one.

Outputs in `out_dir`: config.json, metrics.jsonl (one line per epoch), curves.png,
checkpoints/ (Orbax), and model/ (the best weights, `zoo.saving.save_model`, readable by
`zoo convert` and `zoo.saving.load_model`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train import augment, parallel
from train.checkpoint import Checkpoints
from train.config import TrainConfig
from zoo.pretrained import preprocess


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
        model: the best weights (EMA weights when ema_decay is set), in eval mode.
        best_accuracy: its validation accuracy (test accuracy when validation_examples is 0).
        best_step / best_epoch: when it was reached.
        test_accuracy: the best model's accuracy on the test split.
        final_weights: {dotted path: array} of the last step's raw (non-EMA) weights.
        history: the metrics.jsonl records.
        steps: updates done; seconds: wall time of this call, compile included.
        out_dir / model_dir: where files went (None without out_dir).
    """

    model: nnx.Module
    best_accuracy: float
    best_step: int
    best_epoch: float
    test_accuracy: float
    final_weights: dict[str, np.ndarray]
    history: list[dict[str, Any]]
    steps: int
    seconds: float
    out_dir: Path | None
    model_dir: Path | None


# ---------------------------------------------------------------------------------------------
# model construction


# XLA's backend optimizations take most of a CPU compile and buy nothing for code that runs once.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def init_model(config: TrainConfig, task) -> nnx.Module:
    """The network a run starts from, in train mode (a seam the tests replace)."""
    return task.build()


def split_model(model: nnx.Module):
    """(graphdef, params, RNG keys, RNG counts, other): "other" is what is neither a Param nor an
    RNG state (BatchNorm statistics). Keys never change; counts advance with every dropout mask."""
    return nnx.split(model, nnx.Param, nnx.RngKey, nnx.RngCount, ...)


def freeze_batchnorm(model: nnx.Module) -> int:
    """Make every nnx.BatchNorm use its running statistics in train mode too (dropout stays on).

    Returns the number of BatchNorm layers frozen."""
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
    for layer in layers:
        layer.use_running_average = True
    return len(layers)


def remat_blocks(model: nnx.Module) -> int:
    """Rematerialize each top-level block of `model.features` (an `nnx.List` counts as its items).

    The block's activations are dropped after the forward pass and recomputed in the backward
    pass: less memory, about one more forward pass of compute. Parameter paths do not change
    (the block's class is swapped for a subclass whose `__call__` runs under `nnx.remat`), so
    checkpoints and saved weights are the same as without remat. Returns the number of blocks.
    """
    backbone = getattr(model, "features", model)
    blocks = []
    for _, child in nnx.iter_children(backbone):
        if isinstance(child, nnx.List):
            blocks += [m for m in child if isinstance(m, nnx.Module)]
        elif isinstance(child, nnx.Module):
            blocks.append(child)
    for block in blocks:
        block.__class__ = _remat_class(type(block))
    return len(blocks)


_REMAT_CLASSES: dict[type, type] = {}


def _remat_class(cls: type) -> type:
    if getattr(cls, "_is_remat", False):
        return cls
    if cls not in _REMAT_CLASSES:
        plain_call = cls.__call__

        def __call__(self, *args):
            return nnx.remat(plain_call)(self, *args)

        _REMAT_CLASSES[cls] = type(f"Remat{cls.__name__}", (cls,), {"__call__": __call__, "_is_remat": True})
    return _REMAT_CLASSES[cls]


# ---------------------------------------------------------------------------------------------
# optimizer


def make_schedule(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    warmup = min(total_steps - 1, int(round(config.warmup_epochs * steps_per_epoch)))
    lr = config.learning_rate
    if config.schedule == "constant":
        return optax.constant_schedule(lr)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), max(total_steps, 1), end_value=0.0)
    # onecycle: cosine rise from lr/25 to lr over the warmup, cosine fall to lr/1e4 (Smith & Topin, 2017)
    return optax.cosine_onecycle_schedule(max(total_steps, 2), lr, pct_start=max(warmup, 1) / max(total_steps, 2),
                                          div_factor=25.0, final_div_factor=1e4)


def _decay_mask(params):
    # Weight decay on kernels only: biases and normalization scales/offsets (ndim <= 1) are not
    # capacity a regularizer should shrink.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    parts = []
    if config.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.optimizer == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=config.weight_decay, mask=_decay_mask))
    else:
        if config.weight_decay:
            parts.append(optax.add_decayed_weights(config.weight_decay, mask=_decay_mask))
        parts.append(optax.sgd(schedule, momentum=config.momentum, nesterov=True))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# the jitted functions


@dataclasses.dataclass(frozen=True)
class Functions:
    """The pure, jitted pieces of a run (built by `make_functions`)."""

    train_steps: Any   # (state, images, labels, order, n) -> (state, metrics (n, 3): loss, accuracy, lr)
    evaluate: Any      # (params, other, images, labels, mask) -> (loss sum, correct count)
    permutation: Any   # (epoch) -> (steps_per_epoch * batch_size,) int32 indices


def make_functions(config: TrainConfig, *, train_graphdef, eval_graphdef, rng_state, tx, schedule, num_classes: int,
                   num_train: int, steps_per_epoch: int, preprocessing: dict, mesh=None) -> Functions:
    """Build the jitted train/eval functions of a run.

    The train state is a dict {"step", "params", "other", "opt_state", "ema"}: "params" and
    "other" (BatchNorm statistics, anything not a Param or an RNG) are `nnx.State`s of the model.
    """
    compute_dtype = jnp.dtype(config.dtype)
    batch = config.batch_size
    micro = config.micro_batch_size
    k = config.accumulate
    # Keys are derived inside the jitted functions: eager key ops would each compile on their own.
    order_key = lambda: jax.random.fold_in(jax.random.key(config.seed), 0)  # noqa: E731
    step_key_root = lambda: jax.random.fold_in(jax.random.key(config.seed), 1)  # noqa: E731
    shard_batch = (lambda x: jax.lax.with_sharding_constraint(x, parallel.batch_sharded(mesh))) if mesh else (lambda x: x)

    def prepare_batch(images_uint8, keys=None):
        if keys is not None:  # augment in [0, 255] so the background stays exactly 0
            images_uint8 = augment.from_config(keys, images_uint8.astype(jnp.float32), config)
        return preprocess(images_uint8, preprocessing).astype(compute_dtype)

    def loss_fn(params, other, x, y, dropout_key):
        # Fresh Variables at this trace level (value_and_grad passes `other` through as is):
        # BatchNorm may only update statistics it created at the current trace level.
        other = jax.tree.map(lambda v: v, other)
        model = nnx.merge(train_graphdef, params, jax.tree.map(lambda v: v, rng_state), other)
        nnx.reseed(model, dropout=dropout_key)  # dropout masks: a pure function of (seed, step)
        logits = model(x).astype(jnp.float32)
        targets = optax.smooth_labels(jax.nn.one_hot(y, num_classes), config.label_smoothing) \
            if config.label_smoothing else jax.nn.one_hot(y, num_classes)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        new_other = nnx.split(model, nnx.Param, nnx.RngState, ...)[3]
        return loss, (new_other, (logits.argmax(-1) == y).mean())

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one_update(state, images, labels, order):
        step = state["step"]
        step_key = jax.random.fold_in(step_key_root(), step)
        start = (step % steps_per_epoch) * batch
        idx = jax.lax.dynamic_slice_in_dim(order, start, batch)
        keys = jax.random.split(jax.random.fold_in(step_key, 0), batch)  # one per example
        x = shard_batch(prepare_batch(images[idx], keys if augment.requested(config) else None))
        y = shard_batch(labels[idx])
        dropout_root = jax.random.fold_in(step_key, 1)

        def micro_step(carry, inputs):
            other, grad_sum = carry
            xm, ym, j = inputs
            (loss, (other, acc)), grads = grad_fn(state["params"], other, xm, ym, jax.random.fold_in(dropout_root, j))
            return (other, jax.tree.map(jnp.add, grad_sum, grads)), (loss, acc)

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        xs = (x.reshape(k, micro, *x.shape[1:]), y.reshape(k, micro), jnp.arange(k))
        (other, grad_sum), (losses, accs) = jax.lax.scan(micro_step, (state["other"], zeros), xs)
        grads = jax.tree.map(lambda g: g / k, grad_sum)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"step": step + 1, "params": params, "other": other, "opt_state": opt_state, "ema": state["ema"]}
        if config.ema_decay is not None:
            # The usual warmup of the decay: early averages do not drag in the random init.
            decay = jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))
            new_state["ema"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                                            state["ema"], {"params": params, "other": other})
        return new_state, jnp.stack([losses.mean(), accs.mean(), schedule(step)])

    def train_steps(state, images, labels, order, n):
        return jax.lax.scan(lambda s, _: one_update(s, images, labels, order), state, None, length=n)

    def evaluate(params, other, images, labels, mask):
        """images: (M, B, H, W, C) uint8, labels/mask: (M, B); sums over all M*B examples."""
        def one_batch(totals, inputs):
            xb, yb, mb = inputs
            model = nnx.merge(eval_graphdef, *jax.tree.map(lambda v: v, (params, rng_state, other)))
            logits = model(shard_batch(prepare_batch(xb))).astype(jnp.float32)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
            correct = (logits.argmax(-1) == yb) & mb
            return (totals[0] + jnp.sum(loss * mb), totals[1] + jnp.sum(correct)), None

        (loss_sum, correct), _ = jax.lax.scan(one_batch, (jnp.float32(0), jnp.int32(0)), (images, labels, mask))
        return loss_sum, correct

    def permutation(epoch):
        perm = jax.random.permutation(jax.random.fold_in(order_key(), epoch), num_train)
        return perm[: steps_per_epoch * batch].astype(jnp.int32)

    options = FAST_COMPILE if config.fast_compile else None
    return Functions(train_steps=jax.jit(train_steps, static_argnums=4, donate_argnums=0, compiler_options=options),
                     evaluate=jax.jit(evaluate, compiler_options=options),
                     permutation=jax.jit(permutation, compiler_options=FAST_COMPILE))


# ---------------------------------------------------------------------------------------------
# the run


def check_setup(config: TrainConfig) -> None:
    """Every check that needs no data and no compilation: settings, dataset and model names."""
    from train import data
    from zoo.registry import get_spec

    config.validate()
    data.get_source(config.dataset)
    get_spec(config.model)
    devices = jax.device_count() if config.data_parallel else 1
    if config.micro_batch_size % devices:
        raise ValueError(
            f"data_parallel splits each micro-batch of {config.micro_batch_size} examples over {devices} "
            f"devices; make batch_size / accumulate a multiple of {devices}")


def _host_rank_zero() -> bool:
    return jax.process_index() == 0


def _say(message: str) -> None:
    if _host_rank_zero():
        print(message, file=sys.stderr, flush=True)


def memory_check(model: nnx.Module, input_shape, config: TrainConfig) -> dict[str, Any] | None:
    """Print `zoo.summarize`'s training-memory estimate for one device's micro-batch; warn when it
    exceeds the device's memory. Returns the figures (None when zoo.summary is unavailable)."""
    try:
        from zoo.summary import summarize
    except ImportError:
        return None
    devices = jax.device_count() if config.data_parallel else 1
    per_device = config.micro_batch_size // devices
    try:
        summary = summarize(model, input_shape, batch_size=per_device, dtype=jnp.dtype(config.dtype), xla=False)
        estimate = int(summary.training_bytes())
    except Exception as e:  # the estimate is advice; never stop a run over it
        _say(f"memory estimate unavailable: {type(e).__name__}: {e}")
        return None
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    where = f"{device.platform} device memory"
    if not limit:  # CPU: the machine's RAM
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = "host RAM"
    _say(f"memory estimate (zoo.summarize, training, batch {per_device} per device): "
         f"{estimate / 2**20:,.1f} MiB of {limit / 2**30:,.1f} GiB {where}")
    if estimate > limit:
        _say("warning: the estimate exceeds the device's memory. Out-of-memory playbook: a smaller "
             "--batch-size with --accumulate K keeps the effective batch; --bf16 halves activations; "
             "--remat recomputes them; --data-parallel splits the batch over devices.")
    return {"estimate_bytes": estimate, "device_bytes": int(limit), "per_device_batch": per_device}


def _eval_arrays(images: np.ndarray, labels: np.ndarray, batch: int):
    n = len(images)
    m = max(1, math.ceil(n / batch))
    pad = m * batch - n
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
    mask = np.arange(m * batch) < n
    return (images.reshape(m, batch, *images.shape[1:]), labels.reshape(m, batch), mask.reshape(m, batch))


def _flat(state_tree) -> dict[str, np.ndarray]:
    return {".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path): np.asarray(leaf)
            for path, leaf in jax.tree.leaves_with_path(parallel.to_host(state_tree))}


def train(config: TrainConfig) -> TrainResult:
    """Train `config.model` on `config.dataset`; see the module docstring. Resumable, deterministic."""
    from train import data

    started = time.perf_counter()
    check_setup(config)
    source = data.get_source(config.dataset)
    preprocessing = data.preprocessing_record(config.dataset)

    # --- data: all of it on the device, uint8
    # TFDS slices ("train[:640]") read only what is needed: quick small runs and tests.
    train_x, train_y = data.load_arrays(
        config.dataset, f"train[:{config.train_examples}]" if config.train_examples else "train", config.data_dir)
    test_x, test_y = data.load_arrays(
        config.dataset, f"test[:{config.test_examples}]" if config.test_examples else "test", config.data_dir)
    val_x = val_y = None
    if config.validation_examples:
        if config.validation_examples >= len(train_x):
            raise ValueError(f"validation_examples={config.validation_examples} leaves no training data "
                             f"({len(train_x)} examples)")
        val_x, val_y = train_x[-config.validation_examples:], train_y[-config.validation_examples:]
        train_x, train_y = train_x[: -config.validation_examples], train_y[: -config.validation_examples]
    if config.batch_size > len(train_x):
        raise ValueError(f"batch_size={config.batch_size} is larger than the {len(train_x)} training examples")
    steps_per_epoch = len(train_x) // config.batch_size  # the incomplete last batch is dropped
    total_steps = config.epochs * steps_per_epoch
    stop_step = min(total_steps, config.max_steps) if config.max_steps else total_steps

    # --- model, optimizer, state
    # One compiled initializer instead of one eager compilation per weight initializer.
    model = init_model(config, source.image_shape, source.num_classes)
    memory_check(model, source.image_shape, config)
    model.eval()
    eval_graphdef = nnx.split(model, nnx.Param, nnx.RngState, ...)[0]  # no remat: no backward pass
    if config.remat:
        remat_blocks(model)
    model.train()
    train_graphdef, params, rng_state, other = nnx.split(model, nnx.Param, nnx.RngState, ...)
    schedule = make_schedule(config, total_steps, steps_per_epoch)
    tx = make_optimizer(config, schedule)
    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def initial_state(params, other):
        return {"step": jnp.int32(0), "params": params, "other": other, "opt_state": tx.init(params),
                # a copy: donating the state must not hand XLA the same buffer twice
                "ema": jax.tree.map(jnp.copy, {"params": params, "other": other})
                if config.ema_decay is not None else None}

    state = initial_state(params, other)
    mesh = parallel.make_mesh() if config.data_parallel else None
    state = parallel.put_replicated(state, mesh)
    local_rng_state, rng_state = rng_state, parallel.put_replicated(rng_state, mesh)
    fns = make_functions(config, train_graphdef=train_graphdef, eval_graphdef=eval_graphdef, rng_state=rng_state,
                         tx=tx, schedule=schedule, num_classes=source.num_classes, num_train=len(train_x),
                         steps_per_epoch=steps_per_epoch, preprocessing=preprocessing, mesh=mesh)
    images_dev, labels_dev = parallel.put_replicated((np.asarray(train_x), np.asarray(train_y)), mesh)
    eval_batch = min(config.eval_batch_size, max(len(test_x), 1))
    if mesh is not None:
        eval_batch = math.ceil(eval_batch / jax.device_count()) * jax.device_count()
    test_dev = parallel.put_replicated(_eval_arrays(test_x, test_y, eval_batch), mesh)
    val_dev = parallel.put_replicated(_eval_arrays(val_x, val_y, eval_batch), mesh) if val_x is not None else None

    # --- output directory, checkpoints, resume
    out_dir = Path(config.out_dir) if config.out_dir else None
    checkpoints = None
    history: list[dict[str, Any]] = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_or_write_config(out_dir, config)
        checkpoints = Checkpoints(out_dir / "checkpoints", keep=config.keep_checkpoints)
        restored = checkpoints.restore_latest(state) if config.resume else None
        if restored is None and checkpoints.latest.all_steps() and not config.resume:
            raise ValueError(f"{out_dir} already holds checkpoints of a run; pass resume=True (--resume) to "
                             f"continue it, or choose another out_dir")
        if restored is not None:
            step, state = restored
            _say(f"resuming from step {step} (epoch {step / steps_per_epoch:.2f}) in {out_dir}")
        history = _read_history(out_dir, before_step=int(parallel.to_host(state["step"])))

    def evaluate(split_arrays, weights):
        loss_sum, correct = fns.evaluate(weights["params"], weights["other"], *split_arrays)
        n = int(np.asarray(parallel.to_host(split_arrays[2])).sum())
        return float(parallel.to_host(loss_sum)) / n, int(parallel.to_host(correct)) / n

    # --- the loop
    step = int(parallel.to_host(state["step"]))
    progress = _progress_bar(config, total=stop_step, initial=step)
    epoch_losses, epoch_accs = [], []
    epoch_started = time.perf_counter()
    order, order_epoch = None, -1
    try:
        while step < stop_step:
            epoch = step // steps_per_epoch
            if order_epoch != epoch:
                order, order_epoch = fns.permutation(epoch), epoch
            n = min(config.steps_per_call, (epoch + 1) * steps_per_epoch - step, stop_step - step)
            if config.checkpoint_every:
                n = min(n, config.checkpoint_every - step % config.checkpoint_every)
            new_state, metrics = fns.train_steps(state, images_dev, labels_dev, order, n)
            metrics = np.asarray(parallel.to_host(metrics))
            if not np.isfinite(metrics[:, 0]).all():
                bad = step + int(np.argmin(np.isfinite(metrics[:, 0])))
                last = checkpoints.latest.latest_step() if checkpoints else None
                raise TrainingDiverged(
                    f"the loss became {metrics[:, 0][~np.isfinite(metrics[:, 0])][0]} at step {bad + 1} "
                    f"(epoch {bad // steps_per_epoch + 1}); the run stopped. "
                    + (f"The last good checkpoint (step {last}) is kept in {checkpoints.latest.directory}. "
                       if last is not None else "No checkpoint was written yet. ")
                    + f"Lower the learning rate (now {config.learning_rate}), add grad_clip_norm, or check the data.")
            state, step = new_state, step + n
            epoch_losses += list(metrics[:, 0])
            epoch_accs += list(metrics[:, 1])
            learning_rate = float(metrics[-1, 2])
            if progress is not None:
                progress.update(n)
                progress.set_postfix(epoch=epoch + 1, loss=f"{np.mean(epoch_losses[-50:]):.4f}",
                                     acc=f"{np.mean(epoch_accs[-50:]):.4f}", refresh=False)
            epoch_done = step % steps_per_epoch == 0 or step == stop_step
            if checkpoints and config.checkpoint_every and step % config.checkpoint_every == 0 and not epoch_done:
                checkpoints.save_latest(step, state)
            if epoch_done:
                record = _end_of_epoch(config, step, steps_per_epoch, state, evaluate, test_dev, val_dev,
                                       epoch_losses, epoch_accs, learning_rate, time.perf_counter() - epoch_started,
                                       time.perf_counter() - started)
                history.append(record)
                if checkpoints:
                    checkpoints.save_latest(step, state)
                    best_weights = state["ema"] if config.ema_decay is not None else state
                    checkpoints.save_best(step, {"params": best_weights["params"], "other": best_weights["other"]},
                                          record["selection_accuracy"])
                if out_dir is not None and _host_rank_zero():
                    _write_history(out_dir, history)
                    plot_curves(history, out_dir / "curves.png", title=f"{config.model} on {config.dataset}")
                if progress is not None:
                    progress.write(_format_record(record))
                else:
                    _say(_format_record(record))
                epoch_losses, epoch_accs = [], []
                epoch_started = time.perf_counter()
    finally:
        if progress is not None:
            progress.close()

    # --- the best weights, as a model
    final_weights = _flat({"params": state["params"], "other": state["other"]})
    weights = state["ema"] if config.ema_decay is not None else state
    best = {"params": weights["params"], "other": weights["other"]}
    best_step = step
    if checkpoints is not None:
        restored = checkpoints.restore_best(best)
        if restored is not None:
            best_step, best = restored
    test_loss, test_acc = evaluate(test_dev, best)
    best_record = next((r for r in history if r["step"] == best_step), None)
    best_accuracy = best_record["selection_accuracy"] if best_record else test_acc
    best_params, best_other = jax.tree.map(jnp.asarray, parallel.to_host((best["params"], best["other"])))
    model = nnx.merge(eval_graphdef, best_params, local_rng_state, best_other)
    model.eval()
    model_dir = None
    if out_dir is not None:
        if _host_rank_zero():
            model_dir = save_trained_model(model, out_dir / "model", config, source, test_acc, best_step,
                                           steps_per_epoch)
        checkpoints.close()
    return TrainResult(model=model, best_accuracy=best_accuracy, best_step=best_step,
                       best_epoch=best_step / steps_per_epoch, test_accuracy=test_acc,
                       final_weights=final_weights, history=history, steps=step,
                       seconds=time.perf_counter() - started, out_dir=out_dir, model_dir=model_dir)


def save_trained_model(model, directory: Path, config: TrainConfig, source, test_accuracy: float, step: int,
                       steps_per_epoch: int) -> Path:
    from train import data
    from zoo.saving import save_model

    metadata = {
        "dataset": config.dataset,
        "test_accuracy": test_accuracy,
        "preprocessing": data.preprocessing_record(config.dataset),
        "input_shape": list(source.image_shape),
        "step": step,
        "epoch": step / steps_per_epoch,
        "ema": config.ema_decay is not None,
        "train_config": config.to_dict(),
    }
    return save_model(model, directory, model_name=config.model,
                      kwargs=model_kwargs_for_saving(config, source.image_shape, source.num_classes),
                      metadata=metadata)


def _end_of_epoch(config, step, steps_per_epoch, state, evaluate, test_dev, val_dev, losses, accs, learning_rate,
                  epoch_seconds, wall_seconds) -> dict[str, Any]:
    record: dict[str, Any] = {
        "epoch": round(step / steps_per_epoch, 4), "step": step,
        "train_loss": float(np.mean(losses)) if losses else None,
        "train_accuracy": float(np.mean(accs)) if accs else None,
        "learning_rate": learning_rate,
    }
    record["test_loss"], record["test_accuracy"] = evaluate(test_dev, state)
    if val_dev is not None:
        record["val_loss"], record["val_accuracy"] = evaluate(val_dev, state)
    if config.ema_decay is not None:
        record["ema_test_loss"], record["ema_test_accuracy"] = evaluate(test_dev, state["ema"])
        if val_dev is not None:
            record["ema_val_loss"], record["ema_val_accuracy"] = evaluate(val_dev, state["ema"])
    prefix = "ema_" if config.ema_decay is not None else ""
    record["selection_accuracy"] = record[f"{prefix}val_accuracy" if val_dev is not None else f"{prefix}test_accuracy"]
    record["epoch_seconds"] = round(epoch_seconds, 3)
    record["wall_seconds"] = round(wall_seconds, 3)
    record["examples_per_second"] = round(len(losses) * config.batch_size / max(epoch_seconds, 1e-9), 1)
    return record


def _format_record(r: dict[str, Any]) -> str:
    parts = [f"epoch {r['epoch']:g}", f"step {r['step']}"]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "val_accuracy", "ema_test_accuracy"):
        if r.get(key) is not None:
            parts.append(f"{key} {r[key]:.4f}")
    parts.append(f"{r['epoch_seconds']:.1f}s")
    return "  ".join(parts)


def _progress_bar(config: TrainConfig, total: int, initial: int):
    if not config.progress or not _host_rank_zero():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=f"{config.model}")


# ---------------------------------------------------------------------------------------------
# files


def _check_or_write_config(out_dir: Path, config: TrainConfig) -> None:
    path = out_dir / "config.json"
    if path.is_file() and config.resume:
        saved = json.loads(path.read_text())
        mine = json.loads(config.to_json())
        changed = sorted(k for k in set(saved) | set(mine)
                         if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != mine.get(k))
        if changed:
            raise ValueError(
                f"cannot resume {out_dir}: these settings differ from the checkpointed run: "
                + ", ".join(f"{k} ({saved.get(k)!r} -> {mine.get(k)!r})" for k in changed))
    if _host_rank_zero():
        path.write_text(config.to_json())


def _read_history(out_dir: Path, before_step: int) -> list[dict[str, Any]]:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= before_step]


def _write_history(out_dir: Path, history: list[dict[str, Any]]) -> None:
    tmp = out_dir / ".metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, out_dir / "metrics.jsonl")


def plot_curves(history: list[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Loss and accuracy per epoch (train, test, validation, EMA), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "train"), ("test_loss", "test"), ("val_loss", "validation"),
                       ("ema_test_loss", "EMA test")):
        values = [r.get(key) for r in history]
        if any(v is not None for v in values):
            ax_loss.plot(epochs, values, marker="o", label=label)
    for key, label in (("train_accuracy", "train"), ("test_accuracy", "test"), ("val_accuracy", "validation"),
                       ("ema_test_accuracy", "EMA test")):
        values = [None if r.get(key) is None else 100 * r[key] for r in history]
        if any(v is not None for v in values):
            ax_acc.plot(epochs, values, marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    shown = [100 * r[k] for r in history for k in ("test_accuracy", "val_accuracy", "ema_test_accuracy")
             if r.get(k) is not None]
    if shown and min(shown) > 90:  # zoom on the part that matters once the model is good
        ax_acc.set_ylim(min(shown) - 0.5, 100.0)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
