"""Throughput of zoo models vs the same networks in plain PyTorch: same weights, same batch, one process.

    .venv/bin/python scripts/bench_vs_torch.py [--models resnet50,vgg16_fcn] [--repeats 5] [--quick]
                                               [--no-compile] [--inference-only] [--device cpu|cuda]
                                               [--allocator retain|glibc]

Models: resnet50, efficientnet_b0, vgg16, xception (batch 8 at the registry's input size:
224, 224, 224, 299), mnistnet (batch 128 at 28x28) and vgg16_fcn (VGG-16 through
`convert.to_fcn`, one 512x512 image, inference only). The PyTorch twins (scripts/torch_reference.py,
torch.nn only) get the zoo model's random weights, with random BatchNorm statistics; before anything
is timed the parameter counts must be equal and the eval-mode logits agree (max |diff| relative to
max |logit| below TOLERANCE).

Rows, each timed with calls alternating between the sides (median of `repeats`; the first call of
each side, which compiles, is timed on its own and reported apart, then two untimed rounds let the
heap reach its steady size, as in any long run):
    infer: eval mode. Ours: as `convert.DensePredictor` runs it (BatchNorms folded, convolution
        epilogues in oneDNN's calls, `jax.jit` over `nnx.split` state: `zoo_inference`). PyTorch:
        eager under `torch.no_grad()`, and `torch.compile` (inductor, its defaults).
    train: one SGD step, Nesterov momentum 0.9, lr 0.01, softmax cross-entropy, train mode
        (dropout, stochastic depth, BatchNorm batch statistics). Ours: the library's own jitted
        update, `train.loop.make_functions` (what `zoo train` runs; the batch gathered by index from
        arrays on the device), and "plain-jit": the same update as one `jax.jit` of value_and_grad
        and optax, as a user writes it by hand. PyTorch: model.train(), zero_grad, loss.backward(),
        opt.step(), eager and compiled.
FLOPs: the analytic count of `zoo.summarize` (2 x multiply-adds of convolutions and dense layers;
the same network on both sides), training counted as 3x the forward pass. Peak: cores x 2 FMA
units x float32 lanes (16 with avx512f, 8 with AVX2) x 2 flops x the clock of /proc/cpuinfo.
PyTorch runs with its default threads; JAX with the default XLA flags (whatever XLA_FLAGS holds).
Both sides share the process's memory settings: by default freed memory is kept for reuse, as the
`zoo` command runs (`--allocator retain`, zoo/allocator.py); `--allocator glibc` leaves glibc as it
comes, where a call of one side faults in the pages the other has just returned.

The builders and checks are importable (scripts/bench_device.py reuses them on a GPU):
`build_pair`, `check_equal`, `side_by_side.alternating_times`, `zoo_inference`, `zoo_train_step`,
`torch_inference`, `torch_train_step`, `run_model`, and `run_table` (JSON-ready results).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference  # noqa: E402
from side_by_side import alternating_times  # noqa: E402

import zoo  # noqa: E402
from convert.fold import fold_batchnorm  # noqa: E402
from zoo import allocator  # noqa: E402
from zoo.fuse import conv_epilogues  # noqa: E402

TOLERANCE = 1e-4  # max |ours - torch| / max |torch logits|
LEARNING_RATE, MOMENTUM = 0.01, 0.9


@dataclasses.dataclass(frozen=True)
class Case:
    """One model of the table: registry name, input side, batch, and whether it trains."""

    name: str
    arch: str
    size: int
    batch: int
    train: bool = True
    fcn_from: int | None = None  # vgg16_fcn: the classifier's training size


def cases(quick: bool = False) -> dict[str, Case]:
    """The benchmark's models; `quick`: tiny inputs and batches (a smoke test, seconds)."""
    if quick:
        return {"resnet50": Case("resnet50", "resnet50", 64, 2),
                "efficientnet_b0": Case("efficientnet_b0", "efficientnet_b0", 64, 2),
                "vgg16": Case("vgg16", "vgg16", 64, 2),
                "xception": Case("xception", "xception", 73, 2),
                "mnistnet": Case("mnistnet", "mnistnet", 28, 16),
                "vgg16_fcn": Case("vgg16_fcn", "vgg16", 96, 1, train=False, fcn_from=64)}
    side = lambda arch: zoo.get_spec(arch).input_shape[0]  # noqa: E731
    return {name: Case(name, name, side(name), 8) for name in ("resnet50", "efficientnet_b0", "vgg16", "xception")} | {
        "mnistnet": Case("mnistnet", "mnistnet", 28, 128),
        "vgg16_fcn": Case("vgg16_fcn", "vgg16", 512, 1, train=False, fcn_from=224)}


# --------------------------------------------------------------------------- the two models


def randomize_batchnorm(model: nnx.Module, seed: int = 0) -> None:
    """Random BatchNorm scale, bias, mean and variance (fresh ones are 1, 0, 0, 1, which would let a
    swapped or missing statistic pass the equality check)."""
    rng = np.random.default_rng(seed)
    for _, bn in nnx.iter_graph(model):
        if isinstance(bn, nnx.BatchNorm):
            c = bn.scale.shape[0]
            bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
            bn.bias[...] = jnp.asarray(rng.normal(0, 0.1, c), jnp.float32)
            bn.mean[...] = jnp.asarray(rng.normal(0, 0.1, c), jnp.float32)
            bn.var[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)


def build_pair(arch: str, size: int | None = None, *, fcn_from: int | None = None, num_classes: int | None = None,
               seed: int = 0, **options):
    """(zoo model, PyTorch model) of `arch` holding the same weights, both in eval mode.

    Args:
        arch: a registry name with a PyTorch twin (ResNet, VGG, EfficientNet, Xception, MnistNet).
        size: input side the classifier is built for (default: the registry's).
        fcn_from: VGG only: build the classifier at fcn_from x fcn_from and return its FCN
            (`convert.to_fcn`), run on images of any size; the PyTorch twin has conv fc6/fc7/fc8.
        options: zoo family options (e.g. dropout=0.0), given to both sides.
    """
    spec = zoo.get_spec(arch)
    built = fcn_from or size or spec.input_shape[0]
    num_classes = num_classes or spec.num_classes
    model = zoo.create_model(arch, num_classes=num_classes, input_size=built, rngs=seed, **options)
    randomize_batchnorm(model, seed)
    input_shape = (built, built, spec.input_shape[2])
    theirs = torch_reference.build_torch(arch, num_classes=num_classes, input_shape=input_shape,
                                         fcn=fcn_from is not None, **options)
    torch_reference.load_zoo_weights(theirs, model, arch)
    ours = model
    if fcn_from is not None:
        import convert

        ours = convert.to_fcn(model)
    ours.eval()
    theirs.eval()
    return ours, theirs


def count_params(ours, theirs) -> tuple[int, int]:
    return zoo.count_params(ours), torch_reference.count_torch_params(theirs)


def to_torch_images(x: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """(N, H, W, C) numpy -> (N, C, H, W) contiguous torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def zoo_inference(model, input_shape, *, fast_compile: bool = False) -> Callable:
    """x (N, H, W, C) -> logits (numpy), as `convert.DensePredictor` runs a network: its BatchNorms
    folded (`convert.fold_batchnorm`, traced at input_shape (H, W, C)), its convolution epilogues
    in oneDNN's calls (`zoo.fuse.conv_epilogues`), `jax.jit` over the `nnx.split` state; blocks
    until ready. fast_compile: without XLA's backend optimizations (tests: compiles faster, runs slower)."""
    graphdef, state = nnx.split(fold_batchnorm(model, tuple(input_shape)))
    options = {"xla_backend_optimization_level": 0} if fast_compile else None
    predict = jax.jit(conv_epilogues(lambda state, x: nnx.merge(graphdef, state)(x)), compiler_options=options)
    return lambda x: np.asarray(jax.block_until_ready(predict(state, x)))


def torch_inference(model, *, compiled: bool = False, device: str = "cpu") -> Callable:
    """x (N, C, H, W) tensor -> output tensor, eval mode, no_grad; `compiled`: through torch.compile."""
    model.eval()
    forward = torch.compile(model) if compiled else model

    def run(x):
        with torch.no_grad():
            y = forward(x)
        _sync(device)
        return y

    return run


def check_equal(ours, theirs, x: np.ndarray, *, device: str = "cpu", fast_compile: bool = False) -> dict:
    """Eval-mode outputs of both on x (N, H, W, C): {"max_abs", "scale" (max |torch|), "rel"}.

    A 4-D output (an FCN's score map, NCHW in torch) is compared in NHWC.
    """
    a = zoo_inference(ours, x.shape[1:], fast_compile=fast_compile)(jnp.asarray(x))
    b = torch_inference(theirs, device=device)(to_torch_images(x, device)).cpu().numpy()
    if b.ndim == 4:
        b = b.transpose(0, 2, 3, 1)
    if a.shape != b.shape:
        raise AssertionError(f"output shapes differ: ours {a.shape}, torch {b.shape}")
    max_abs = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(b)))
    return {"max_abs": max_abs, "scale": scale, "rel": max_abs / max(scale, 1e-30)}


@dataclasses.dataclass
class ArrayTask:
    """`train.loop`'s task protocol on ready float images: the batch is gathered by index, the loss
    is softmax cross-entropy on integer labels, as `train.tasks.Classification` computes it."""

    num_classes: int

    def batch(self, arrays, idx, keys):
        images, labels = arrays
        return images[idx], labels[idx]

    def inputs(self, images):
        return images

    def loss(self, logits, y):
        loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(y, self.num_classes)).mean()
        return loss, (logits.argmax(-1) == y).mean()

    def zero_totals(self):
        return {"loss_sum": jnp.float32(0)}

    def eval_totals(self, logits, labels, mask):
        return {"loss_sum": jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * mask)}


def zoo_train_step(model, x, y, *, learning_rate: float = LEARNING_RATE, momentum: float = MOMENTUM,
                   fast_compile: bool = False) -> Callable:
    """A callable running one update of the library's training loop on (x, y); returns the loss
    of that step (computed before the update), as a float.

    The step is `train.loop.make_functions`'s jitted `train_steps` (optimizer "sgd": Nesterov
    momentum, no weight decay here, constant learning rate), on a copy of the model's state.
    x: (B, H, W, C) float32, y: (B,) int. fast_compile: the loop's option (tests; slower steps).
    """
    from train.bench import loop_step
    from train.config import TrainConfig

    batch = int(x.shape[0])
    config = TrainConfig(model=getattr(model, "name", "model"), batch_size=batch, optimizer="sgd",
                         learning_rate=learning_rate, momentum=momentum, weight_decay=0.0, schedule="constant",
                         progress=False, fast_compile=fast_compile)
    num_classes = [layer for layer in model.head.layers if isinstance(layer, nnx.Linear)][-1].out_features
    fns, state = loop_step(config, ArrayTask(num_classes), model)
    arrays = (jnp.asarray(x), jnp.asarray(y, jnp.int32))
    order = jnp.arange(batch, dtype=jnp.int32)
    holder = [state]

    def step():
        holder[0], metrics = fns.train_steps(holder[0], arrays, order, 1)
        return float(metrics[0, 0])

    return step


def zoo_plain_train_step(model, x, y, *, learning_rate: float = LEARNING_RATE, momentum: float = MOMENTUM) -> Callable:
    """The same update as `zoo_train_step` written as a user would by hand: one `jax.jit` over
    `nnx.split` state (value_and_grad, optax.sgd with Nesterov momentum), no `lax.scan` around it.
    Returns a callable running one step and returning its loss."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(learning_rate, momentum=momentum, nesterov=True)

    def loss_fn(params, rest, x, y):
        m = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))  # BatchNorm may update fresh Variables only
        loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        return loss, nnx.state(m, nnx.Not(nnx.Param))  # the new BatchNorm statistics, RNG counts

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, rest, opt_state, x, y):
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    copy_tree = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
    carry = [copy_tree(params), copy_tree(rest)]
    carry.append(tx.init(carry[0]))
    xj, yj = jnp.asarray(x), jnp.asarray(y, jnp.int32)
    model.eval()

    def run():
        carry[0], carry[1], carry[2], loss = step(*carry, xj, yj)
        return float(loss)

    return run


def torch_train_step(model, x: torch.Tensor, y: torch.Tensor, *, compiled: bool = False,
                     learning_rate: float = LEARNING_RATE, momentum: float = MOMENTUM, device: str = "cpu") -> Callable:
    """A callable running one SGD step (Nesterov momentum, as the zoo's "sgd") in train mode; returns
    that step's loss (before the update). x: (B, C, H, W), y: (B,) int64."""
    model.train()
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum, nesterov=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        value = loss.item()
        _sync(device)
        return value

    return step


# --------------------------------------------------------------------------- one model, all rows


def forward_flops(model, input_shape) -> int:
    """2 x multiply-adds of one example's forward pass (`zoo.summarize`, analytic)."""
    return int(zoo.summarize(model, tuple(input_shape), batch_size=1, xla=False).flops)


def run_model(case: Case, repeats: int, *, compile_torch: bool = True, device: str = "cpu", train: bool = True,
              log=print) -> dict:
    """Build, check and time one Case: {"case", "params", "equal", "flops", "rows": [...]}."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    ours, theirs = build_pair(case.arch, case.size, fcn_from=case.fcn_from)
    theirs.to(device)
    spec = zoo.get_spec(case.arch)
    shape = (case.size, case.size, spec.input_shape[2])
    ours_params, torch_params = count_params(ours, theirs)
    if ours_params != torch_params:
        raise AssertionError(f"{case.name}: {ours_params:,} parameters here, {torch_params:,} in PyTorch")
    x = rng.normal(0, 1, (case.batch, *shape)).astype(np.float32)
    equal = check_equal(ours, theirs, x, device=device)
    log(f"{case.name}: {ours_params:,} parameters on both sides; logits max |diff| {equal['max_abs']:.2e} "
        f"of max |logit| {equal['scale']:.3g} (relative {equal['rel']:.2e}); built and checked in "
        f"{time.perf_counter() - start:.0f} s")
    if not equal["rel"] < TOLERANCE:
        raise AssertionError(f"{case.name}: logits differ by {equal['rel']:.2e} relative (tolerance {TOLERANCE})")
    flops = forward_flops(ours, shape)
    result = {"case": case, "params": ours_params, "equal": equal, "flops": flops, "rows": []}

    xj, xt = jnp.asarray(x), to_torch_images(x, device)
    infer = zoo_inference(ours, shape)
    eager = torch_inference(theirs, device=device)
    fns = {"ours": lambda: infer(xj), "eager": lambda: eager(xt)}
    if compile_torch:
        compiled = torch_inference(theirs, compiled=True, device=device)
        fns["compiled"] = lambda: compiled(xt)
    medians, first = alternating_times(fns, repeats)
    result["rows"].append({"mode": "infer", "batch": case.batch, "medians": medians, "first": first,
                           "flops": flops})
    log(_row_log(case, "infer", medians, first))

    if case.train and train:
        y = rng.integers(0, spec.num_classes, case.batch)
        yt = torch.from_numpy(y.astype(np.int64)).to(device)
        fns = {"ours": zoo_train_step(ours, x, y), "ours_plain": zoo_plain_train_step(ours, x, y),
               "eager": torch_train_step(theirs, xt, yt, device=device)}
        if compile_torch:
            twin = copy.deepcopy(theirs)  # its own weights and optimizer: the eager steps do not move them
            fns["compiled"] = torch_train_step(twin, xt, yt, compiled=True, device=device)
        medians, first = alternating_times(fns, repeats)
        result["rows"].append({"mode": "train", "batch": case.batch, "medians": medians, "first": first,
                               "flops": 3 * flops})
        log(_row_log(case, "train", medians, first))
    return result


def _row_log(case, mode, medians, first) -> str:
    parts = []
    for name in medians:
        m, f = medians[name], first[name]
        parts.append(f"{name} {type(m).__name__}" if isinstance(m, Exception)
                     else f"{name} {1e3 * m:.1f} ms (first {f:.1f} s)")
    return f"  {case.name} {mode}: " + ", ".join(parts)


# --------------------------------------------------------------------------- the table


def machine_peak() -> tuple[float, str]:
    """(float32 FLOP/s peak of this CPU, how it was computed) from /proc/cpuinfo."""
    cores = os.cpu_count() or 1
    mhz, flags = None, ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz") and mhz is None:
                    mhz = float(line.split(":")[1])
                elif line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    mhz = mhz or 0.0
    lanes = 16 if " avx512f" in flags else 8
    peak = cores * 2 * lanes * 2 * mhz * 1e6
    how = (f"{cores} cores x 2 FMA units x {lanes} float32 lanes ({'avx512f' if lanes == 16 else 'AVX2'}) x 2 flops "
           f"x {mhz / 1e3:.3f} GHz (/proc/cpuinfo 'cpu MHz') = {peak / 1e9:.0f} GFLOP/s")
    return peak, how


def _rate(value, batch) -> float | None:
    return None if isinstance(value, Exception) or value is None else batch / value


def _cell_rate(value, batch) -> str:
    if isinstance(value, Exception):
        return f"failed: {type(value).__name__}"
    return "-" if value is None else f"{batch / value:.2f}"


def _gflops(rate, flops, peak) -> str:
    if not rate:
        return "-"
    achieved = rate * flops
    return f"{achieved / 1e9:.1f}" + (f" ({100 * achieved / peak:.0f}%)" if peak else "")


def format_table(results: list[dict], peak: float | None) -> str:
    header = ("| model | input | mode | ours img/s | ours plain-jit img/s | torch eager img/s | ours/eager | "
              "torch.compile img/s | ours/compiled | ours GFLOP/s | eager GFLOP/s | compiled GFLOP/s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        case = r["case"]
        for row in r["rows"]:
            b, m = row["batch"], row["medians"]
            rates = {k: _rate(m.get(k), b) for k in ("ours", "ours_plain", "eager", "compiled")}
            ratio = {k: f"{rates['ours'] / rates[k]:.2f}x" if rates["ours"] and rates[k] else "-"
                     for k in ("eager", "compiled")}
            gflops = {k: _gflops(rates[k], row["flops"], peak) for k in ("ours", "eager", "compiled")}
            cells = [case.name, f"{b}x{case.size}x{case.size}", row["mode"], _cell_rate(m.get("ours"), b),
                     _cell_rate(m.get("ours_plain"), b), _cell_rate(m.get("eager"), b), ratio["eager"],
                     _cell_rate(m.get("compiled"), b), ratio["compiled"], gflops["ours"], gflops["eager"],
                     gflops["compiled"]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_warmups(results: list[dict]) -> str:
    lines = ["| model | mode | ours first call (jit compile) s | ours plain-jit first call s | eager first call s | "
             "torch.compile first call s |", "|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            cells = []
            for k in ("ours", "ours_plain", "eager", "compiled"):
                v = row["first"].get(k)
                cells.append("-" if v is None else (f"failed: {type(v).__name__}: {str(v).splitlines()[0][:120]}"
                                                    if isinstance(v, Exception) else f"{v:.1f}"))
            lines.append(f"| {r['case'].name} | {row['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_checks(results: list[dict]) -> str:
    lines = ["| model | parameters (both) | forward GFLOPs / image | logits max abs diff | max abs logit | relative |",
             "|---|---|---|---|---|---|"]
    for r in results:
        e = r["equal"]
        lines.append(f"| {r['case'].name} | {r['params']:,} | {r['flops'] / 1e9:.3f} | {e['max_abs']:.2e} | "
                     f"{e['scale']:.3g} | {e['rel']:.2e} |")
    return "\n".join(lines)


def _json_value(value):
    if isinstance(value, Exception):
        return f"failed: {type(value).__name__}: {str(value).splitlines()[0][:200] if str(value) else ''}"
    return None if value is None else round(float(value), 6)


def run_table(names, *, device: str = "cpu", quick: bool = False, repeats: int = 5, compile_torch: bool = True,
              train: bool = True, log=print) -> dict:
    """Run the benchmark for the models `names` (keys of `cases()`); JSON-ready results.

    Returns {"torch", "torch_threads", "device", "peak_flops", "peak", "rows", "checks", "table",
    "first_calls", "equality"}: "rows" one dict per (model, mode) with seconds per call and images/s
    of each side ("failed: ..." for a side that raised), "checks" the parameter counts and logit
    differences, and the three markdown tables as printed by `main`. A model that fails to build
    or time is left out with its error in "errors"; unequal models raise AssertionError.
    """
    table = cases(quick)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {', '.join(table)}")
    peak, how = machine_peak() if device == "cpu" else (None, "")
    results, errors = [], {}
    for name in names:
        try:
            results.append(run_model(table[name], repeats, compile_torch=compile_torch, device=device, train=train,
                                     log=log))
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - one model failing leaves the others' rows
            traceback.print_exc()
            errors[name] = f"{type(e).__name__}: {e}".splitlines()[0]
    rows = []
    for r in results:
        for row in r["rows"]:
            b = row["batch"]
            rows.append({"model": r["case"].name, "input": f"{b}x{r['case'].size}x{r['case'].size}", "mode": row["mode"],
                         "flops_per_image": row["flops"],
                         "seconds": {k: _json_value(v) for k, v in row["medians"].items()},
                         "images_per_s": {k: (round(b / v, 3) if isinstance(v, float) else _json_value(v))
                                          for k, v in row["medians"].items()},
                         "first_call_s": {k: _json_value(v) for k, v in row["first"].items()}})
    checks = [{"model": r["case"].name, "params": r["params"], "flops_per_image": r["flops"], **r["equal"]}
              for r in results]
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": device,
            "peak_flops": peak, "peak": how, "repeats": repeats, "rows": rows, "checks": checks, "errors": errors,
            "table": format_table(results, peak), "first_calls": format_warmups(results),
            "equality": format_checks(results)}


TABLES = ("table", "first_calls", "equality")


def _run_in_fresh_processes(names, argv) -> dict:
    """Each model through this script in its own process (its output streamed), the tables merged."""
    import tempfile

    merged = {key: [] for key in TABLES}
    report = {"peak_flops": None, "errors": {}}
    options = [a for i, a in enumerate(argv) if a != "--models" and (i == 0 or argv[i - 1] != "--models")
               and not a.startswith("--models=")]
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "tables.json"
            done = subprocess.run([sys.executable, __file__, *options, "--models", name, "--tables-to", str(out)],
                                  check=False)
            if not out.exists():
                report["errors"][name] = f"its process ended with exit code {done.returncode}"
                continue
            child = json.loads(out.read_text())
        report["peak_flops"] = child["peak_flops"]
        report["errors"].update(child["errors"])
        for key in TABLES:
            lines = child[key].splitlines()
            merged[key] += lines if not merged[key] else lines[2:]  # one header
    report.update({key: "\n".join(lines) for key, lines in merged.items()})
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated, from: " + ",".join(cases()))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side and row (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny inputs and batches (a smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--inference-only", action="store_true", help="skip the training rows")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (PyTorch's side; JAX uses its default device)")
    parser.add_argument("--allocator", choices=("retain", "glibc"), default="retain",
                        help="retain (default): freed memory stays for reuse, so neither side's calls fault in "
                             "pages the other gave back (zoo.allocator.retain_freed_memory); glibc: as it comes")
    parser.add_argument("--one-process", action="store_true",
                        help="all models in this process (default: each in a fresh one, so one model's freed "
                             "memory does not shape the next's timings)")
    parser.add_argument("--tables-to", default=None, help=argparse.SUPPRESS)  # a child's tables, as JSON
    args = parser.parse_args(argv)
    if args.allocator == "retain":
        allocator.retain_freed_memory()  # before either framework starts its threads
    names = args.models.split(",") if args.models else list(cases(args.quick))
    unknown = [n for n in names if n not in cases(args.quick)]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(cases())}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: this PyTorch has no CUDA")
    model_name = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
        if line.startswith("Model name")), "?")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}; {platform.node()}; CPU {model_name}, "
          f"{os.cpu_count()} cores; {uptime}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}); "
          f"torch {torch.__version__} on {args.device}, torch.get_num_threads() = {torch.get_num_threads()}")
    if args.device == "cpu":
        print(f"peak: {machine_peak()[1]}")
    if len(names) > 1 and not args.one_process:
        report = _run_in_fresh_processes(names, argv if argv is not None else sys.argv[1:])
    else:
        report = run_table(names, device=args.device, quick=args.quick, repeats=args.repeats,
                           compile_torch=not args.no_compile, train=not args.inference_only)
    if args.tables_to:
        Path(args.tables_to).write_text(json.dumps({k: report[k] for k in TABLES + ("peak_flops", "errors")}))
    peak = report["peak_flops"]
    print()
    print(report["table"])
    print(f"\n(images/s: median of {args.repeats} calls per side, alternating; ratio = ours / PyTorch, > 1: "
          f"ours faster; GFLOP/s from zoo.summarize's analytic forward count, x3 for a training step"
          + (f", % of the {peak / 1e9:.0f} GFLOP/s peak)" if peak else ")"))
    print("\nFirst calls (compilation), not in the medians:\n")
    print(report["first_calls"])
    print("\nEquality before timing (eval mode, same weights, random BatchNorm statistics):\n")
    print(report["equality"])
    for name, error in report["errors"].items():
        print(f"{name}: failed: {error}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
