"""The training loop: `train(TrainConfig) -> TrainResult`, one loop for every task.

    from train.config import TrainConfig
    from train.loop import train
    result = train(TrainConfig(model="lenet5", model_kwargs={"input_padding": 2}, epochs=3,
                               out_dir="runs/lenet5"))
    result.best_score, result.test_metrics, result.model      # best weights, eval mode

The data set picks the task (`train.tasks`): classification (loss, accuracy, augmentation) or
segmentation (FCN-32s/16s/8s on random crops, per-pixel loss, mean IU); the loop is the same.

How a step runs (see `make_functions`): the data set lives on the device as uint8; each update
gathers its batch by index from the epoch's data order, which is the (epoch + 1)-th permutation
of `np.random.default_rng(seed)`; the task augments (or crops) it with the per-example keys
`jax.random.split(jax.random.fold_in(jax.random.key(seed), step), batch)`; dropout draws from
the model's own RNG streams (`nnx.Rngs(params=seed, dropout=seed + 1)` at creation), whose counts
travel in the train state. `accumulate` forward/backward passes run in a `lax.scan`, averaging the
gradients before one optax update. The jitted functions are pure, over `nnx.split` state: NNX's
Python-side graph handling happens once, at trace time, not on every step. Because nothing
depends on the host's history, a run resumed from a mid-epoch checkpoint repeats an uninterrupted
one.

For one float32 device and accumulate=1 this is, step for step, the update that trained every
shipped classifier (the former `train.recipes.train_minimal`, kept as the reference of
tests/test_train_equivalence.py). With accumulate > 1 the micro-batches draw their dropout masks
one after another and BatchNorm normalizes each micro-batch by its own statistics, and with
data_parallel XLA may sum the gradients in another order, so those numbers differ from it
(accumulation equals the whole batch exactly only for models without BatchNorm and dropout).

Outputs in `out_dir`: config.json, metrics.jsonl (one line per epoch), curves.png,
checkpoints/ (Orbax), and model/ (the best weights: `zoo.saving.save_model` for a classifier,
readable by `zoo convert` and `zoo.saving.load_model`; `convert.save_segmentation` for a
segmentation net).
"""

from __future__ import annotations

import dataclasses
import functools
import json
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

from train import parallel, tasks
from train.checkpoint import Checkpoints
from train.config import TrainConfig


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
        model: the best weights (EMA weights when ema_decay is set), in eval mode.
        metric: the selection metric, "accuracy" (classification) or "mean_iou" (segmentation).
        best_score: the best model's validation score (test score when validation_examples is 0).
        best_step / best_epoch: when it was reached.
        test_metrics: the best model's scores on the test split: {"loss", "accuracy"}, or
            {"loss", "pixel_accuracy", "mean_iou", "class_iou"}.
        final_weights: {dotted path: array} of the last step's raw (non-EMA) weights.
        history: the metrics.jsonl records.
        steps: updates done; seconds: wall time of this call, compile included.
        out_dir / model_dir: where files went (None without out_dir).
    """

    model: nnx.Module
    metric: str
    best_score: float
    best_step: int
    best_epoch: float
    test_metrics: dict[str, Any]
    final_weights: dict[str, np.ndarray]
    history: list[dict[str, Any]]
    steps: int
    seconds: float
    out_dir: Path | None
    model_dir: Path | None

    @property
    def test_accuracy(self) -> float:
        """Test accuracy (classification) or pixel accuracy (segmentation) of the returned model."""
        return self.test_metrics.get("accuracy", self.test_metrics.get("pixel_accuracy"))

    @property
    def best_accuracy(self) -> float:
        """`best_score` under its classification name."""
        return self.best_score


# ---------------------------------------------------------------------------------------------
# model construction


# XLA's backend optimizations take most of a CPU compile and buy nothing for code that runs once.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def init_model(config: TrainConfig, task) -> nnx.Module:
    """The network a run starts from (a seam the tests replace): `task.build()`."""
    return task.build()


def split_model(model: nnx.Module):
    """(graphdef, params, RNG keys, RNG counts, other): "other" is what is neither a Param nor an
    RNG state (BatchNorm statistics). Keys never change; a stream's count advances with each draw."""
    return nnx.split(model, nnx.Param, nnx.RngKey, nnx.RngCount, ...)


def freeze_batchnorm(model: nnx.Module) -> int:
    """Make every nnx.BatchNorm normalize with its running statistics in train mode too (dropout
    stays active): a segmentation net keeps its classifier's statistics. Returns how many."""
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
    for layer in layers:
        layer.use_running_average = True
    return len(layers)


def remat_blocks(model: nnx.Module) -> int:
    """Rematerialize each top-level block of the backbone, `model.features` (a classifier) or
    `model.backbone` (a segmentation net); an `nnx.List` counts as its items.

    The block's activations are dropped after the forward pass and recomputed in the backward
    pass: less memory, about one more forward pass of compute. Parameter paths do not change
    (the block's class is swapped for a subclass whose `__call__` runs under `nnx.remat`), so
    checkpoints and saved weights are the same as without remat. Returns the number of blocks.
    """
    backbone = next((b for b in (getattr(model, "features", None), getattr(model, "backbone", None))
                     if isinstance(b, nnx.Module)), model)
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

    train_steps: Any   # (state, arrays, order, n) -> (state, metrics (n, 3): loss, train metric, lr)
    evaluate: Any      # (params, other, images, labels, mask) -> the task's totals


def step_keys(seed: int, step, batch: int):
    """(batch,) per-example keys of update `step`: augmentation (classification) or crops (segmentation)."""
    return jax.random.split(jax.random.fold_in(jax.random.key(seed), step), batch)


def epoch_order(seed: int, epoch: int, num_train: int, length: int) -> np.ndarray:
    """The data order of `epoch`: the (epoch + 1)-th permutation drawn from np.random.default_rng(seed).

    One permutation per epoch in sequence, as the loop that trained the shipped weights drew them;
    recomputed from a fresh generator, so resuming needs no generator state. (length,) int32.
    """
    rng = np.random.default_rng(seed)
    for _ in range(epoch):
        rng.permutation(num_train)
    return rng.permutation(num_train)[:length].astype(np.int32)


def make_functions(config: TrainConfig, task, *, train_graphdef, eval_graphdef, rng_keys, rng_counts, tx, schedule,
                   steps_per_epoch: int, mesh=None) -> Functions:
    """Build the jitted train/eval functions of a run.

    The train state is a dict {"step", "params", "rng_counts", "other", "opt_state", "ema"}:
    "params", "rng_counts" and "other" are `nnx.State`s of the model (`split_model`). The RNG keys,
    which never change, are closed over (`rng_counts`, the initial counts, only serve evaluation,
    which draws no random numbers). "ema" is {"params", "other"}, or None without ema_decay.
    """
    batch, micro, k = config.batch_size, config.micro_batch_size, config.accumulate
    fresh = lambda tree: jax.tree.map(lambda v: v, tree)  # noqa: E731

    def shard_batch(x):
        return jax.lax.with_sharding_constraint(x, parallel.batch_sharded(mesh)) if mesh is not None else x

    def loss_fn(params, counts, other, x, y):
        # Fresh Variables at this trace level (value_and_grad passes the rest through as is):
        # BatchNorm may only update statistics, and dropout only counts, created at this level.
        model = nnx.merge(train_graphdef, params, fresh(rng_keys), fresh(counts), fresh(other))
        loss, metric = task.loss(model(x).astype(jnp.float32), y)
        _, _, _, counts, other = split_model(model)
        return loss, (counts, other, metric)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one_update(state, arrays, order):
        step = state["step"]
        idx = jax.lax.dynamic_slice_in_dim(order, (step % steps_per_epoch) * batch, batch)
        x, y = task.batch(arrays, idx, step_keys(config.seed, step, batch))
        x, y = shard_batch(x), shard_batch(y)

        def micro_step(carry, inputs):
            counts, other, grad_sum = carry
            (loss, (counts, other, metric)), grads = grad_fn(state["params"], counts, other, *inputs)
            return (counts, other, jax.tree.map(jnp.add, grad_sum, grads)), (loss, metric)

        if k == 1:  # no loop: XLA:CPU compiles a step inside a scan into slower code (see train_steps)
            (loss, (counts, other, metric)), grads = grad_fn(state["params"], state["rng_counts"], state["other"],
                                                             x, y)
            losses, metrics = loss[None], metric[None]
        else:
            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            xs = (x.reshape(k, micro, *x.shape[1:]), y.reshape(k, micro, *y.shape[1:]))
            (counts, other, grad_sum), (losses, metrics) = jax.lax.scan(
                micro_step, (state["rng_counts"], state["other"], zeros), xs)
            grads = jax.tree.map(lambda g: g / k, grad_sum)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"step": step + 1, "params": params, "rng_counts": counts, "other": other,
                     "opt_state": opt_state, "ema": state["ema"]}
        if config.ema_decay is not None:
            # The usual warmup of the decay: early averages do not drag in the random init.
            decay = jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))
            new_state["ema"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                                            state["ema"], {"params": params, "other": other})
        return new_state, jnp.stack([losses.mean(), metrics.mean(), schedule(step)])

    def train_steps(state, arrays, order, n):
        if n == 1:
            # One update, not a scan of length one: XLA:CPU compiles the same step inside a scan into
            # slower code even when the loop is unrolled (EfficientNet-B0's step 4x slower, an MNIST
            # net's 2.5x; docs/BENCHMARKS.md, "The loop's update inside lax.scan"). steps_per_call > 1
            # still loops.
            state, metrics = one_update(state, arrays, order)
            return state, metrics[None]
        return jax.lax.scan(lambda s, _: one_update(s, arrays, order), state, None, length=n)

    def evaluate(params, other, images, labels, mask):
        """images: (M, B, ...) uint8, labels: (M, B, ...), mask: (M, B); the task's totals over all."""
        def one_batch(totals, inputs):
            xb, yb, mb = inputs
            model = nnx.merge(eval_graphdef, *fresh((params, rng_keys, rng_counts, other)))
            logits = model(shard_batch(task.inputs(xb))).astype(jnp.float32)
            return jax.tree.map(jnp.add, totals, task.eval_totals(logits, yb, mb)), None

        totals, _ = jax.lax.scan(one_batch, task.zero_totals(), (images, labels, mask))
        return totals

    options = FAST_COMPILE if config.fast_compile else None
    return Functions(train_steps=jax.jit(train_steps, static_argnums=3, donate_argnums=0, compiler_options=options),
                     evaluate=jax.jit(evaluate, compiler_options=options))


# ---------------------------------------------------------------------------------------------
# the run


def check_setup(config: TrainConfig) -> str:
    """Every check that needs no data and no compilation: settings, dataset and model names, the
    options of the data set's task. Returns the task's name."""
    from zoo.registry import get_spec

    config.validate()
    task_name = tasks.check_config(config)
    get_spec(config.model)
    check_out_dir(config)
    devices = jax.device_count() if config.data_parallel else 1
    if config.micro_batch_size % devices:
        raise ValueError(
            f"data_parallel splits each micro-batch of {config.micro_batch_size} examples over {devices} "
            f"devices; make batch_size / accumulate a multiple of {devices}")
    return task_name


RUN_FILES = {"config.json", "metrics.jsonl", "curves.png", "checkpoints", "model", ".metrics.jsonl.tmp"}


def check_out_dir(config: TrainConfig) -> None:
    """Refuse, before anything is written, an out_dir this run may not write into.

    A new or empty directory is fine. With resume, it must hold a run with checkpoints (its
    config.json is compared with this one's later). Without resume, a directory holding anything
    is refused: a run's files would be overwritten, anything else is not ours to touch.
    """
    if config.out_dir is None:
        return
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a directory; choose another --out")
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    steps = [p for p in (out_dir / "checkpoints" / "latest").glob("*") if p.name.isdigit()] if held else []
    if config.resume:
        if not steps:
            raise ValueError(f"--resume: {out_dir} holds no checkpoint of a run to resume "
                             + ("(it does not exist)" if not out_dir.exists() else "(no checkpoints/latest/<step>)")
                             + "; drop --resume to start a new run there")
        return
    if held:
        what = "a training run" if set(held) & RUN_FILES else "files that are not a training run"
        hint = "pass --resume to continue it" if steps else "choose a new --out"
        raise ValueError(f"--out {out_dir} already holds {what} ({', '.join(held[:5])}"
                         f"{', ...' if len(held) > 5 else ''}); {hint}, or choose another --out. Nothing was written.")


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


def _flat(state_tree) -> dict[str, np.ndarray]:
    return {".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path): np.asarray(leaf)
            for path, leaf in jax.tree.leaves_with_path(parallel.to_host(state_tree))}


def train(config: TrainConfig) -> TrainResult:
    """Train `config.model` (or a segmentation net on it) on `config.dataset`; see the module
    docstring. Resumable, deterministic."""
    started = time.perf_counter()
    check_setup(config)
    task = tasks.make_task(config)

    # --- data: all of it on the device, uint8
    train_arrays = task.load("train", config.train_examples)
    test_arrays = task.load("test", config.test_examples)
    val_arrays = None
    if config.validation_examples:
        if config.validation_examples >= len(train_arrays[0]):
            raise ValueError(f"validation_examples={config.validation_examples} leaves no training data "
                             f"({len(train_arrays[0])} examples)")
        val_arrays = tuple(a[-config.validation_examples:] for a in train_arrays)
        train_arrays = tuple(a[: -config.validation_examples] for a in train_arrays)
    num_train = len(train_arrays[0])
    if config.batch_size > num_train:
        raise ValueError(f"batch_size={config.batch_size} is larger than the {num_train} training examples")
    steps_per_epoch = num_train // config.batch_size  # the incomplete last batch is dropped
    total_steps = config.epochs * steps_per_epoch  # the schedule's length, with or without max_steps
    stop_step = min(total_steps, config.max_steps) if config.max_steps else total_steps

    # --- model, optimizer, state
    model = init_model(config, task)
    memory_check(model, task.image_shape, config)
    model.eval()
    eval_graphdef = split_model(model)[0]  # no remat: no backward pass
    if config.remat:
        remat_blocks(model)
    model.train()
    if tasks.freezes_batchnorm(config):
        freeze_batchnorm(model)
    train_graphdef, params, rng_keys, rng_counts, other = split_model(model)
    schedule = make_schedule(config, total_steps, steps_per_epoch)
    tx = make_optimizer(config, schedule)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def initial_state(params, rng_counts, other):
        return {"step": jnp.int32(0), "params": params, "rng_counts": rng_counts, "other": other,
                "opt_state": tx.init(params),
                # a copy: donating the state must not hand XLA the same buffer twice
                "ema": jax.tree.map(jnp.copy, {"params": params, "other": other})
                if config.ema_decay is not None else None}

    state = initial_state(params, rng_counts, other)
    mesh = parallel.make_mesh() if config.data_parallel else None
    state = parallel.put_replicated(state, mesh)
    fns = make_functions(config, task, train_graphdef=train_graphdef, eval_graphdef=eval_graphdef,
                         rng_keys=parallel.put_replicated(rng_keys, mesh),
                         rng_counts=parallel.put_replicated(rng_counts, mesh), tx=tx, schedule=schedule,
                         steps_per_epoch=steps_per_epoch, mesh=mesh)
    arrays_dev = parallel.put_replicated(tuple(np.asarray(a) for a in train_arrays), mesh)

    def eval_split(arrays):
        batch = task.eval_batch_size(arrays)
        if mesh is not None:
            batch = -(-batch // jax.device_count()) * jax.device_count()
        return parallel.put_replicated(tasks.eval_arrays(arrays, batch), mesh)

    test_dev = eval_split(test_arrays)
    val_dev = eval_split(val_arrays) if val_arrays is not None else None

    # --- output directory, checkpoints, resume
    out_dir = Path(config.out_dir) if config.out_dir else None
    checkpoints = None
    history: list[dict[str, Any]] = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_or_write_config(out_dir, config)
        checkpoints = Checkpoints(out_dir / "checkpoints", keep=config.keep_checkpoints)
        restored = checkpoints.restore_latest(state) if config.resume else None
        if restored is None and config.resume:  # check_out_dir saw steps: they vanished since
            raise ValueError(f"--resume: {out_dir} holds no checkpoint to resume; drop --resume to start over")
        if restored is not None:
            step, state = restored
            _say(f"resuming from step {step} (epoch {step / steps_per_epoch:.2f}) in {out_dir}")
        history = _read_history(out_dir, before_step=int(parallel.to_host(state["step"])))

    def evaluate(split_arrays, weights) -> dict[str, Any]:
        return task.scores(parallel.to_host(fns.evaluate(weights["params"], weights["other"], *split_arrays)))

    # --- the loop
    step = int(parallel.to_host(state["step"]))
    progress = _progress_bar(config, task, total=stop_step, initial=step)
    epoch_losses, epoch_metrics = [], []
    epoch_started = time.perf_counter()
    order, order_epoch = None, -1
    try:
        while step < stop_step:
            epoch = step // steps_per_epoch
            if order_epoch != epoch:
                order = parallel.put_replicated(
                    epoch_order(config.seed, epoch, num_train, steps_per_epoch * config.batch_size), mesh)
                order_epoch = epoch
            n = min(config.steps_per_call, (epoch + 1) * steps_per_epoch - step, stop_step - step)
            if config.checkpoint_every:
                n = min(n, config.checkpoint_every - step % config.checkpoint_every)
            new_state, metrics = fns.train_steps(state, arrays_dev, order, n)
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
            epoch_metrics += list(metrics[:, 1])
            learning_rate = float(metrics[-1, 2])
            if progress is not None:
                progress.update(n)
                progress.set_postfix({"epoch": epoch + 1, "loss": f"{np.mean(epoch_losses[-50:]):.4f}",
                                      _SHORT[task.train_metric]: f"{np.mean(epoch_metrics[-50:]):.4f}"},
                                     refresh=False)
            epoch_done = step % steps_per_epoch == 0 or step == stop_step
            if checkpoints and config.checkpoint_every and step % config.checkpoint_every == 0 and not epoch_done:
                checkpoints.save_latest(step, state)
            if epoch_done:
                record = _end_of_epoch(config, task, step, steps_per_epoch, state, evaluate, test_dev, val_dev,
                                       epoch_losses, epoch_metrics, learning_rate,
                                       time.perf_counter() - epoch_started, time.perf_counter() - started)
                history.append(record)
                if checkpoints:
                    checkpoints.save_latest(step, state)
                    best_weights = state["ema"] if config.ema_decay is not None else state
                    checkpoints.save_best(step, {"params": best_weights["params"], "other": best_weights["other"]},
                                          record[f"selection_{task.metric}"])
                if out_dir is not None and _host_rank_zero():
                    _write_history(out_dir, history)
                    plot_curves(history, out_dir / "curves.png", title=f"{task.describe()} on {config.dataset}",
                                metric=task.metric, metric_label=task.metric_label)
                if progress is not None:
                    progress.write(_format_record(record, task))
                else:
                    _say(_format_record(record, task))
                epoch_losses, epoch_metrics = [], []
                epoch_started = time.perf_counter()
    except KeyboardInterrupt:
        last = checkpoints.latest.latest_step() if checkpoints else None
        raise KeyboardInterrupt(
            f"at step {step} of {stop_step}; "
            + (f"the last checkpoint is step {last} in {out_dir}: the same command with --resume continues from it"
               if last is not None else "no checkpoint was written (--out and --checkpoint-every keep one)")) from None
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
    test_metrics = evaluate(test_dev, best)
    best_record = next((r for r in history if r["step"] == best_step), None)
    best_score = best_record[f"selection_{task.metric}"] if best_record else test_metrics[task.metric]
    best_params, best_other, counts = jax.tree.map(
        jnp.asarray, parallel.to_host((best["params"], best["other"], state["rng_counts"])))
    model = nnx.merge(eval_graphdef, best_params, rng_keys, counts, best_other)
    model.eval()
    model_dir = None
    if out_dir is not None:
        if _host_rank_zero():
            model_dir = task.save(model, out_dir / "model", test_metrics, best_step, steps_per_epoch)
        checkpoints.close()
    return TrainResult(model=model, metric=task.metric, best_score=best_score, best_step=best_step,
                       best_epoch=best_step / steps_per_epoch, test_metrics=test_metrics,
                       final_weights=final_weights, history=history, steps=step,
                       seconds=time.perf_counter() - started, out_dir=out_dir, model_dir=model_dir)


def _end_of_epoch(config, task, step, steps_per_epoch, state, evaluate, test_dev, val_dev, losses, metrics,
                  learning_rate, epoch_seconds, wall_seconds) -> dict[str, Any]:
    record: dict[str, Any] = {
        "epoch": round(step / steps_per_epoch, 4), "step": step,
        "train_loss": float(np.mean(losses)) if losses else None,
        f"train_{task.train_metric}": float(np.mean(metrics)) if metrics else None,
        "learning_rate": learning_rate,
    }
    weights = [("", state)] + ([("ema_", state["ema"])] if config.ema_decay is not None else [])
    splits = [("test", test_dev)] + ([("val", val_dev)] if val_dev is not None else [])
    for prefix, w in weights:
        for split, arrays in splits:
            record.update({f"{prefix}{split}_{key}": value for key, value in evaluate(arrays, w).items()})
    prefix = "ema_" if config.ema_decay is not None else ""
    record[f"selection_{task.metric}"] = record[f"{prefix}{'val' if val_dev is not None else 'test'}_{task.metric}"]
    record["epoch_seconds"] = round(epoch_seconds, 3)
    record["wall_seconds"] = round(wall_seconds, 3)
    record["examples_per_second"] = round(len(losses) * config.batch_size / max(epoch_seconds, 1e-9), 1)
    return record


_SHORT = {"accuracy": "acc", "pixel_accuracy": "pixel_acc", "mean_iou": "mIU"}


def _format_record(r: dict[str, Any], task) -> str:
    parts = [f"epoch {r['epoch']:g}", f"step {r['step']}"]
    keys = ["train_loss", f"train_{task.train_metric}", "test_loss", f"test_{task.metric}", f"val_{task.metric}",
            f"ema_test_{task.metric}"]
    if task.metric != "accuracy":
        keys.insert(4, "test_pixel_accuracy")
    for key in keys:
        if r.get(key) is not None:
            parts.append(f"{key} {r[key]:.4f}")
    parts.append(f"{r['epoch_seconds']:.1f}s")
    return "  ".join(parts)


def _progress_bar(config: TrainConfig, task, total: int, initial: int):
    if not config.progress or not _host_rank_zero():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=task.describe())


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
        from zoo.saving import write_files_atomically

        write_files_atomically(out_dir, {path.name: config.to_json().encode()})


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


def plot_curves(history: list[dict[str, Any]], path: Path, *, title: str = "", metric: str = "accuracy",
                metric_label: str = "accuracy") -> Path:
    """Loss and the task's metric (accuracy, mean IU) per epoch (train, test, validation, EMA), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    splits = (("train", "train"), ("test", "test"), ("val", "validation"), ("ema_test", "EMA test"))
    for split, label in splits:
        values = [r.get(f"{split}_loss") for r in history]
        if any(v is not None for v in values):
            ax_loss.plot(epochs, values, marker="o", label=label)
    for split, label in splits:
        values = [None if r.get(f"{split}_{metric}") is None else 100 * r[f"{split}_{metric}"] for r in history]
        if any(v is not None for v in values):
            ax_metric.plot(epochs, values, marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_metric.set(xlabel="epoch", ylabel=f"{metric_label} (%)", title=metric_label)
    shown = [100 * r[f"{split}_{metric}"] for r in history for split in ("test", "val", "ema_test")
             if r.get(f"{split}_{metric}") is not None]
    if shown and min(shown) > 90:  # zoom on the part that matters once the model is good
        ax_metric.set_ylim(min(shown) - 0.5, 100.0)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    from zoo.saving import save_figure

    return save_figure(fig, path, dpi=100)
