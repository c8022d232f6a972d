"""Training recipes: the configs that produce fcnzoo's results and shipped weights.

One function per recipe, big_vision style: its docstring says the command that runs it, the
result it gave and how long it took on the machine named in docs/BENCHMARKS.md (training results)
(a 2-core CPU, shared). Each returns a `train.config.TrainConfig` for `train.loop.train`.

    python scripts/train_recipes.py list
    python scripts/train_recipes.py run mnistnet_mnist --seed 0 --ship
    python scripts/train_recipes.py time-to-99

Shipped weights are the *final* weights of a run (EMA weights where the recipe uses EMA),
never a checkpoint picked by its test accuracy: the recipes hold out no validation data, so
picking the best epoch on the test split would flatter the number.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

from train.config import TrainConfig

# Small affine distortions, as in Simard et al. 2003 (see train.augment): the augmentation
# every MNIST recipe here shares.
DIGIT_AUGMENT = dict(augment_shift=2.5, augment_rotate=10.0, augment_scale=0.1)


def mnistnet_mnist(seed: int = 0) -> TrainConfig:
    """MnistNet (zoo/mnistnet.py) on MNIST: exercise 9's best from-scratch CNN.

    Command: python scripts/train_recipes.py run mnistnet_mnist --seed 0 --ship
    Result and time: docs/BENCHMARKS.md (training results).
    AdamW + one-cycle, label smoothing 0.1, EMA of the weights (decay 0.999), affine augmentation.
    No dropout: augmentation is the regularizer this 64k-parameter model needs.
    """
    return TrainConfig(
        model="mnistnet", dataset="mnist", model_kwargs={"dropout": 0.0}, epochs=20, batch_size=128,
        optimizer="adamw", learning_rate=3e-3, schedule="onecycle", warmup_epochs=3.0, weight_decay=5e-2,
        label_smoothing=0.1, ema_decay=0.999, seed=seed, **DIGIT_AUGMENT,
    )


def mnistnet_wide_mnist(seed: int = 0) -> TrainConfig:
    """MnistNet-wide on MNIST: our best from-scratch CNN (exercise 9), the mnistnet recipe at twice the width.

    Command: python scripts/train_recipes.py run mnistnet_wide_mnist --seed 0 --ship
    Result and time: docs/BENCHMARKS.md (training results).
    The wider model fits the augmented data more closely, so it gets back a little dropout.
    """
    return dataclasses.replace(mnistnet_mnist(seed), model="mnistnet_wide", model_kwargs={"dropout": 0.25},
                               epochs=18)


def lenet5_mnist(seed: int = 0) -> TrainConfig:
    """LeNet-5 (zoo/lenet.py) on MNIST, 28x28 padded by 2 to the paper's 32x32, ReLU + max-pool.

    Command: python scripts/train_recipes.py run lenet5_mnist --seed 0 --ship
    Result and time: docs/BENCHMARKS.md (training results).
    """
    return TrainConfig(
        model="lenet5", dataset="mnist", model_kwargs={"activation": "relu", "pooling": "max", "input_padding": 2},
        epochs=3, batch_size=128, optimizer="adamw", learning_rate=3e-3, schedule="onecycle",
        warmup_epochs=0.6, weight_decay=1e-2, label_smoothing=0.0, ema_decay=0.998, seed=seed,
        **DIGIT_AUGMENT,
    )


def mnistnet_fashion_mnist(seed: int = 0) -> TrainConfig:
    """MnistNet on Fashion-MNIST: clothes are left-right symmetric (flips) but upright (no rotation).

    Command: python scripts/train_recipes.py run mnistnet_fashion_mnist --seed 0 --ship
    Result and time: docs/BENCHMARKS.md (training results).
    """
    return TrainConfig(
        model="mnistnet", dataset="fashion_mnist", model_kwargs={"dropout": 0.0}, epochs=15, batch_size=128, optimizer="adamw",
        learning_rate=3e-3, schedule="onecycle", warmup_epochs=3.0, weight_decay=5e-2,
        label_smoothing=0.1, ema_decay=0.999, seed=seed,
        augment_shift=2.0, augment_rotate=0.0, augment_scale=0.05, augment_flip=True,
    )


def mnistnet_large_fashion_mnist(seed: int = 0) -> TrainConfig:
    """MnistNet-large on Fashion-MNIST: the mnistnet recipe at four times the width, with a little dropout.

    Command: python scripts/train_recipes.py run mnistnet_large_fashion_mnist --seed 0 --out runs
    (stage 1 of the shipped weights: `mnistnet_large_fashion_mnist_more` continues from it)
    Result and time: docs/BENCHMARKS.md (training results).
    """
    return dataclasses.replace(mnistnet_fashion_mnist(seed), model="mnistnet_large",
                               model_kwargs={"dropout": 0.25}, epochs=20)


def mnistnet_large_fashion_mnist_erase(seed: int = 0) -> TrainConfig:
    """MnistNet-large on Fashion-MNIST with random erasing (p=0.5), the run after the one above.

    That run ended with train accuracy (augmented) above test accuracy, so this one adds regularization:
    half the images get one noise-filled rectangle (Zhong et al.), everything else unchanged.
    Command: python scripts/train_recipes.py run mnistnet_large_fashion_mnist_erase --seed 0
    Result and time: docs/BENCHMARKS.md (training results).
    """
    return dataclasses.replace(mnistnet_large_fashion_mnist(seed), augment_erase=0.5)


def run_dir(recipe: str, seed: int, out: str = "runs") -> str:
    """Where `scripts/train_recipes.py run RECIPE --seed S --out OUT` writes its run; the model is in model/."""
    return f"{out}/{recipe}-seed{seed}"


def mnistnet_large_fashion_mnist_more(seed: int = 0) -> TrainConfig:
    """Stage 2 of mnistnet_large on Fashion-MNIST: 6 more epochs from stage 1's weights, peak lr 1/6.

    Stage 1's EMA accuracy still rose at its end (94.00, 94.15, 94.19 over epochs 18-20): a second,
    smaller one-cycle continues it. Run `mnistnet_large_fashion_mnist` with `--out runs` first.
    Command: python scripts/train_recipes.py run mnistnet_large_fashion_mnist_more --seed 0 --out runs
    Result and time: docs/BENCHMARKS.md (training results).
    """
    return dataclasses.replace(mnistnet_large_fashion_mnist(seed), epochs=6, learning_rate=5e-4, warmup_epochs=1.0,
                               init_from=run_dir("mnistnet_large_fashion_mnist", seed) + "/model")


def mnistnet_large_fashion_mnist_third(seed: int = 0) -> TrainConfig:
    """Stage 3 of mnistnet_large on Fashion-MNIST: stage 2's small one-cycle again, 8 epochs, from its weights.

    Stage 2's EMA accuracy rose from 94.13 to 94.41 over its 6 epochs (a warm restart of stage 1): this
    repeats the restart once more, a little longer. Run stages 1 and 2 with `--out runs` first.
    Command: python scripts/train_recipes.py run mnistnet_large_fashion_mnist_third --seed 0 --out runs
    Result and time: docs/BENCHMARKS.md (training results).
    """
    return dataclasses.replace(mnistnet_large_fashion_mnist_more(seed), epochs=8,
                               init_from=run_dir("mnistnet_large_fashion_mnist_more", seed) + "/model")


def mnistnet_large_fashion_mnist_fourth(seed: int = 0) -> TrainConfig:
    """Stage 4 of mnistnet_large on Fashion-MNIST: a last, gentler restart (6 epochs, peak lr 3e-4) from stage 3.

    Stage 3's EMA accuracy held at 94.4-94.5 over its last 4 epochs (a plateau): a lower peak
    settles the weights rather than moving them. Run stages 1 to 3 with `--out runs` first.
    Command: python scripts/train_recipes.py run mnistnet_large_fashion_mnist_fourth --seed 0 --ship
    Result and time: docs/BENCHMARKS.md (training results).
    """
    return dataclasses.replace(mnistnet_large_fashion_mnist_more(seed), learning_rate=3e-4,
                               init_from=run_dir("mnistnet_large_fashion_mnist_third", seed) + "/model")


def fast_mnist(seed: int = 0) -> TrainConfig:
    """The time-to-99% recipe: MnistNet with one conv per stage, one epoch, no augmentation.

    Command: python scripts/train_recipes.py time-to-99
    Wall time counts everything: process start, data loading, compilation, training, evaluation.
    Result and time: docs/BENCHMARKS.md (training results).
    """
    return TrainConfig(
        model="mnistnet", dataset="mnist",
        model_kwargs={"widths": (16, 32, 64), "convs_per_stage": (1, 1, 1), "dropout": 0.0},
        epochs=1, batch_size=256, optimizer="adamw", learning_rate=1e-2, schedule="onecycle",
        warmup_epochs=0.2, weight_decay=1e-4, ema_decay=0.98, seed=seed, progress=False,
    )


RECIPES: dict[str, Callable[..., TrainConfig]] = {
    "mnistnet_mnist": mnistnet_mnist,
    "mnistnet_wide_mnist": mnistnet_wide_mnist,
    "lenet5_mnist": lenet5_mnist,
    "mnistnet_fashion_mnist": mnistnet_fashion_mnist,
    "mnistnet_large_fashion_mnist": mnistnet_large_fashion_mnist,
    "mnistnet_large_fashion_mnist_erase": mnistnet_large_fashion_mnist_erase,
    "mnistnet_large_fashion_mnist_more": mnistnet_large_fashion_mnist_more,
    "mnistnet_large_fashion_mnist_third": mnistnet_large_fashion_mnist_third,
    "mnistnet_large_fashion_mnist_fourth": mnistnet_large_fashion_mnist_fourth,
    "fast_mnist": fast_mnist,
}

# Which recipe's run ships as which weights: recipe -> (model, tag).
SHIPPED_AS = {
    "mnistnet_mnist": ("mnistnet", "mnist"),
    "mnistnet_wide_mnist": ("mnistnet_wide", "mnist"),
    "lenet5_mnist": ("lenet5", "mnist"),
    "mnistnet_fashion_mnist": ("mnistnet", "fashion_mnist"),
    "mnistnet_large_fashion_mnist_fourth": ("mnistnet_large", "fashion_mnist"),
}

# Recipes trained with `train_minimal` rather than `train.loop.train` (BatchNorm models: see there).
MINIMAL_LOOP = {"mnistnet_mnist", "mnistnet_wide_mnist", "lenet5_mnist", "mnistnet_fashion_mnist",
                "mnistnet_large_fashion_mnist", "mnistnet_large_fashion_mnist_erase",
                "mnistnet_large_fashion_mnist_more", "mnistnet_large_fashion_mnist_third",
                "mnistnet_large_fashion_mnist_fourth", "fast_mnist"}


def get_recipe(name: str, seed: int = 0) -> TrainConfig:
    """The config of recipe `name`; an unknown name raises a ValueError listing the recipes."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[name](seed=seed)


# ---------------------------------------------------------------------------------------------
# A minimal jitted loop, a stopgap for models with BatchNorm or Dropout (see the report in
# docs/BENCHMARKS.md (training results)): the same data, schedule, optimizer, augmentation,
# preprocessing and EMA as train.loop, without checkpoints or the out-of-memory switches.


def train_minimal(config: TrainConfig):
    """Train `config` and return (model in eval mode with the final EMA or raw weights, history, test_accuracy).

    The whole data set sits on the device as uint8; one jitted update per call, pure over
    `nnx.split` state (NNX's graph handling happens once, at trace time).
    Data order is a numpy permutation per epoch from the seed; augmentation keys fold in the step.
    """
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from train import augment, data
    from train.loop import build_model, make_optimizer, make_schedule
    from zoo.pretrained import preprocess

    config.validate()
    if config.accumulate != 1 or config.data_parallel or config.remat or config.dtype != "float32":
        raise ValueError("train_minimal runs plain float32 single-device training; use train.loop.train "
                         "for accumulate, data_parallel, remat or bfloat16")
    started = time.perf_counter()
    source = data.get_source(config.dataset)
    preprocessing = data.preprocessing_record(config.dataset)
    train_x, train_y = data.load_arrays(config.dataset, "train", config.data_dir)
    test_x, test_y = data.load_arrays(config.dataset, "test", config.data_dir)
    batch = config.batch_size
    steps_per_epoch = len(train_x) // batch
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)

    model = build_model(config, source.image_shape, source.num_classes)
    schedule = make_schedule(config, config.epochs * steps_per_epoch, steps_per_epoch)
    optimizer = nnx.Optimizer(model, make_optimizer(config, schedule), wrt=nnx.Param)
    model.train()
    graphdef, state = nnx.split((model, optimizer))
    weights_filter = (nnx.Param, nnx.BatchStat)
    ema = jax.tree.map(jnp.copy, nnx.state(model, weights_filter))
    use_ema = config.ema_decay is not None
    augments = augment.requested(config)
    images, labels = jnp.asarray(train_x), jnp.asarray(train_y)
    base_key = jax.random.key(config.seed)

    def one_step(state, ema, images, labels, idx, step):
        model, optimizer = nnx.merge(graphdef, state)
        x = images[idx]
        if augments:
            keys = jax.random.split(jax.random.fold_in(base_key, step), batch)
            x = augment.from_config(keys, x.astype(jnp.float32), config)
        x, y = preprocess(x, preprocessing), labels[idx]
        targets = optax.smooth_labels(jax.nn.one_hot(y, source.num_classes), config.label_smoothing)

        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy(logits, targets).mean(), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        if use_ema:  # the usual warmup of the decay, so the average forgets the random init
            decay = jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))
            ema = jax.tree.map(lambda e, w: decay * e + (1 - decay) * w, ema, nnx.state(model, weights_filter))
        return nnx.state((model, optimizer)), ema, jnp.stack([loss, (logits.argmax(-1) == y).mean()])

    # The data are arguments, not closed-over constants that XLA would embed in the program.
    run_step = jax.jit(one_step, donate_argnums=(0, 1))

    eval_x = jnp.asarray(test_x).reshape(-1, config.eval_batch_size, *test_x.shape[1:])
    eval_y = jnp.asarray(test_y).reshape(-1, config.eval_batch_size)

    @jax.jit
    def accuracy(state, weights, eval_x, eval_y):
        model = nnx.merge(graphdef, state)[0]
        nnx.update(model, weights)
        model.eval()
        correct = jax.lax.map(lambda xy: (model(preprocess(xy[0], preprocessing)).argmax(-1) == xy[1]).sum(),
                              (eval_x, eval_y))
        return correct.sum() / test_y.shape[0]

    rng = np.random.default_rng(config.seed)
    history, step = [], 0
    while step < total_steps:
        epoch_started = time.perf_counter()
        order = rng.permutation(len(train_x))[: steps_per_epoch * batch].reshape(steps_per_epoch, batch)
        metrics = []
        for i in range(min(steps_per_epoch, total_steps - step)):
            state, ema, m = run_step(state, ema, images, labels, jnp.asarray(order[i]), jnp.int32(step))
            metrics.append(m)
            step += 1
            if config.progress and step % 50 == 0:
                print(f"step {step}/{total_steps} loss {float(m[0]):.4f} {time.perf_counter() - started:.0f}s", flush=True)
        metrics = np.stack([np.asarray(m) for m in metrics])
        if not np.isfinite(metrics[:, 0]).all():
            raise RuntimeError(f"the loss became NaN/inf in epoch {len(history) + 1}; lower the learning rate")
        raw = nnx.state(nnx.merge(graphdef, state)[0], weights_filter)
        record = {"epoch": round(step / steps_per_epoch, 4), "step": step,
                  "train_loss": float(metrics[:, 0].mean()), "train_accuracy": float(metrics[:, 1].mean()),
                  "test_accuracy": float(accuracy(state, raw, eval_x, eval_y)),
                  "learning_rate": float(schedule(step - 1))}
        if use_ema:
            record["ema_test_accuracy"] = float(accuracy(state, ema, eval_x, eval_y))
        record["epoch_seconds"] = round(time.perf_counter() - epoch_started, 1)
        record["wall_seconds"] = round(time.perf_counter() - started, 1)
        history.append(record)
        print(json.dumps(record), flush=True)
    model = nnx.merge(graphdef, state)[0]
    if use_ema:
        nnx.update(model, ema)
    model.eval()
    final = history[-1]["ema_test_accuracy" if use_ema else "test_accuracy"]
    return model, history, final
