"""Training recipes: the configs that produce fcnzoo's results and shipped weights.

One function per recipe, big_vision style: its docstring says the command that runs it, the
result it gave and how long it took on the machine named in docs/sections/train_results.md
(a 2-core CPU, shared). Each returns a `train.config.TrainConfig` for `train.loop.train`.

    python scripts/train_recipes.py list
    python scripts/train_recipes.py run mnistnet_mnist --seed 0 --ship
    python scripts/train_recipes.py time-to-99

Shipped weights are the *final* weights of a run (EMA weights where the recipe uses EMA),
never a checkpoint picked by its test accuracy: the recipes hold out no validation data, so
picking the best epoch on the test split would flatter the number.
"""

from __future__ import annotations

from collections.abc import Callable

from train.config import TrainConfig

# Small affine distortions, as in Simard et al. 2003 (see train.augment): the augmentation
# every MNIST recipe here shares.
DIGIT_AUGMENT = dict(augment_shift=2.5, augment_rotate=10.0, augment_scale=0.1)


def mnistnet_mnist(seed: int = 0) -> TrainConfig:
    """MnistNet (zoo/mnistnet.py) on MNIST: exercise 9's best from-scratch CNN.

    Command: python scripts/train_recipes.py run mnistnet_mnist --seed 0 --ship
    Result and time: see RESULTS["mnistnet_mnist"] (filled from the measured runs).
    AdamW + one-cycle, label smoothing 0.1, EMA of the weights (decay 0.999), affine augmentation.
    No dropout: augmentation is the regularizer this 64k-parameter model needs.
    """
    return TrainConfig(
        model="mnistnet", dataset="mnist", model_kwargs={"dropout": 0.0}, epochs=10, batch_size=128, optimizer="adamw",
        learning_rate=3e-3, schedule="onecycle", warmup_epochs=2.0, weight_decay=5e-2,
        label_smoothing=0.1, ema_decay=0.999, seed=seed, steps_per_call=8, **DIGIT_AUGMENT,
    )


def lenet5_mnist(seed: int = 0) -> TrainConfig:
    """LeNet-5 (zoo/lenet.py) on MNIST, 28x28 padded by 2 to the paper's 32x32, ReLU + max-pool.

    Command: python scripts/train_recipes.py run lenet5_mnist --seed 0 --ship
    Result and time: see RESULTS["lenet5_mnist"].
    """
    return TrainConfig(
        model="lenet5", dataset="mnist", model_kwargs={"activation": "relu", "pooling": "max", "input_padding": 2},
        epochs=6, batch_size=128, optimizer="adamw", learning_rate=3e-3, schedule="onecycle",
        warmup_epochs=1.0, weight_decay=1e-2, label_smoothing=0.0, ema_decay=None, seed=seed,
        steps_per_call=8, **DIGIT_AUGMENT,
    )


def mnistnet_fashion_mnist(seed: int = 0) -> TrainConfig:
    """MnistNet on Fashion-MNIST: horizontal structure matters there, so only small shifts and zooms.

    Command: python scripts/train_recipes.py run mnistnet_fashion_mnist --seed 0 --ship
    Result and time: see RESULTS["mnistnet_fashion_mnist"].
    """
    return TrainConfig(
        model="mnistnet", dataset="fashion_mnist", model_kwargs={"dropout": 0.0}, epochs=10, batch_size=128, optimizer="adamw",
        learning_rate=3e-3, schedule="onecycle", warmup_epochs=2.0, weight_decay=5e-2,
        label_smoothing=0.1, ema_decay=0.999, seed=seed, steps_per_call=8,
        augment_shift=2.0, augment_rotate=0.0, augment_scale=0.05,
    )


def fast_mnist(seed: int = 0) -> TrainConfig:
    """The time-to-99% recipe: a narrow MnistNet, one epoch, big steps, no augmentation or EMA.

    Command: python scripts/train_recipes.py time-to-99
    Wall time counts everything: process start, data loading, compilation, training, evaluation.
    """
    return TrainConfig(
        model="mnistnet", dataset="mnist",
        model_kwargs={"widths": (8, 16, 32), "convs_per_stage": (1, 1, 1), "dropout": 0.0},
        epochs=1, batch_size=128, optimizer="adamw", learning_rate=4e-3, schedule="onecycle",
        warmup_epochs=0.25, weight_decay=1e-4, seed=seed, steps_per_call=16, progress=False,
    )


RECIPES: dict[str, Callable[..., TrainConfig]] = {
    "mnistnet_mnist": mnistnet_mnist,
    "lenet5_mnist": lenet5_mnist,
    "mnistnet_fashion_mnist": mnistnet_fashion_mnist,
    "fast_mnist": fast_mnist,
}

# Which recipe's run ships as which weights: recipe -> (model, tag).
SHIPPED_AS = {
    "mnistnet_mnist": ("mnistnet", "mnist"),
    "lenet5_mnist": ("lenet5", "mnist"),
    "mnistnet_fashion_mnist": ("mnistnet", "fashion_mnist"),
}


def get_recipe(name: str, seed: int = 0) -> TrainConfig:
    """The config of recipe `name`; an unknown name raises a ValueError listing the recipes."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[name](seed=seed)
