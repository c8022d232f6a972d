"""Hands-On Machine Learning (Géron, 3rd ed.), chapter 14, exercises 1-9, answered by running code.

    .venv/bin/python scripts/exercises.py                   # all nine: about 25 minutes on 2 shared CPU cores
    .venv/bin/python scripts/exercises.py --only 4          # one exercise (or --only 1,5): its section is replaced
    .venv/bin/python scripts/exercises.py --quick --out /tmp/ex   # smoke run: tiny data, 1-2 steps (the test suite's)
    .venv/bin/python scripts/exercises.py --render          # rewrite the page (figures 1, 3, 6 too) from its numbers

Writes <out>/EXERCISES.md (default out: docs/) and PNG figures under <out>/figures/. Each section
records the command, machine and date of the run that made it, and its numbers as JSON in an HTML
comment, so one exercise can be rerun (--only) or the text re-rendered (--render) alone.

Everything runs through the project's own pieces: `train.loop.train(TrainConfig)` trains every
network; `train.loop.make_functions` gives the compiled update whose memory and time exercises 3-5
measure (the same update `train` runs); `zoo.summarize` counts parameters, FLOPs and memory; the
registry's metadata answers exercise 6; `convert` exercises 7-8. Timing comparisons alternate the
compared calls in one process and report ratios, so background load on a shared machine hits both
sides alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CODE = "../scripts/exercises.py"  # links from docs/EXERCISES.md


# ---------------------------------------------------------------------------------------------
# settings: the full run and the smoke run


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much each exercise trains and measures; `FULL` makes the page, `QUICK` is the smoke test.

    train_examples / test_examples: None for the whole split. max_steps: None for whole epochs.
    ex1_epochs: training-set fraction -> (epochs, batch size). ex1_sweep: hidden widths of the MLP sweep.
    ex3_moves: which playbook moves (None: all). ex45_batch / ex45_epochs: exercises 4 and 5.
    rounds: alternating timing rounds per compared update. ex6_models, ex7_models, ex9_models: None for all.
    scenes: digit_scenes test scenes (exercise 8); scene_size: None for the data set's own sizes.
    """

    seeds: tuple[int, ...]
    train_examples: int | None
    test_examples: int | None
    max_steps: int | None
    fast_compile: bool
    ex1_fractions: tuple[float, ...]
    ex1_epochs: dict[float, tuple[int, int]]
    ex1_sweep: tuple[tuple[int, ...], ...]
    ex3_batch: int
    ex3_moves: tuple[str, ...] | None
    ex45_batch: int
    ex45_epochs: int
    rounds: int
    ex6_models: tuple[str, ...] | None
    ex7_models: tuple[str, ...] | None
    ex9_models: tuple[str, ...] | None
    scenes: int
    scene_size: tuple[int, int] | None


# About 25 minutes on the project's 2-core CPU: short trainings (one to three epochs of small
# networks; exercise 1's 10% and 1% subsets get more epochs), so the designs are ranked, not pushed
# to their best.
FULL = Budget(seeds=(0, 1, 2), train_examples=None, test_examples=None, max_steps=None, fast_compile=False,
              ex1_fractions=(1.0, 0.1, 0.01), ex1_epochs={1.0: (1, 128), 0.1: (5, 128), 0.01: (10, 16)},
              ex1_sweep=((128,), (512,), (2048,), (512, 512), (1024, 1024)), ex3_batch=256, ex3_moves=None,
              ex45_batch=128, ex45_epochs=3, rounds=8, ex6_models=None, ex7_models=None, ex9_models=None,
              scenes=100, scene_size=None)
# The test suite's smoke run: every code path that writes the page, with as few compilations as will do.
QUICK = Budget(seeds=(0,), train_examples=256, test_examples=100, max_steps=1, fast_compile=True,
               ex1_fractions=(1.0,), ex1_epochs={1.0: (1, 16)}, ex1_sweep=((16,),), ex3_batch=8,
               ex3_moves=("baseline (float32)",), ex45_batch=8, ex45_epochs=1, rounds=1,
               ex6_models=("lenet5", "resnet18"), ex7_models=("mnistnet",), ex9_models=("mnistnet",), scenes=1,
               scene_size=(96, 128))


@dataclasses.dataclass
class Run:
    """One invocation: where it writes, how much it does, and what to say about the machine."""

    out: Path
    budget: Budget
    quick: bool
    command: str

    @property
    def figures(self) -> Path:
        return self.out / "figures"

    def config(self, **fields):
        """A `TrainConfig` with this run's data limits; `fields` override."""
        from train.config import TrainConfig

        b = self.budget
        base = {"train_examples": b.train_examples, "test_examples": b.test_examples, "max_steps": b.max_steps,
                "fast_compile": b.fast_compile, "progress": False, "schedule": "onecycle", "learning_rate": 3e-3,
                "warmup_epochs": 0.3, "weight_decay": 1e-4, "optimizer": "adamw"}
        base.update(fields)
        if base["train_examples"] is not None:
            base["batch_size"] = min(base.get("batch_size", 128), base["train_examples"])
        return TrainConfig(**base)


def machine() -> str:
    """CPU, cores, accelerators and library versions, in one line."""
    import flax
    import jax

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    devices = jax.devices()
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), {devices[0].platform} backend "
            f"({len(devices)} device{'s' * (len(devices) > 1)}), jax {jax.__version__}, flax {flax.__version__}")


def load_average() -> str:
    with contextlib.suppress(OSError):
        return f"{os.getloadavg()[0]:.1f}"
    return "?"


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pct(values: Sequence[float], digits: int = 2) -> str:
    """Accuracies in [0, 1] as 'mean ± sd' percent."""
    m, s = mean_sd(values)
    return f"{100 * m:.{digits}f} ± {100 * s:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# the exercises' own small networks


# `train.loop.train` builds its network by registry name (`check_setup` looks the name up,
# `train.tasks.build_classifier` calls `zoo.create_model`), so the few networks the exercises need
# and the zoo does not have are registered for the duration of a run and removed afterwards. They
# then train through the same loop, data pipeline and CPU fast paths as every zoo model.


@functools.cache
def _networks():
    """The exercises' networks: builder functions in the registry's calling convention."""
    from flax import nnx

    from zoo.classifier import Classifier, dense_head, output_shape
    from zoo.layers import Activation, LocalResponseNorm, MaxPool, NamedSequential
    from zoo.stages import Stage

    class Unit(nnx.Module):
        """3x3 convolution (stride 1 or 2, SAME, no bias), BatchNorm, ReLU: MnistNet's unit with a stride.

        x: (N, H, W, in_channels) -> (N, ceil(H / stride), ceil(W / stride), out_channels)
        """

        def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, dtype, rngs):
            self.conv = nnx.Conv(in_channels, out_channels, (3, 3), strides=stride, padding="SAME", use_bias=False,
                                 dtype=dtype, rngs=rngs)
            self.bn = nnx.BatchNorm(out_channels, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)
            self.act = Activation("relu")

        def __call__(self, x):
            return self.act(self.bn(self.conv(x)))

    class Features(nnx.Module):
        """MnistNet's backbone (zoo/mnistnet.py) with two switches: how a stage downsamples
        ("pool": 2x2 max pool; "conv": a 3x3 stride-2 conv unit keeping the channels) and the stride
        of the very first convolution. Items of `layers` are the blocks `train.loop.remat_blocks` wraps.

        x: (N, H, W, C) -> (N, h, w, widths[-1])
        """

        def __init__(self, in_channels, widths, convs_per_stage, downsample, stem_stride, *, dtype, rngs):
            layers, channels, taps, stride = [], in_channels, [], 1
            for stage, (width, depth) in enumerate(zip(widths, convs_per_stage)):
                if stage > 0:
                    layers.append(MaxPool(2) if downsample == "pool"
                                  else Unit(channels, channels, stride=2, dtype=dtype, rngs=rngs))
                    stride *= 2
                for i in range(depth):
                    first = stage == 0 and i == 0
                    layers.append(Unit(channels, width, stride=stem_stride if first else 1, dtype=dtype, rngs=rngs))
                    stride *= stem_stride if first else 1
                    channels = width
                taps.append(Stage(f"layers.{len(layers) - 1}", stride, width))
            self.layers = nnx.List(layers)
            self.taps = tuple(taps)

        def sequential_steps(self):
            return [(f"layers.{i}", layer) for i, layer in enumerate(self.layers)]

        def __call__(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    def build_cnn(*, num_classes, input_shape, include_top, dtype, rngs, name, widths=(16, 32, 64),
                  convs_per_stage=(1, 1, 1), downsample="pool", stem_stride=1, dropout=0.0):
        if downsample not in ("pool", "conv"):
            raise ValueError(f"downsample must be 'pool' or 'conv', got {downsample!r}")
        features = Features(input_shape[2], widths, convs_per_stage, downsample, stem_stride, dtype=dtype, rngs=rngs)
        head = None
        if include_top:
            _, h, w, c = output_shape(features, (1, *input_shape))
            head = dense_head("flatten", h * w * c, num_classes, dropout=dropout, dropout_first=True, dtype=dtype,
                              rngs=rngs)
        return Classifier(features, head, input_shape=input_shape, min_size=(8, 8), name=name, stages=features.taps)

    def build_mlp(*, num_classes, input_shape, include_top, dtype, rngs, name, hidden=(32,), dropout=0.0):
        # The "backbone" is the image itself: a fully connected network is a Flatten head on pixels
        # (and `convert.to_fcn` turns its first Dense layer into one 28x28 convolution).
        features = NamedSequential([("pixels", Activation("identity"))])
        head = None
        if include_top:
            head = dense_head("flatten", math.prod(input_shape), num_classes, hidden=hidden, dropout=dropout,
                              dtype=dtype, rngs=rngs)
        return Classifier(features, head, input_shape=input_shape, min_size=input_shape[:2], name=name,
                          stages=(Stage("pixels", 1, input_shape[2]),))

    # (name, maps, kernel, LRN after the ReLU, 3x3/2 max pool after): AlexNet's table (zoo/alexnet.py)
    # at 1/12 to 1/16 of its widths for 28x28 inputs (SAME convolutions, a 5x5 stem, one tower).
    small_alexnet = (("1", 8, 5, True, True), ("2", 16, 5, True, True), ("3", 24, 3, False, False),
                     ("4", 24, 3, False, False), ("5", 16, 3, False, True))

    def build_small_alexnet(*, num_classes, input_shape, include_top, dtype, rngs, name, lrn=True, dropout=0.5,
                            hidden=(64, 64)):
        steps, maps, stride = [], input_shape[2], 1
        for stage, out, kernel, has_lrn, pool in small_alexnet:
            steps += [(f"conv{stage}", nnx.Conv(maps, out, (kernel, kernel), padding="SAME", dtype=dtype, rngs=rngs)),
                      (f"relu{stage}", Activation("relu"))]
            if has_lrn and lrn:  # the paper's constants, zoo.layers' defaults
                steps.append((f"lrn{stage}", LocalResponseNorm(size=5, k=2.0, alpha=1e-4, beta=0.75)))
            if pool:
                steps.append((f"pool{stage}", MaxPool(3, strides=2)))
                stride *= 2
            maps = out
        features = NamedSequential(steps)
        head = None
        if include_top:
            _, h, w, c = output_shape(features, (1, *input_shape))
            head = dense_head("flatten", h * w * c, num_classes, hidden=hidden, dropout=dropout, dtype=dtype,
                              rngs=rngs)
        return Classifier(features, head, input_shape=input_shape, min_size=(15, 15), name=name,
                          stages=(Stage(steps[-1][0], stride, maps),))

    return {"exercise_cnn": (build_cnn, "MnistNet's backbone with a choice of downsampling and stem stride"),
            "exercise_mlp": (build_mlp, "a fully connected network: Dense layers on the flattened pixels"),
            "exercise_alexnet": (build_small_alexnet, "AlexNet's layer table, small, with or without LRN")}


@contextlib.contextmanager
def exercise_models():
    """Register the exercises' networks (`_networks`) for the duration of the block."""
    from zoo import registry

    added = []
    try:
        for name, (builder, introduced) in _networks().items():
            if name in registry.list_models():
                continue
            registry.register(registry.ModelSpec(
                name=name, family="exercises", builder=builder, options={}, paper="(fcnzoo's exercise network)",
                year=2026, url="https://github.com/", introduced=introduced, input_shape=(28, 28, 1),
                min_size=(8, 8), head_kind="flatten", total_stride=4, feature_shape=(7, 7, 1), num_params=0,
                num_classes=10))
            added.append(name)
        yield
    finally:
        for name in added:  # no public unregister: the registry is a module-level dict
            registry._REGISTRY.pop(name, None)


# ---------------------------------------------------------------------------------------------
# shared measuring tools


def train(config):
    """`train.loop.train(config)`; the returned model is the final weights (no out_dir, so no
    test-set checkpoint picking), in eval mode."""
    from train import loop

    return loop.train(config)


def predictor(model):
    """A jitted forward pass over `nnx.split` state: (N, H, W, C) float32 -> (N, K) logits."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda x: np.asarray(forward(state, x))


def accuracy(forward, images, labels, dataset: str, batch: int = 1000) -> float:
    """Test accuracy of `forward` (a `predictor`) on uint8 images (N, H, W, C), with the data set's preprocessing."""
    from train import data
    from zoo.pretrained import preprocess

    record = data.preprocessing_record(dataset)
    correct = 0
    for start in range(0, len(images), batch):
        x = preprocess(np.asarray(images[start:start + batch]), record)
        correct += int((forward(x).argmax(-1) == labels[start:start + batch]).sum())
    return correct / len(images)


def shift_images(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(N, H, W, C) moved by (dy, dx) pixels, the vacated border filled with 0 (the digits' background)."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    src_y, dst_y = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    src_x, dst_x = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[:, dst_y, dst_x] = images[:, src_y, src_x]
    return out


class CompiledStep:
    """The update `train.loop.train` runs for `config` (`train.loop.make_functions`), compiled ahead of
    time for one call of one update, on the first examples of the training split.

    Attributes:
        memory: XLA's `memory_analysis()` of the compiled update (temp_size_in_bytes etc.).
        compile_seconds: time to lower and compile.
        estimate_bytes: `zoo.summarize`'s training lower bound for one device's micro-batch.
    """

    def __init__(self, config):
        import jax
        import jax.numpy as jnp

        from train import loop, parallel, tasks
        from train.bench import loop_step
        from zoo.summary import summarize

        loop.check_setup(config)
        task = tasks.make_task(config)
        arrays = task.load("train", max(4 * config.batch_size, config.train_examples or 0))
        model = loop.init_model(config, task)
        devices = jax.device_count() if config.data_parallel else 1
        self.estimate_bytes = summarize(model, task.image_shape, batch_size=config.micro_batch_size // devices,
                                        dtype=jnp.dtype(config.dtype), xla=False).training_bytes()
        self.params = sum(x.size for x in jax.tree.leaves(loop.split_model(model)[1]))
        steps_per_epoch = len(arrays[0]) // config.batch_size
        mesh = parallel.make_mesh() if config.data_parallel else None
        fns, self.state = loop_step(config, task, model, steps_per_epoch=steps_per_epoch, mesh=mesh)
        self.arrays = parallel.put_replicated(tuple(np.asarray(a) for a in arrays), mesh)
        self.order = parallel.put_replicated(
            loop.epoch_order(config.seed, 0, len(arrays[0]), steps_per_epoch * config.batch_size), mesh)
        start = time.perf_counter()
        self.compiled = fns.train_steps.lower(self.state, self.arrays, self.order, 1).compile()
        self.compile_seconds = time.perf_counter() - start
        self.memory = self.compiled.memory_analysis()
        self.flops = _xla_flops(self.compiled)

    def __call__(self) -> None:
        """One update (the state is donated, so each call continues from the last)."""
        import jax

        self.state, metrics = self.compiled(self.state, self.arrays, self.order)
        jax.block_until_ready(metrics)

    @property
    def temp_bytes(self) -> int:
        return int(self.memory.temp_size_in_bytes)


def _xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def alternate(calls: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds of each call, timed in turn (A, B, C, A, B, C, ...) after one warm-up call each,
    so that load from other processes falls on every side alike."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def load_test_split(dataset: str, limit: int | None):
    from train import data

    return data.load_arrays(dataset, f"test[:{limit}]" if limit else "test")


def figure_path(run: Run, name: str) -> Path:
    run.figures.mkdir(parents=True, exist_ok=True)
    return run.figures / name


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# exercise 1: CNN vs fully connected network


# The CNN: the registered MnistNet at half its widths, one conv per stage, no dropout. The MLPs:
# one hidden layer as wide as gives the CNN's parameter count, and the width from a sweep that comes
# closest to the CNN's accuracy (the sweep runs first, one seed, and is part of the result).
EX1_CNN = ("mnistnet", {"widths": (8, 16, 32), "convs_per_stage": (1, 1, 1), "dropout": 0.0})
EX1_SHIFTS = (2, 4, 6)
EX1_LABELS = {"MLP, same accuracy": "MLP, nearest accuracy"}  # how the page names them


def exercise_1(run: Run) -> dict:
    from zoo import count_params

    b = run.budget
    images, labels = load_test_split("mnist", b.test_examples)
    full = b.train_examples or 60_000

    def config(model, kwargs, fraction, seed):
        epochs, batch = b.ex1_epochs[fraction]
        return run.config(model=model, model_kwargs=kwargs, dataset="mnist", epochs=epochs, batch_size=batch,
                          seed=seed, train_examples=max(1, round(full * fraction)), warmup_epochs=0.1 * epochs)

    def measure(model, kwargs, reuse=None) -> dict:
        """Every fraction and seed of one network; `reuse`: an already trained (fraction 1, first seed) result."""
        entry = {"model": model, "model_kwargs": _jsonable(kwargs), "accuracy": {}, "seconds": {}, "epochs": {},
                 "shifted": {str(s): [] for s in EX1_SHIFTS}}
        for fraction in b.ex1_fractions:
            accs, secs = [], []
            for seed in b.seeds:
                if reuse is not None and fraction == 1.0 and seed == b.seeds[0]:
                    result = reuse
                else:
                    result = train(config(model, kwargs, fraction, seed))
                accs.append(result.test_accuracy)
                secs.append(result.seconds)
                if fraction == 1.0:
                    entry["params"] = count_params(result.model)
                    forward = predictor(result.model)
                    for s in EX1_SHIFTS:  # the four directions, averaged
                        moved = [accuracy(forward, shift_images(images, dy, dx), labels, "mnist")
                                 for dy, dx in ((s, 0), (-s, 0), (0, s), (0, -s))]
                        entry["shifted"][str(s)].append(float(np.mean(moved)))
            entry["accuracy"][str(fraction)] = accs
            entry["seconds"][str(fraction)] = secs
            epochs, batch = b.ex1_epochs[fraction]
            entry["epochs"][str(fraction)] = [epochs, batch, max(1, round(full * fraction))]
        return entry

    cnn = measure(*EX1_CNN)
    target = mean_sd(cnn["accuracy"]["1.0"])[0]
    sweep, trained = [], {}
    for hidden in b.ex1_sweep:
        result = train(config("exercise_mlp", {"hidden": hidden}, 1.0, b.seeds[0]))
        trained[hidden] = result
        sweep.append({"hidden": list(hidden), "params": count_params(result.model), "accuracy": result.test_accuracy})
    closest = min(sweep, key=lambda row: (abs(row["accuracy"] - target), row["params"]))
    hidden = tuple(closest["hidden"])
    same_accuracy = measure("exercise_mlp", {"hidden": hidden}, reuse=trained[hidden])
    del trained
    # One hidden layer of h units: 784 h + h + 10 h + 10 parameters.
    width = max(1, round((cnn["params"] - 10) / (784 + 1 + 10)))
    same_params = measure("exercise_mlp", {"hidden": (width,)})
    results = {"models": {"CNN": cnn, "MLP, same parameters": same_params, "MLP, same accuracy": same_accuracy},
               "sweep": sweep, "seeds": list(b.seeds), "test_images": len(images), "fractions": list(b.ex1_fractions),
               "shifts": list(EX1_SHIFTS), "train_size": full}
    _figure_1(run, results)
    return results


def _jsonable(kwargs: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def _figure_1(run: Run, results: dict) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, entry in results["models"].items():
        fracs = [f for f in results["fractions"] if str(f) in entry["accuracy"]]
        sizes = [max(1, round(results["train_size"] * f)) for f in fracs]
        m = [100 * mean_sd(entry["accuracy"][str(f)])[0] for f in fracs]
        s = [100 * mean_sd(entry["accuracy"][str(f)])[1] for f in fracs]
        left.errorbar(sizes, m, yerr=s, marker="o", capsize=3,
                      label=f"{EX1_LABELS.get(label, label)} ({entry['params']:,} params)")
        shifts = [0] + results["shifts"]
        m = [100 * mean_sd(entry["accuracy"]["1.0"])[0]] + [100 * mean_sd(entry["shifted"][str(v)])[0]
                                                            for v in results["shifts"]]
        s = [100 * mean_sd(entry["accuracy"]["1.0"])[1]] + [100 * mean_sd(entry["shifted"][str(v)])[1]
                                                            for v in results["shifts"]]
        right.errorbar(shifts, m, yerr=s, marker="o", capsize=3, label=EX1_LABELS.get(label, label))
    left.set(xscale="log", xlabel="training examples", ylabel="test accuracy (%)",
             title="less training data (MNIST)")
    right.set(xlabel="test digits shifted by (pixels)", ylabel="test accuracy (%)",
              title="shifted test digits (trained on all, unshifted)", xticks=[0] + results["shifts"])
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, figure_path(run, "ex1_cnn_vs_mlp.png"))


def render_1(r: dict) -> str:
    models = r["models"]
    cnn, small, large = (models[k] for k in ("CNN", "MLP, same parameters", "MLP, same accuracy"))
    fr = [str(f) for f in r["fractions"]]
    header = ("| network | parameters | " + " | ".join(f"trained on {round(r['train_size'] * float(f)):,}" for f in fr)
              + " | " + " | ".join(f"shifted {s} px" for s in r["shifts"]) + " |")
    lines = [header, "|" + "---|" * (2 + len(fr) + len(r["shifts"]))]
    for label, e in models.items():
        cells = [pct(e["accuracy"][f]) for f in fr] + [pct(e["shifted"][str(s)]) for s in r["shifts"]]
        label = EX1_LABELS.get(label, label)
        lines.append(f"| {label} (`{e['model']}`, {_kwargs(e['model_kwargs'])}) | {e['params']:,} | "
                     + " | ".join(cells) + " |")
    table = "\n".join(lines)
    acc = lambda e, f="1.0": 100 * mean_sd(e["accuracy"][f])[0]  # noqa: E731
    shifted = lambda e, s: 100 * mean_sd(e["shifted"][str(s)])[0]  # noqa: E731
    s_max = r["shifts"][-1]
    low = fr[-1]
    reach = ("No MLP of the sweep below reached the CNN's accuracy with the same training."
             if acc(large) < acc(cnn) - 100 * mean_sd(cnn["accuracy"]["1.0"])[1] else
             "An MLP of the sweep below matches it.")
    epochs = "; ".join(f"{round(r['train_size'] * float(f)):,} examples: {_count(e[0], 'epoch')} at batch {e[1]}"
                       for f, e in cnn["epochs"].items())
    sweep = "\n".join(["| MLP hidden layers | parameters | test accuracy (%) |", "|---|---:|---:|"] + [
        f"| {' x '.join(map(str, row['hidden']))} | {row['params']:,} | {100 * row['accuracy']:.2f} |"
        for row in r["sweep"]])
    text = f"""\
**Answer.** A convolutional layer connects each unit to a small patch only and reuses one small
kernel at every position, so it needs far fewer parameters than a dense layer on the same image
(and so less data, less overfitting and less compute), and a pattern it has learned is found
wherever it appears; a dense network must learn each pattern again at each position. Stacked,
convolutions also build the hierarchy images have: small local features first, then combinations of
them over larger areas. Measured on MNIST below, with {_count(len(cnn['accuracy']['1.0']), 'seed')} each (mean ± sd):

- **Parameters.** The CNN reaches {acc(cnn):.2f}% with {cnn['params']:,} parameters. An MLP with about
  as many parameters ({small['params']:,}) reaches {acc(small):.2f}%. {reach} The closest, {acc(large):.2f}%,
  has {large['params']:,} parameters, {large['params'] / cnn['params']:.0f} times as many.
- **Less data.** With {round(r['train_size'] * float(low)):,} training images the CNN still gets
  {acc(cnn, low):.1f}%, against {acc(small, low):.1f}% and {acc(large, low):.1f}% for the two MLPs.
- **Shifted digits.** Moving the test digits by {s_max} pixels (the networks were trained on centred
  digits, without augmentation) leaves the CNN at {shifted(cnn, s_max):.1f}% and the MLPs at
  {shifted(small, s_max):.1f}% and {shifted(large, s_max):.1f}%. The CNN is not shift invariant
  either (its Flatten head ties each feature to a position), but its convolutions find the strokes
  wherever they are, and its two max pools absorb small shifts.

{table}

Test accuracy (%) on {r['test_images']:,} MNIST test digits. "Shifted" is the mean over shifts up, down, left
and right, for the networks trained on all the data; the vacated border is black. Training: AdamW,
one-cycle learning rate (peak 3e-3), no augmentation, no dropout, the final weights; {epochs}.
The same-parameters MLP has one hidden layer as wide as gives the CNN's count; the nearest-accuracy MLP
is the one of this sweep (all training data, seed {r['seeds'][0]}) closest to the CNN's accuracy:

{sweep}

![CNN vs MLP](figures/ex1_cnn_vs_mlp.png)
"""
    return text


def _against_spread(difference: float, sd: float) -> str:
    """How a difference of two means compares with the seeds' standard deviation (both in points)."""
    if sd <= 0:
        return "with one seed each (no spread to compare with)"
    ratio = abs(difference) / sd
    if ratio <= 1:
        return "within one seed standard deviation: no difference"
    if ratio <= 2.5:
        return (f"{ratio:.1f} times the larger seed standard deviation: a small difference at most, which these "
                f"seeds do not settle")
    return f"{ratio:.1f} times the larger seed standard deviation: a real difference"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _kwargs(kwargs: dict) -> str:
    return ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in kwargs.items())


# ---------------------------------------------------------------------------------------------
# exercise 2: the memory arithmetic


BOOK_LAYERS = ((3, 100), (100, 200), (200, 400))  # (input maps, output maps), 3x3 kernels, stride 2, SAME
BOOK_INPUT = (200, 300, 3)
BOOK_BATCH = 50


def book_network():
    """The exercise's CNN as a user would write it, built abstractly (nothing allocated)."""
    from flax import nnx

    import zoo

    def make():
        rngs = nnx.Rngs(0)
        return nnx.Sequential(*[nnx.Conv(i, o, kernel_size=(3, 3), strides=2, padding="SAME", rngs=rngs)
                                for i, o in BOOK_LAYERS])

    return zoo.eval_shape(make)


def book_arithmetic(*, filter_inputs=None, stride: int = 2, rounding=math.ceil, bias: bool = True,
                    per_instance_mb_digits: int | None = None, count_input: bool = True) -> dict:
    """The exercise's arithmetic in code, with switches for the usual slips.

    filter_inputs: weights per filter are 3 x 3 x (this or the layer's input maps).
    stride / rounding: how the maps shrink (SAME padding rounds up).
    per_instance_mb_digits: round the training activations per instance to this many decimals of MB first.
    count_input: include the input batch in the training figure.
    """
    h, w, _ = BOOK_INPUT
    params, maps = 0, []
    for cin, cout in BOOK_LAYERS:
        k = 3 * 3 * (filter_inputs or cin)
        params += (k + bias) * cout
        h, w = rounding(h / stride), rounding(w / stride)
        maps.append(4 * h * w * cout)
    param_bytes = 4 * params
    inference = param_bytes + max(a + b for a, b in zip([4 * math.prod(BOOK_INPUT)] + maps, maps))
    per_instance = sum(maps)
    if per_instance_mb_digits is not None:
        per_instance = round(per_instance / 1e6, per_instance_mb_digits) * 1e6
    training = param_bytes + BOOK_BATCH * (per_instance + 4 * math.prod(BOOK_INPUT) * count_input)
    return {"params": params, "inference_bytes": int(inference), "training_bytes": int(training), "maps": maps}


def exercise_2(run: Run) -> dict:
    import zoo

    summary = zoo.summarize(book_network(), BOOK_INPUT, batch_size=BOOK_BATCH, xla=not run.quick)
    right = book_arithmetic()
    got = {"params": summary.params, "inference_bytes": summary.inference_bytes(1),
           "training_bytes": summary.training_bytes()}
    if any(got[k] != right[k] for k in got):  # two independent computations of one answer
        raise AssertionError(f"zoo.summarize {got} disagrees with the arithmetic {right}")
    slips = {
        "each filter sees only the 3 input channels (3x3x3) at every layer": book_arithmetic(filter_inputs=3),
        "biases forgotten": book_arithmetic(bias=False),
        "maps rounded down (25x37 for the last layer)": book_arithmetic(rounding=math.floor),
        "activations per instance rounded to 10.5 MB first (the book's own answer)":
            book_arithmetic(per_instance_mb_digits=1),
        "input batch left out of the training figure": book_arithmetic(count_input=False),
        "strides ignored (every map 200x300)": book_arithmetic(stride=1),
    }
    xla = [f.to_dict() for f in summary.xla]
    return {"summary": got, "layers": [[r.kind, list(r.output_shape[1:]), r.params, r.activation_bytes]
                                       for r in summary.layers], "slips": slips, "xla": xla,
            "param_bytes": summary.param_bytes}


def render_2(r: dict) -> str:
    s = r["summary"]
    rows = ["| layer | output (per image) | parameters | activation bytes (per image) |", "|---|---|---:|---:|"]
    for i, (kind, shape, params, nbytes) in enumerate(r["layers"], 1):
        rows.append(f"| {kind} {i} | {'x'.join(map(str, shape))} | {params:,} | {nbytes:,} |")
    slips = ["| the slip | parameters | inference, 1 image | training, batch 50 |", "|---|---:|---:|---:|",
             f"| **right** (zoo.summarize = the arithmetic in code) | **{s['params']:,}** | "
             f"**{s['inference_bytes']:,} B** ({s['inference_bytes'] / 1e6:.1f} MB) | "
             f"**{s['training_bytes']:,} B** ({s['training_bytes'] / 1e6:.1f} MB) |"]
    for what, v in r["slips"].items():
        cells = [f"{v[key]:,}" if v[key] == s[key] else f"~~{v[key]:,}~~"
                 for key in ("params", "inference_bytes", "training_bytes")]
        slips.append(f"| {what} | " + " | ".join(cells) + " |")
    xla = ""
    if r["xla"]:
        xrows = ["| computation | book-style bound | XLA (argument + output + temp) | XLA / bound |", "|---|---:|---:|---:|"]
        for f in r["xla"]:
            bound = s["inference_bytes"] if f["what"] == "inference" and f["batch_size"] == 1 else (
                s["training_bytes"] if f["what"] == "training" else None)
            if bound is None:
                continue
            xrows.append(f"| {f['what']}, batch {f['batch_size']} | {bound:,} B | {f['total_bytes']:,} B | "
                         f"{f['total_bytes'] / bound:.2f} |")
        xla = ("\nWhat XLA actually allocates for the compiled computations (jax's `memory_analysis()`; "
               "training = forward and backward pass, no optimizer state):\n\n" + "\n".join(xrows) + "\n")
    return f"""\
**Answer.** The layers have (3x3x3 + 1) x 100 = 2,800, (3x3x100 + 1) x 200 = 180,200 and
(3x3x200 + 1) x 400 = 720,400 parameters: **{s['params']:,}** in all. With stride 2 and SAME padding
the maps are 100x150, 50x75 and 25x38 (rounded up), 6,000,000, 3,000,000 and 1,520,000 bytes in
float32. One prediction needs at least the parameters ({r['param_bytes']:,} B) plus the two largest
consecutive outputs (6 + 3 MB): **{s['inference_bytes']:,} bytes** (12.6 MB). Training on 50 images
keeps every output for backpropagation: 50 x 10,520,000 B of activations + 50 x 720,000 B of input +
the parameters = **{s['training_bytes']:,} bytes, about {s['training_bytes'] / 1e6:.1f} MB**, a lower bound.
`zoo.summarize` gives the same three numbers from the network itself (the script checks them against
the arithmetic):

{chr(10).join(rows)}

Where answers go wrong (each row is the arithmetic with one slip; struck-through numbers are wrong).
Answers that count 3x3x3 inputs per filter for every layer, or quote 5,400 parameters or 2.6 GB,
are wrong; the book's own 564.6 MB rounds the 10.52 MB per image down to 10.5 MB:

{chr(10).join(slips)}
{xla}
docs/BENCHMARKS.md [explains where XLA needs more](BENCHMARKS.md#memory-the-books-estimate-vs-xla) than
the book's bound (inputs and outputs held as arguments, gradient buffers next to saved activations).
`zoo summary NAME --batch N` prints the same table for any registered model.
"""


# ---------------------------------------------------------------------------------------------
# exercise 3: the out-of-memory playbook


EX3_BASE = {"model": "exercise_cnn", "dataset": "mnist",
            "model_kwargs": {"widths": (32, 64, 128), "convs_per_stage": (1, 2, 1), "dropout": 0.0}}


def ex3_moves(batch: int) -> dict[str, dict]:
    """The playbook, one switch each, against the baseline (`EX3_BASE` at `batch`)."""
    kwargs = EX3_BASE["model_kwargs"]
    return {
        "baseline (float32)": {},
        f"smaller batch ({batch // 4})": {"batch_size": batch // 4},
        f"accumulate 4 x {batch // 4}": {"accumulate": 4},
        "bfloat16": {"dtype": "bfloat16"},
        "rematerialization": {"remat": True},
        "stride 2 in the first conv": {"model_kwargs": {**kwargs, "stem_stride": 2}},
        "fewer layers (one conv per stage)": {"model_kwargs": {**kwargs, "convs_per_stage": (1, 1, 1)}},
    }


def exercise_3(run: Run) -> dict:
    batch = run.budget.ex3_batch
    rows = {}
    steps = {}
    for name, change in ex3_moves(batch).items():
        if run.budget.ex3_moves is not None and name not in run.budget.ex3_moves:
            continue
        config = run.config(**{**EX3_BASE, "batch_size": batch, "schedule": "constant", **change})
        step = CompiledStep(config)
        steps[name] = step
        rows[name] = {"temp_bytes": step.temp_bytes, "argument_bytes": int(step.memory.argument_size_in_bytes),
                      "estimate_bytes": int(step.estimate_bytes), "params": int(step.params),
                      "compile_seconds": round(step.compile_seconds, 2), "flops": step.flops,
                      "examples_per_update": config.batch_size}
    import jax

    in_process = jax.device_count() >= 4  # else a subprocess with 4 forced host devices
    if in_process:
        parallel = CompiledStep(run.config(**{**EX3_BASE, "batch_size": batch, "schedule": "constant",
                                              "data_parallel": True}))
        steps[f"{jax.device_count()} devices"] = parallel
    times = alternate(steps, run.budget.rounds)
    if in_process:
        base, seconds = steps["baseline (float32)"], times.pop(f"{jax.device_count()} devices")
        parallel_probe = {"devices": jax.device_count(), "rows": {
            name: {"temp_bytes": s.temp_bytes, "argument_bytes": int(s.memory.argument_size_in_bytes),
                   "estimate_bytes": int(s.estimate_bytes), "seconds": t}
            for name, s, t in (("one device", base, times["baseline (float32)"]),
                               (f"{jax.device_count()} devices", parallel, seconds))}}
    else:
        parallel_probe = data_parallel_probe(run, batch)
    for name, seconds in times.items():
        rows[name]["seconds"] = seconds
    del steps
    _figure_3(run, rows, parallel_probe)
    return {"batch": batch, "rows": rows, "data_parallel": parallel_probe,
            "model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in EX3_BASE["model_kwargs"].items()}}


def data_parallel_probe(run: Run, batch: int) -> dict:
    """The baseline on one device and split over 4 host devices, alternating the two updates, in a
    subprocess with 4 forced host devices (XLA fixes the device count at start-up)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    request = json.dumps({"batch": batch, "rounds": run.budget.rounds, "quick": run.quick})
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--data-parallel-probe", request],
                          env=env, capture_output=True, text=True, cwd=REPO, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    if done.returncode or not lines:
        raise RuntimeError(f"the data-parallel probe failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("PROBE "):])


def measure_data_parallel(batch: int, rounds: int, quick: bool) -> dict:
    """`EX3_BASE` at `batch` on one device and with data_parallel over every device: memory and time."""
    import jax

    run = Run(out=Path("."), budget=QUICK if quick else FULL, quick=quick, command="")
    with exercise_models():
        base = {**EX3_BASE, "batch_size": batch, "schedule": "constant"}
        steps = {"one device": CompiledStep(run.config(**base)),
                 f"{jax.device_count()} devices": CompiledStep(run.config(**base, data_parallel=True))}
        times = alternate(steps, rounds)
        return {"devices": jax.device_count(),
                "rows": {name: {"temp_bytes": s.temp_bytes, "argument_bytes": int(s.memory.argument_size_in_bytes),
                                "estimate_bytes": int(s.estimate_bytes), "seconds": times[name]}
                         for name, s in steps.items()}}


def _run_probe(request: str) -> None:
    args = json.loads(request)
    out = measure_data_parallel(args["batch"], args["rounds"], args["quick"])
    print("PROBE " + json.dumps(out), flush=True)


def _figure_3(run: Run, rows: dict, probe: dict) -> None:
    plt = _pyplot()
    base = rows["baseline (float32)"]
    names = list(rows) + [f"data parallel, per device ({probe['devices']})"]
    one, many = probe["rows"].values()
    temps = [rows[n]["temp_bytes"] / base["temp_bytes"] for n in rows] + [many["temp_bytes"] / one["temp_bytes"]]
    times = [rows[n]["seconds"] / base["seconds"] for n in rows] + [many["seconds"] / one["seconds"]]
    fig, ax = plt.subplots(figsize=(9, 4))
    y = np.arange(len(names))
    ax.barh(y - 0.2, temps, 0.4, label="XLA temp memory / baseline")
    ax.barh(y + 0.2, times, 0.4, label="time per update / baseline")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set(xlabel="ratio to the baseline (float32, one device)", title="The out-of-memory playbook, one switch each")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, figure_path(run, "ex3_oom_playbook.png"))


def render_3(r: dict) -> str:
    rows, probe = r["rows"], r["data_parallel"]
    base = rows["baseline (float32)"]
    lines = ["| move (one switch) | examples per update | XLA temp memory | vs baseline | zoo.summarize bound | "
             "time per update | vs baseline |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['examples_per_update']} | {row['temp_bytes'] / 2**20:,.1f} MiB | "
                     f"{row['temp_bytes'] / base['temp_bytes']:.2f} | {row['estimate_bytes'] / 2**20:,.1f} MiB | "
                     f"{1e3 * row['seconds']:,.0f} ms | {row['seconds'] / base['seconds']:.2f} |")
    one, many = probe["rows"].values()
    lines.append(f"| data parallelism over {probe['devices']} devices (per device; own process) | {r['batch']} | "
                 f"{many['temp_bytes'] / 2**20:,.1f} MiB | {many['temp_bytes'] / one['temp_bytes']:.2f} | "
                 f"{many['estimate_bytes'] / 2**20:,.1f} MiB | {1e3 * many['seconds']:,.0f} ms | "
                 f"{many['seconds'] / one['seconds']:.2f} |")
    def ratio(prefix, key="temp_bytes"):
        name = next(n for n in rows if n.startswith(prefix))
        return f"{rows[name][key] / base[key]:.2f}x"

    def have(*prefixes):
        return all(any(n.startswith(p) for n in rows) for p in prefixes)

    def lowered(prefix):
        name = next(n for n in rows if n.startswith(prefix))
        return " (here it did **not** lower the memory)" if rows[name]["temp_bytes"] >= 0.98 * base["temp_bytes"] else ""

    micro = r["batch"] // 4
    moves = []
    if have("smaller batch", "accumulate"):
        moves.append(f"a **smaller batch** ({micro}) cuts the memory with the batch ({ratio('smaller batch')}); "
                     f"**accumulating** 4 micro-batches of {micro} keeps the update of batch {r['batch']} at "
                     f"{ratio('accumulate')} the memory, for {ratio('accumulate', 'seconds')} the time;")
    if have("bfloat16"):
        moves.append(f"**16-bit floats** (bfloat16 computation, float32 parameters): {ratio('bfloat16')} the temp "
                     f"memory and {ratio('bfloat16', 'seconds')} the time{lowered('bfloat16')}: the activations' bound "
                     f"(zoo.summarize) halves, XLA:CPU's buffers do not; on GPUs and TPUs, which compute in bf16, "
                     f"mixed precision is the usual first move;")
    if have("rematerialization"):
        moves.append(f"**rematerialization** of each block (conv-BN-ReLU unit or pool; `remat=True`): "
                     f"{ratio('rematerialization')} the temp memory for {ratio('rematerialization', 'seconds')} the "
                     f"time{lowered('rematerialization')}; with one convolution per block there is little to recompute, "
                     f"and remat pays when a block holds many layers (a ResNet stage, a transformer layer);")
    if have("stride 2", "fewer layers"):
        moves.append(f"a **larger stride** in the first layer ({ratio('stride 2')} the memory, "
                     f"{ratio('stride 2', 'seconds')} the time: 4x fewer positions in every later layer, and a "
                     f"different, coarser network) or **fewer layers** ({ratio('fewer layers')}, "
                     f"{ratio('fewer layers', 'seconds')} the time);")
    moves.append(f"**data parallelism**: each of {probe['devices']} devices holds a quarter of the batch, "
                 f"{many['temp_bytes'] / one['temp_bytes']:.2f}x the temp memory of one device doing it all "
                 f"(measured in its own process with `XLA_FLAGS=--xla_force_host_platform_device_count="
                 f"{probe['devices']}`; the 4 \"devices\" share this machine's cores, so the time, "
                 f"{many['seconds'] / one['seconds']:.2f}x, says nothing about real devices).")
    bullets = "\n".join(f"- {m}" for m in moves)
    return f"""\
**Answer.** The book's five moves (a smaller batch, 16-bit floats, a larger stride, fewer layers,
several devices) and two more (gradient accumulation, rematerialization), each one switch here
(`TrainConfig` or a model option), measured on
one network (MnistNet-wide's layout, {base['params']:,} parameters: `exercise_cnn` with
{_kwargs(r['model_kwargs'])}) at batch {r['batch']} of 28x28 MNIST images, as XLA's temp memory of the
compiled update (jax's `compiled.memory_analysis()`: activations, gradients and scratch buffers;
the parameters and optimizer state are arguments, {base['argument_bytes'] / 2**20:,.1f} MiB here) and its time:

{bullets}

Not measured here: closing other processes that hold memory, a larger GPU, offloading to host memory.

{chr(10).join(lines)}

Time per update is the median of {_rounds(r)} alternating rounds (all moves in turn, in one process), so
the ratios hold under the machine's load; absolute times do not. "zoo.summarize bound" is the book's
lower bound for one device's micro-batch (parameters + input + every layer output), which the training
loop prints before each run (`train.loop.memory_check`).

![the playbook](figures/ex3_oom_playbook.png)
"""


def _rounds(r: dict) -> int:
    return r.get("rounds", 8)


# ---------------------------------------------------------------------------------------------
# exercise 4: max pooling vs a strided convolution


EX4_KWARGS = {"widths": (8, 16, 32), "convs_per_stage": (1, 1, 1), "dropout": 0.0}
EX4_DATASET = "fashion_mnist"


def compare_trained(run: Run, variants: dict[str, dict], dataset: str, epochs: int, batch: int = 128,
                    after=None) -> dict:
    """Train each variant (TrainConfig fields) for every seed; time one update of each, alternating.

    after(label, result) -> dict of extra numbers per trained run (optional).
    """
    import zoo

    out = {}
    for label, fields in variants.items():
        accs, secs, extra = [], [], []
        for seed in run.budget.seeds:
            result = train(run.config(dataset=dataset, epochs=epochs, batch_size=batch, seed=seed,
                                      warmup_epochs=0.1 * epochs, **fields))
            accs.append(result.test_accuracy)
            secs.append(result.seconds)
            if after is not None:
                extra.append(after(label, result))
        model = zoo.create_model(fields["model"], num_classes=10, input_size=(28, 28), in_channels=1, abstract=True,
                                 **fields["model_kwargs"])
        summary = zoo.summarize(model, (28, 28, 1), xla=False)
        out[label] = {"accuracy": accs, "train_seconds": secs, "params": summary.params, "flops": summary.flops,
                      "extra": extra, "steps": result.steps}
    steps = {label: CompiledStep(run.config(dataset=dataset, batch_size=batch, schedule="constant", **fields))
             for label, fields in variants.items()}
    for label, seconds in alternate(steps, max(run.budget.rounds, 1) * 2).items():
        out[label]["update_seconds"] = seconds
        out[label]["xla_flops_per_update"] = steps[label].flops
    return out


def exercise_4(run: Run) -> dict:
    variants = {"2x2 max pool": {"model": "exercise_cnn", "model_kwargs": {**EX4_KWARGS, "downsample": "pool"}},
                "3x3 stride-2 conv": {"model": "exercise_cnn", "model_kwargs": {**EX4_KWARGS, "downsample": "conv"}}}
    rows = compare_trained(run, variants, EX4_DATASET, run.budget.ex45_epochs, batch=run.budget.ex45_batch)
    return {"rows": rows, "epochs": run.budget.ex45_epochs, "dataset": EX4_DATASET, "batch": run.budget.ex45_batch,
            "model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in EX4_KWARGS.items()}}


def render_4(r: dict) -> str:
    pool, conv = r["rows"].values()
    lines = ["| downsampling | parameters | FLOPs per image (forward) | time per update | ratio | test accuracy (%) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['params']:,} | {row['flops'] / 1e6:,.2f} M | {1e3 * row['update_seconds']:,.0f} ms | "
                     f"{row['update_seconds'] / pool['update_seconds']:.2f} | {pct(row['accuracy'])} |")
    d_acc = 100 * (mean_sd(conv["accuracy"])[0] - mean_sd(pool["accuracy"])[0])
    spread = 100 * max(mean_sd(conv["accuracy"])[1], mean_sd(pool["accuracy"])[1])
    verdict = _against_spread(d_acc, spread)
    return f"""\
**Answer.** A max-pooling layer has no parameters and costs almost nothing to compute; a
convolution with the same stride adds weights and multiply-adds and must learn what to keep. Max
pooling also adds a little invariance to small shifts, and it keeps the strongest response in each
window, which a learned strided convolution may or may not learn. In the same network (MnistNet's
backbone, `exercise_cnn` with {_kwargs(r['model_kwargs'])}, {_count(r['epochs'], 'epoch')} on Fashion-MNIST,
{_count(len(pool['accuracy']), 'seed')}),
swapping the two 2x2 max pools for 3x3 stride-2 conv units (conv-BatchNorm-ReLU, channels kept):

{chr(10).join(lines)}

The convolution costs {conv['params'] - pool['params']:,} more parameters ({conv['params'] / pool['params']:.2f}x),
{conv['flops'] / pool['flops']:.2f}x the FLOPs and {conv['update_seconds'] / pool['update_seconds']:.2f}x the time per
update,
and its accuracy differs by {d_acc:+.2f} points, {verdict}. FLOPs are `zoo.summarize`'s (2 x multiply-adds of
convolutions and dense layers; pooling counts 0). Time per update: the loop's compiled update at batch {r['batch']},
median of alternating calls in one process.
"""


# ---------------------------------------------------------------------------------------------
# exercise 5: local response normalization


EX5_DATASET = "fashion_mnist"


def lrn_scales(model, images: np.ndarray, dataset: str) -> dict:
    """How much each LRN layer of a trained net rescales its inputs: output / input over the positive
    (post-ReLU) inputs of up to 500 test images, run through the net's own layers up to that point."""
    import jax
    from flax import nnx

    from train import data
    from zoo.layers import LocalResponseNorm
    from zoo.pretrained import preprocess

    graphdef, state = nnx.split(model.features)

    @jax.jit
    def lrn_inputs_and_outputs(state, x):
        features, pairs = nnx.merge(graphdef, state), {}
        for name in features.step_names:
            layer = getattr(features, name)
            y = layer(x)
            if isinstance(layer, LocalResponseNorm):
                pairs[name] = (x, y)
            x = y
        return pairs

    x = preprocess(np.asarray(images[:500]), data.preprocessing_record(dataset))
    out = {}
    for name, (inputs, outputs) in lrn_inputs_and_outputs(state, x).items():
        inputs, outputs = np.asarray(inputs).ravel(), np.asarray(outputs).ravel()
        keep = inputs > 1e-3
        factor = outputs[keep] / inputs[keep]
        out[name] = {"mean": float(factor.mean()), "cv": float(factor.std() / factor.mean()),
                     "p1": float(np.percentile(factor, 1)), "p99": float(np.percentile(factor, 99))}
    return out


def exercise_5(run: Run) -> dict:
    images, _ = load_test_split(EX5_DATASET, run.budget.test_examples)
    variants = {"with LRN": {"model": "exercise_alexnet", "model_kwargs": {"lrn": True}},
                "without LRN": {"model": "exercise_alexnet", "model_kwargs": {"lrn": False}}}
    after = lambda label, result: lrn_scales(result.model, images, EX5_DATASET) if label == "with LRN" else {}  # noqa: E731
    rows = compare_trained(run, variants, EX5_DATASET, run.budget.ex45_epochs, batch=run.budget.ex45_batch,
                           after=after)
    return {"rows": rows, "epochs": run.budget.ex45_epochs, "dataset": EX5_DATASET}


def render_5(r: dict) -> str:
    lrn, plain = r["rows"].values()
    lines = ["| network | parameters | time per update | ratio | test accuracy (%) |", "|---|---:|---:|---:|---:|"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['params']:,} | {1e3 * row['update_seconds']:,.0f} ms | "
                     f"{row['update_seconds'] / plain['update_seconds']:.2f} | {pct(row['accuracy'])} |")
    d_acc = 100 * (mean_sd(lrn["accuracy"])[0] - mean_sd(plain["accuracy"])[0])
    spread = 100 * max(mean_sd(lrn["accuracy"])[1], mean_sd(plain["accuracy"])[1])
    scales = {}
    for run_scales in lrn["extra"]:
        for layer, s in run_scales.items():
            scales.setdefault(layer, []).append(s)
    scale_text = "; ".join(_describe_scales(layer, per_seed) for layer, per_seed in scales.items())
    worst_cv = max((s["cv"] for v in scales.values() for s in v), default=0.0)
    if worst_cv < 0.05:
        strength = ("That is almost a fixed rescaling by 2^-0.75 = 0.595, which the next layer's weights absorb: "
                    "with inputs normalized to unit scale the activations stay far too small for the sum to matter "
                    "(AlexNet's were larger: it took raw 0-255 pixels).")
    else:
        strength = "The factor varies across positions and maps: the layers do normalize."
    helps = "LRN helps here" if d_acc > 2 * spread else "LRN does not help here"
    verdict = f"{helps}: the networks with it differ by {d_acc:+.2f} points, {_against_spread(d_acc, spread)}"
    return f"""\
**Answer.** LRN (Krizhevsky et al. 2012, sec. 3.3) makes the most active maps at a position inhibit
their neighbouring maps, which encourages maps to specialize; AlexNet and GoogLeNet used it after
their first layers; it cut AlexNet's top-1 and top-5 ImageNet error rates by 1.4 and 1.2 points. VGG's
authors found it did not improve their network (configuration A-LRN) and cost memory and time, and batch normalization
(which normalizes each channel by batch statistics and speeds training up) replaced it. Measured: an AlexNet-style
small network (AlexNet's layer table at 1/12 to 1/16 of its widths, 28x28 inputs, `exercise_alexnet`, the
zoo's `LocalResponseNorm` with the paper's constants after conv1 and conv2), {_count(r['epochs'], 'epoch')} on
Fashion-MNIST, {_count(len(lrn['accuracy']), 'seed')}:

{chr(10).join(lines)}

What the numbers show: {verdict}; LRN makes each update {lrn['update_seconds'] / plain['update_seconds']:.2f}x as long.
With the paper's constants (k = 2, alpha = 1e-4, beta = 0.75) the divisor is (2 + 1e-4 x the sum of
the squares of 5 neighbouring maps)^0.75; the trained networks' LRN layers multiply their positive
inputs by {scale_text}. {strength} So: LRN goes in the lower layers, where it was meant to make
the first maps specialize, of a network whose activations are large enough for it to act; today one
adds it to reproduce AlexNet or GoogLeNet, and uses batch normalization otherwise.
"""


def _describe_scales(layer: str, per_seed: list[dict]) -> str:
    mean = statistics.fmean(s["mean"] for s in per_seed)
    cv = statistics.fmean(s["cv"] for s in per_seed)
    low, high = min(s["p1"] for s in per_seed), max(s["p99"] for s in per_seed)
    return (f"{layer}: x{mean:.3f} on average, coefficient of variation {cv:.3f}, "
            f"1st-99th percentile x{low:.3f} to x{high:.3f}")


# ---------------------------------------------------------------------------------------------
# exercise 6: the innovations of the landmark architectures


def exercise_6(run: Run) -> dict:
    import zoo

    names = run.budget.ex6_models or [n for n in zoo.list_models() if zoo.get_spec(n).family not in
                                      ("mnistnet", "exercises")]
    rows = []
    for name in names:
        spec = zoo.get_spec(name)
        native = zoo.summarize(zoo.create_model(name, abstract=True), spec.input_shape, xla=False)
        if spec.input_shape == (224, 224, 3):
            at_224 = native
        else:
            at_224 = zoo.summarize(zoo.create_model(name, abstract=True, input_size=224, in_channels=3),
                                   (224, 224, 3), xla=False)
        rows.append({"name": name, "family": spec.family, "paper": spec.paper, "year": spec.year, "url": spec.url,
                     "introduced": spec.introduced, "input": list(spec.input_shape), "published": spec.num_params,
                     "params": native.params, "flops": native.flops, "params_224": at_224.params,
                     "flops_224": at_224.flops, "head": spec.head_kind})
    _figure_6(run, rows)
    return {"rows": rows}


def _figure_6(run: Run, rows: list[dict]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    # One line per paper (ResNet and SE-ResNet share a family), named by its models' common stem.
    papers = list(dict.fromkeys(row["paper"] for row in rows if row["name"] != "lenet5"))
    colours = dict(zip(papers, plt.get_cmap("tab10")(np.arange(len(papers)))))
    for paper in papers:
        members = [row for row in rows if row["paper"] == paper]
        family = re.sub(r"(_[a-z])?\d+$", "", members[0]["name"])
        x = [row["flops_224"] / 1e9 for row in members]
        y = [row["params_224"] / 1e6 for row in members]
        ax.plot(x, y, "o-", color=colours[paper], ms=5, lw=0.8,
                label=f"{family} ({min(row['year'] for row in members)})")
        for row, xi, yi in zip(members, x, y):
            short = row["name"].replace("efficientnet_", "").replace("seresnet", "se").replace("resnet", "")
            ax.annotate(short, (xi, yi), fontsize=7, xytext=(4, -3), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="GFLOPs per 224x224 image (2 x multiply-adds)",
           ylabel="parameters (millions, 1000 classes)", title="Landmark CNNs at 224x224 (zoo.summarize, abstract models)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, figure_path(run, "ex6_params_vs_flops.png"))


def _gflops(flops: float) -> str:
    return f"{flops / 1e9:.2f}" if flops >= 1e7 else f"{flops / 1e9:.4f}"


def render_6(r: dict) -> str:
    by_name = {row["name"]: row for row in r["rows"]}
    fewer = (f"1/{by_name['alexnet']['params'] / by_name['googlenet']['params']:.0f}"
             if {"alexnet", "googlenet"} <= set(by_name) else "a fraction of")
    lines = ["| model | year | paper | what it introduced | parameters (at its input) | published | "
             "GFLOPs at its input | parameters at 224x224 | GFLOPs at 224x224 |",
             "|---|---|---|---|---:|---|---:|---:|---:|"]
    seen = set()
    for row in r["rows"]:
        check = "same" if row["params"] == row["published"] else f"{row['published']:,}"
        size = "x".join(map(str, row["input"]))
        paper, introduced = ((f"[{row['paper']}]({row['url']})", row["introduced"]) if row["family"] not in seen
                             else ("(as above)", ""))
        seen.add(row["family"])
        lines.append(f"| `{row['name']}` | {row['year']} | {paper} | {introduced} | "
                     f"{row['params']:,} ({size}) | {check} | {_gflops(row['flops'])} | {row['params_224']:,} | "
                     f"{_gflops(row['flops_224'])} |")
    return f"""\
**Answer.** Compared with LeNet-5, **AlexNet** was much larger and deeper, stacked convolutions
directly on top of each other, and trained on GPUs with ReLU, dropout, overlapping max pooling, data
augmentation and LRN. **GoogLeNet**'s Inception units run 1x1, 3x3 and 5x5 convolutions and a pool in
parallel, with 1x1 convolutions as bottlenecks, and a global average pool instead of big Dense layers:
22 layers deep with {fewer} the parameters of AlexNet. **VGG** showed that depth built from 3x3
convolutions alone works. **ResNet**'s skip
connections let blocks learn residuals, so networks of 100+ layers train. **SENet** adds
squeeze-and-excitation: each block reweights its channels by gates computed from their global means.
**Xception** replaces Inception units with depthwise separable convolutions (a per-channel spatial
filter, then a 1x1 cross-channel one). **EfficientNet** scales depth, width and resolution together
with one compound coefficient over an architecture found by search (MBConv blocks with SE).

The table is the registry's own metadata (`zoo.get_spec(name)`: paper, year, `introduced`), with
counts from `zoo.summarize` on abstract models (shapes only: nothing is allocated, so EfficientNet-B7 at
600x600 costs nothing). FLOPs are 2 x multiply-adds of convolutions and dense layers. "published": the
count the paper or its reference implementation gives, checked against ours. At 224x224 the Flatten
heads of LeNet-5 and AlexNet change size (LeNet-5 is a 32x32 network: its 224x224 row only shows what a
Flatten head costs), and EfficientNet-B1..B7 are shown below their own resolutions.

{chr(10).join(lines)}

![parameters vs FLOPs](figures/ex6_params_vs_flops.png)
"""


# ---------------------------------------------------------------------------------------------
# exercises 7 and 8: fully convolutional networks and segmentation


EX7_MODELS = ("mnistnet", "lenet5")


def exercise_7(run: Run) -> dict:
    import jax.numpy as jnp

    import convert
    import zoo
    from train.digit_scenes import generate_scene
    from zoo.pretrained import preprocess_for

    images, _ = load_test_split("mnist", 256 if not run.quick else 16)
    scene = generate_scene("test", 0, size=run.budget.scene_size)
    out = {"digits": len(images), "scene_shape": list(scene.image.shape), "models": {}}
    for name in run.budget.ex7_models or EX7_MODELS:
        classifier = zoo.create_model(name, pretrained="mnist")
        fcn = convert.to_fcn(classifier)
        x = jnp.asarray(preprocess_for(name, "mnist", np.asarray(images)))
        logits = np.asarray(classifier(x))
        cells = np.asarray(fcn(x))[:, 0, 0]
        score_map = np.asarray(fcn(jnp.asarray(preprocess_for(name, "mnist", scene.image[None, ..., None]))))
        g = fcn.geometry
        out["models"][name] = {
            "head": classifier.head.describe(), "fcn_head": fcn.describe(),
            "max_abs_diff": float(np.abs(cells - logits).max()), "logit_scale": float(np.abs(logits).max()),
            "argmax_agree": float((cells.argmax(-1) == logits.argmax(-1)).mean()),
            "score_shape": list(score_map.shape[1:]), "stride": list(g.stride),
            "receptive_field": list(g.receptive_field), "valid": bool(g.valid)}
    return out


def _head_steps(steps: list[dict]) -> str:
    words = []
    for s in steps:
        if s["op"] == "dense":
            words.append(f"Dense({s['in_features']:,} -> {s['out_features']})")
        elif s["op"] == "conv":
            kh, kw = s["kernel_size"]
            words.append(f"{kh}x{kw} conv ({s['in_features']} -> {s['out_features']} channels)")
        elif s["op"] == "activation":
            words.append(s["fn"])
        elif s["op"] == "dropout":
            words.append(f"dropout {s['rate']:g}")
        elif s["op"] in ("flatten", "avg"):
            words.append("Flatten" if s["op"] == "flatten" else "global average")
        elif s["op"] == "avg_pool":
            words.append(f"{s['window'][0]}x{s['window'][1]} average pool")
    return " -> ".join(words)


def render_7(r: dict) -> str:
    all_agree = all(m["argmax_agree"] == 1.0 for m in r["models"].values())
    agree = ", and the predicted class is the same for every digit" if all_agree else (
        " (the predicted class differs on " + ", ".join(
            f"{100 * (1 - m['argmax_agree']):.1f}% of the digits for {name}" for name, m in r["models"].items()) + ")")
    lines = ["| shipped classifier | its head | the FCN's head (`convert.to_fcn`) | max abs. difference at 28x28 | "
             f"score map of a {r['scene_shape'][0]}x{r['scene_shape'][1]} scene | one cell judges |",
             "|---|---|---|---:|---|---|"]
    for name, m in r["models"].items():
        h, w, k = m["score_shape"]
        rf, stride = m["receptive_field"], m["stride"]
        lines.append(f"| `{name}` (`mnist`) | {_head_steps(m['head'])} | {_head_steps(m['fcn_head'])} | "
                     f"{m['max_abs_diff']:.1e} (logits up to {m['logit_scale']:.0f}) | {h}x{w}x{k} | "
                     f"a {rf[0]}x{rf[1]} window, every {stride[0]} px |")
    return f"""\
**Answer.** A fully convolutional network (FCN) has only convolutional and pooling layers, so it
takes images of any size and returns a map of outputs, one per window, instead of one output. A
Dense layer reading the Flatten of an h x w x c map is a convolution with an h x w kernel, c input
and n output channels and VALID padding, with the same weights reshaped (row (y w + x) c + ch of
the Dense kernel is tap (y, x, ch)); each Dense layer after it becomes a 1x1 convolution. On the
training size the FCN's output is 1x1 and equals the classifier's; on a larger image it slides the
whole classifier over it in one pass, sharing the overlapping convolutions. `convert.to_fcn` does
this to any zoo classifier (and to plain `nnx.Sequential` models); a global-average-pool head becomes
its Dense layers as 1x1 convolutions and an average pool the size of the training map.

On {r['digits']} MNIST test digits (the shipped classifiers, `zoo.create_model(name, pretrained="mnist")`),
the FCN's one cell equals the classifier's logits to float rounding{agree}:

{chr(10).join(lines)}

Against classifying each window separately, docs/BENCHMARKS.md measures the FCN
[23-34x faster](BENCHMARKS.md#converting-classifiers-to-fcns-speed-and-exactness) for LeNet-5, AlexNet
and VGG-16. The segmentation nets of exercise 8 grow from the converted MnistNet.
"""


EX8_NETS = ("mnistnet_fcn32s", "mnistnet_fcn16s", "mnistnet_fcn8s")
BOUNDARY_PX = 2


def boundary_band(label: np.ndarray, width: int = BOUNDARY_PX) -> np.ndarray:
    """(H, W) bool: pixels within `width` px (Euclidean) of a digit's edge, on either side; the edge is
    where digit pixels (labels 0-9) meet anything else. Void pixels are left to the caller."""
    from scipy import ndimage

    digit = label < 10
    if not digit.any():
        return np.zeros_like(digit)
    to_outside = ndimage.distance_transform_edt(digit)      # digit pixels: distance to the nearest non-digit
    to_digit = ndimage.distance_transform_edt(~digit)       # others: distance to the nearest digit pixel
    return np.where(digit, to_outside <= width, to_digit <= width)


def exercise_8(run: Run) -> dict:
    import convert
    from train import tasks
    from train.digit_scenes import BACKGROUND, NUM_CLASSES, VOID, generate_scene
    from zoo import pretrained

    nets = {name: convert.DensePredictor(convert.load_shipped_segmentation(name, "digit_scenes"))
            for name in EX8_NETS}
    totals = {name: {"confusion": np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64), "band": [0, 0], "inside": [0, 0]}
              for name in nets}
    picks = []
    for index in range(run.budget.scenes):
        scene = generate_scene("test", index, size=run.budget.scene_size)
        image = scene.image[..., None] / 255.0
        band = boundary_band(scene.label)
        valid = scene.label != VOID
        labels_by_net = {}
        for name, predictor in nets.items():
            predicted = predictor.predict(image).labels()
            labels_by_net[name] = predicted
            t = totals[name]
            t["confusion"] += tasks.confusion(scene.label, predicted, NUM_CLASSES)
            right = (predicted == scene.label) & valid
            t["band"][0] += int(right[band].sum())
            t["band"][1] += int((valid & band).sum())
            t["inside"][0] += int(right[~band].sum())
            t["inside"][1] += int((valid & ~band).sum())
        if index < 20:
            picks.append((len(scene.digits), index))
    rows = {}
    for name, t in totals.items():
        scores = tasks.scores_from_confusion(t["confusion"])
        recorded = pretrained.metadata(name, "digit_scenes")
        rows[name] = {"mean_iou": scores["mean_iou"], "pixel_accuracy": scores["pixel_accuracy"],
                      "boundary_accuracy": t["band"][0] / max(t["band"][1], 1),
                      "interior_accuracy": t["inside"][0] / max(t["inside"][1], 1),
                      "band_pixels": t["band"][1], "other_pixels": t["inside"][1],
                      "recorded_mean_iou": recorded.get("test_mean_iou"),
                      "class_iou": scores["class_iou"],
                      "background_share": float(t["confusion"][BACKGROUND].sum() / max(t["confusion"].sum(), 1)),
                      "strides": recorded["segmentation"]["output_strides"]}
    shown = max(picks)[1]
    _figure_8(run, nets, shown)
    return {"rows": rows, "scenes": run.budget.scenes, "shown_scene": shown, "background": BACKGROUND,
            "band_px": BOUNDARY_PX}


def _digit_colours() -> np.ndarray:
    """(256, 3): tab10 for the digits 0-9 (its grey, 7, made light cyan), black background, dark grey void."""
    plt = _pyplot()
    colours = np.zeros((256, 3))
    colours[:10] = plt.get_cmap("tab10")(np.arange(10))[:, :3]
    colours[7] = (0.55, 0.9, 1.0)
    colours[10] = 0.0
    colours[255] = 0.3
    return colours


def _colour_labels(label: np.ndarray) -> np.ndarray:
    return _digit_colours()[label]


def _figure_8(run: Run, nets: dict, index: int) -> None:
    from train.digit_scenes import VOID, generate_scene

    plt = _pyplot()
    scene = generate_scene("test", index, size=run.budget.scene_size)
    image = scene.image[..., None] / 255.0
    shown = {"FCN-32s": nets["mnistnet_fcn32s"].predict(image).labels(),
             "FCN-8s": nets["mnistnet_fcn8s"].predict(image).labels()}
    smallest = min(scene.digits, key=lambda d: d["box"][2], default={"box": [0, 0, *scene.image.shape]})
    top, left, h, w = smallest["box"]
    pad = 10
    crop = (slice(max(top - pad, 0), top + h + pad), slice(max(left - pad, 0), left + w + pad))
    valid = scene.label != VOID
    fig, axes = plt.subplots(2, 5, figsize=(17, 7))
    for row, window in enumerate((np.s_[:, :], crop)):
        panels = [("input", np.repeat(scene.image[..., None], 3, -1) / 255.0),
                  ("ground truth (dark grey: void rim)", _colour_labels(scene.label))]
        for name, labels in shown.items():
            panels.append((name, _colour_labels(labels)))
        errors = np.repeat(scene.image[..., None], 3, -1) / 255.0 * 0.35
        wrong32 = (shown["FCN-32s"] != scene.label) & valid
        wrong8 = (shown["FCN-8s"] != scene.label) & valid
        errors[wrong32 & ~wrong8] = (1.0, 0.2, 0.2)
        errors[wrong8 & ~wrong32] = (0.2, 0.6, 1.0)
        errors[wrong8 & wrong32] = (1.0, 1.0, 0.2)
        panels.append(("errors: red 32s only, blue 8s only, yellow both", errors))
        for ax, (title, picture) in zip(axes[row], panels):
            ax.imshow(picture[window], interpolation="nearest")
            ax.set_title(title if row == 0 else f"{title} (zoom)", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    from matplotlib.patches import Patch

    colours = _digit_colours()
    handles = [Patch(color=colours[d], label=str(d)) for d in range(10)] + [Patch(color=colours[255], label="void")]
    fig.legend(handles=handles, loc="lower center", ncol=11, fontsize=9, title="class colours")
    fig.suptitle(f"digit_scenes test scene {index} ({scene.image.shape[0]}x{scene.image.shape[1]}); "
                 f"the bottom row zooms on its smallest digit", fontsize=11)
    save_figure(fig, figure_path(run, "ex8_fcn32s_vs_fcn8s.png"))


def render_8(r: dict) -> str:
    rows = r["rows"]
    lines = ["| net | output strides (score, skips, last upsampling) | mean IU | pixel accuracy | "
             f"accuracy within {r['band_px']} px of a digit's edge | elsewhere | mean IU recorded with the weights |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        strides = ", ".join(f"{k} {v}" for k, v in row["strides"].items())
        recorded = f"{row['recorded_mean_iou']:.3f}" if row["recorded_mean_iou"] is not None else "-"
        lines.append(f"| `{name}` | {strides} | {row['mean_iou']:.3f} | {100 * row['pixel_accuracy']:.2f}% | "
                     f"{100 * row['boundary_accuracy']:.2f}% | {100 * row['interior_accuracy']:.2f}% | {recorded} |")
    c32, c8 = rows["mnistnet_fcn32s"], rows["mnistnet_fcn8s"]
    band = c32["band_pixels"]
    err32, err8 = 1 - c32["boundary_accuracy"], 1 - c8["boundary_accuracy"]
    return f"""\
**Answer.** The main difficulty: a classification CNN loses spatial resolution on purpose. Each
stride or pool throws away where things are (it keeps what they are), so its last map is coarse, and
upsampling it blurs the boundaries of objects. A segmentation network must say what every pixel is,
so it must recover detail the strides discarded. Long et al.'s FCNs add skip connections: scores
from earlier, finer maps are added to the upsampled coarse scores (FCN-16s, FCN-8s). Other answers:
per-pixel labels are expensive to collect, and the classes are unbalanced (here
{100 * c32['background_share']:.0f}% of the scored pixels are background).

Measured with the shipped nets (grown by `convert` from the MNIST classifier and trained on
`digit_scenes`; see [docs/BENCHMARKS.md](BENCHMARKS.md#segmentation-fcn-32s--16s--8s-grown-from-the-converted-mnist-classifier)),
`convert.DensePredictor(net).predict(image)` on {r['scenes']} test scenes, void pixels left out,
{band:,} pixels in the boundary band:

{chr(10).join(lines)}

The skips matter most at the edges: within {r['band_px']} px of a digit's edge FCN-32s (no skip, scores at
stride 4 upsampled) gets {100 * err32:.1f}% of the pixels wrong and FCN-8s (two skips, down to stride 1)
{100 * err8:.1f}%; away from the edges both are above {100 * min(c32['interior_accuracy'], c8['interior_accuracy']):.1f}%.
Mean IU
(the mean over the 11 classes of intersection over union, from `train.tasks.confusion`) goes from
{c32['mean_iou']:.3f} to {c8['mean_iou']:.3f}. Our MnistNet backbone has a total stride of 4, not VGG's 32:
the names keep the paper's meaning (no skip, one, two).

The picture: test scene {r['shown_scene']} (the one with the most digits among the first 20) with both
nets' labels and their errors; the bottom row zooms on its smallest digit, where stride 4 costs most.

![FCN-32s vs FCN-8s](figures/ex8_fcn32s_vs_fcn8s.png)
"""


# ---------------------------------------------------------------------------------------------
# exercise 9: our best MNIST CNN


EX9_SHIPPED = ("mnistnet_wide", "mnistnet", "lenet5")


def exercise_9(run: Run) -> dict:
    import zoo
    from zoo import pretrained

    images, labels = load_test_split("mnist", run.budget.test_examples)
    rows = {}
    for name in run.budget.ex9_models or EX9_SHIPPED:
        model = zoo.create_model(name, pretrained="mnist")
        forward = predictor(model)
        correct = 0
        for start in range(0, len(images), 1000):
            x = pretrained.preprocess_for(name, "mnist", np.asarray(images[start:start + 1000]))
            correct += int((forward(x).argmax(-1) == labels[start:start + 1000]).sum())
        rows[name] = {"accuracy": correct / len(images), "recorded": pretrained.metadata(name, "mnist")["test_accuracy"],
                      "params": zoo.count_params(model), "images": len(images)}
    return {"rows": rows}


def render_9(r: dict) -> str:
    lines = ["| shipped model | parameters | test accuracy, re-measured now | recorded with the weights |",
             "|---|---:|---:|---:|"]
    for name, row in r["rows"].items():
        lines.append(f"| `{name}` (`mnist`) | {row['params']:,} | {100 * row['accuracy']:.2f}% "
                     f"({row['images']:,} images) | {100 * row['recorded']:.2f}% |")
    return f"""\
**Answer.** Our best from-scratch MNIST CNN is `mnistnet_wide` (3x3 conv-BatchNorm-ReLU stacks at
widths 32/64/128, two 2x2 max pools, dropout 0.25; AdamW with a one-cycle schedule, label smoothing,
an exponential moving average of the weights and small affine augmentation, 18 epochs): **99.737 ±
0.042%** over three seeds, the shipped seed at 99.75%. The recipe is `train/recipes.py`'s
`mnistnet_wide_mnist`, and docs/BENCHMARKS.md has [the training results](BENCHMARKS.md#training-results-recipes-measured-accuracy-and-the-shipped-weights),
the curves and the runs that did not help. The shipped weights, re-evaluated here:

{chr(10).join(lines)}
"""


# ---------------------------------------------------------------------------------------------
# the page


EXERCISES = {
    1: ("CNN vs fully connected network", "What are the advantages of a CNN over a fully connected DNN for "
        "image classification?", exercise_1, render_1),
    2: ("The memory arithmetic", "A CNN of three 3x3 convolutional layers (stride 2, SAME padding, 100, 200 and "
        "400 feature maps) takes 200x300 RGB images. How many parameters does it have? With 32-bit floats, how "
        "much RAM does it need at least to classify one image, and to train on a mini-batch of 50?",
        exercise_2, render_2),
    3: ("Out of memory", "Your GPU runs out of memory while training a CNN: what five things could you try?",
        exercise_3, render_3),
    4: ("Max pooling or a strided convolution", "Why would you add a max pooling layer rather than a "
        "convolutional layer with the same stride?", exercise_4, render_4),
    5: ("Local response normalization", "When would you add a local response normalization layer?",
        exercise_5, render_5),
    6: ("The landmark architectures", "What were the main innovations of AlexNet compared with LeNet-5, and those "
        "of GoogLeNet, ResNet, SENet, Xception and EfficientNet?", exercise_6, render_6),
    7: ("Fully convolutional networks", "What is a fully convolutional network? How can you convert a dense "
        "layer into a convolutional layer?", exercise_7, render_7),
    8: ("Semantic segmentation", "What is the main technical difficulty of semantic segmentation?",
        exercise_8, render_8),
    9: ("The best MNIST CNN", "Build your own CNN from scratch and reach the highest accuracy you can on MNIST.",
        exercise_9, render_9),
}

# The figures drawn from a section's stored numbers alone, which --render redraws (exercise 8's needs the nets).
FIGURES_FROM_DATA = {1: lambda run, d: _figure_1(run, d), 3: lambda run, d: _figure_3(run, d["rows"], d["data_parallel"]),
                     6: lambda run, d: _figure_6(run, d["rows"])}

CODE_NAMES = {1: "exercise_1", 2: "exercise_2", 3: "exercise_3", 4: "exercise_4", 5: "exercise_5", 6: "exercise_6",
              7: "exercise_7", 8: "exercise_8", 9: "exercise_9"}

HEADER = """\
# Chapter 14's exercises, answered by running code

Hands-On Machine Learning with Scikit-Learn, Keras and TensorFlow (Géron, 3rd ed.), chapter 14
("Deep Computer Vision Using Convolutional Neural Networks"), exercises 1-9. Each section gives the
question (paraphrased), our answer in a few sentences, and the measurements behind it, made with
this project's own models, training loop and tools by [`scripts/exercises.py`](../scripts/exercises.py):

    .venv/bin/python scripts/exercises.py              # every number and figure on this page (about 25 minutes on 2 CPU cores)
    .venv/bin/python scripts/exercises.py --only 3     # one exercise; its section is replaced
    .venv/bin/python scripts/exercises.py --render     # re-render the page (and figures 1, 3, 6) from the numbers stored in it

Accuracies are the mean ± standard deviation over 3 seeds where two networks are compared; trainings
are short (a few epochs of small networks), so they rank designs but are not the best these networks
can do ([exercise 9](#9-the-best-mnist-cnn) and docs/BENCHMARKS.md are). Times on a shared CPU are
noisy; the ratios, measured by alternating the compared calls in one process, are the numbers to read.
Each section says the machine and date of its run.
"""


def section_marker(number: int, edge: str) -> str:
    return f"<!-- {edge} exercise {number} -->"


def render_section(number: int, data: dict) -> str:
    title, question, _, render = EXERCISES[number]
    meta = data["_run"]
    try:
        body = render(data)
    except Exception as e:  # keep the measured numbers: fix render_N, then --render
        body = f"(rendering failed: {type(e).__name__}: {e}; the numbers are stored below)"
    return "\n".join([
        section_marker(number, "begin"),
        f"## {number}. {title}", "",
        f"> **Question.** {question}", "",
        body.rstrip(), "",
        f"*Run:* `{meta['command']}` on {meta['machine']}, {meta['date']} (load average {meta['load']}), "
        f"{meta['seconds']:.0f} s. *Code:* [`{CODE_NAMES[number]}` and `render_{number}` in "
        f"scripts/exercises.py]({CODE}).", "",
        f"<!-- data {number}: {json.dumps(data, separators=(',', ':'))} -->",
        section_marker(number, "end"), ""])


def read_sections(page: Path) -> dict[int, dict]:
    """The numbers stored in an existing page, by exercise."""
    if not page.is_file():
        return {}
    found = {}
    for match in re.finditer(r"<!-- data (\d+): (.*?) -->", page.read_text()):
        found[int(match.group(1))] = json.loads(match.group(2))
    return found


def write_page(run: Run, sections: dict[int, dict]) -> Path:
    parts = [HEADER]
    parts.append(" · ".join(f"[{n}. {EXERCISES[n][0]}](#{_anchor(n)})" for n in sorted(EXERCISES)) + "\n")
    for number in sorted(EXERCISES):
        if number in sections:
            parts.append(render_section(number, sections[number]))
        else:
            parts.append("\n".join([section_marker(number, "begin"), f"## {number}. {EXERCISES[number][0]}", "",
                                    f"(not run yet: `scripts/exercises.py --only {number}`)", "",
                                    section_marker(number, "end"), ""]))
    page = run.out / "EXERCISES.md"
    run.out.mkdir(parents=True, exist_ok=True)
    tmp = page.with_name(f".{page.name}.tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, page)
    return page


def _anchor(number: int) -> str:
    title = f"{number}. {EXERCISES[number][0]}".lower()
    return re.sub(r"[^a-z0-9 -]", "", title).replace(" ", "-")


def run_exercises(run: Run, numbers: Sequence[int]) -> dict[int, dict]:
    """Run the given exercises, write the page (keeping other sections' stored numbers); returns the new data."""
    import jax

    page = run.out / "EXERCISES.md"
    sections = read_sections(page)
    new = {}
    with exercise_models():
        for number in numbers:
            started = time.perf_counter()
            print(f"exercise {number}: {EXERCISES[number][0]} ...", file=sys.stderr, flush=True)
            data = EXERCISES[number][2](run)
            if number == 3:
                data["rounds"] = run.budget.rounds
            data["_run"] = {"command": run.command, "machine": machine(), "load": load_average(),
                            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                            "seconds": time.perf_counter() - started, "quick": run.quick,
                            "backend": jax.default_backend()}
            new[number] = sections[number] = data
            write_page(run, sections)  # after each exercise: a long run keeps what it has done
            print(f"exercise {number} done in {data['_run']['seconds']:.0f} s", file=sys.stderr, flush=True)
    return new


def parse_only(text: str | None) -> list[int]:
    if not text:
        return sorted(EXERCISES)
    numbers = [int(part) for part in text.split(",") if part.strip()]
    unknown = [n for n in numbers if n not in EXERCISES]
    if unknown:
        raise SystemExit(f"--only: no exercise {unknown}; choose from 1-9")
    return numbers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated exercise numbers (default: all nine)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1-2 steps; needs --out")
    parser.add_argument("--out", type=Path, default=None, help="where EXERCISES.md and figures/ go (default: docs/)")
    parser.add_argument("--render", action="store_true", help="re-render the page from its stored numbers; run nothing")
    parser.add_argument("--data-parallel-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data_parallel_probe:
        _run_probe(args.data_parallel_probe)
        return 0
    out = args.out if args.out is not None else REPO / "docs"
    if args.quick and args.out is None:
        raise SystemExit("--quick writes a smoke version: give it a scratch --out directory, not docs/")
    command = "scripts/exercises.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    run = Run(out=out, budget=QUICK if args.quick else FULL, quick=args.quick, command=command)
    if args.render:
        sections = read_sections(out / "EXERCISES.md")
        for number, data in sections.items():
            if number in FIGURES_FROM_DATA:
                FIGURES_FROM_DATA[number](run, data)
        print(write_page(run, sections))
        return 0
    started = time.perf_counter()
    run_exercises(run, parse_only(args.only))
    print(f"wrote {out / 'EXERCISES.md'} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
