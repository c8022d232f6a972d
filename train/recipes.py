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

The shipped classifiers were trained by `train_minimal`, a small loop of its own that
`train.loop.train` replaced: for these configs (float32, one device, no accumulation) the loop
gives the same weights step for step (tests/test_train_equivalence.py keeps train_minimal's
update as the reference), so every recipe reproduces through `train.loop.train`.
"""

from __future__ import annotations

import dataclasses
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
        epochs=1, batch_size=128, optimizer="adamw", learning_rate=1.5e-2, schedule="onecycle",
        warmup_epochs=0.3, weight_decay=1e-4, label_smoothing=0.1, ema_decay=0.98, seed=seed, progress=False,
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


def get_recipe(name: str, seed: int = 0) -> TrainConfig:
    """The config of recipe `name`; an unknown name raises a ValueError listing the recipes."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[name](seed=seed)
