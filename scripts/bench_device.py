"""Every number the project reports from an accelerator, in one run (at most ~8 minutes on one H100/H200).

    python3 scripts/bench_device.py --out results.json      # on the GPU machine
    .venv/bin/python scripts/bench_device.py --smoke         # every section at tiny sizes, on the CPU (the suite runs it)
    .venv/bin/python scripts/bench_device.py --only dense,segment

Sections (each reports its numbers, or why it could not run, and never stops the others):
  checks    backend, device, and that the CPU-only fast paths (zoo/cpu_conv.py, oneDNN custom calls)
            are off on an accelerator: `cpu_conv.enabled()` and the compiled training step's custom calls;
  train     ResNet-50 training images/s through the loop's own step (`train.bench.measure`), float32 and
            bfloat16, with model-FLOPs utilization (XLA's FLOP count of the step / time / the device's
            peak) against MLPerf's anchor of about 7,700 images/s per H100;
  infer     ResNet-50 inference images/s, float32 and bfloat16;
  torch     the zoo-vs-PyTorch table of scripts/bench_vs_torch.py on this device (PyTorch is on the GPU
            machine);
  dense     a VGG-16 FCN's dense prediction in megapixels/s at 1024x1024 and 4096x4096 (float32,
            bfloat16) through `convert.DensePredictor`, and the compilations of a 20-size stream;
  segment   the segmentation demo's time per image (the shipped mnistnet FCN-8s on a 777x333 scene);
  mnist     MNIST time to 99% (the fast recipe, a fresh process, everything counted) and to 99.5%
            (the mnistnet recipe: when its test accuracy first reaches it).

On the lent GPU machine its own python3 holds jax, flax, optax, orbax-checkpoint and torch, not
tensorflow-datasets: run from the repository root with `PYTHONPATH=.`; the mnist section needs
tensorflow-datasets and the prepared MNIST files and says so where they are missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

SECTIONS = ("checks", "train", "infer", "torch", "dense", "segment", "mnist")

# Dense peak FLOP/s per device (vendor data sheets; SXM parts): bfloat16 and TF32 tensor cores, plain
# float32. JAX runs float32 convolutions and products on TF32 tensor cores by default on these GPUs.
PEAKS = {
    "H200": {"bfloat16": 989e12, "tf32": 494.7e12, "float32": 66.9e12},
    "H100": {"bfloat16": 989e12, "tf32": 494.7e12, "float32": 66.9e12},
    "A100": {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12},
}
MLPERF_RESNET50_PER_H100 = 7700  # images/s, training (MLPerf Training, about; the anchor)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each section runs: the real sizes, or tiny ones that exercise the same code on a CPU."""

    backbone: str = "resnet50"
    image: int = 224
    train_batch: int = 256
    infer_batch: int = 256
    timed_steps: int = 20
    fcn: str = "vgg16"
    dense_sides: tuple[int, ...] = (1024, 4096)
    stream_sides: tuple[int, int] = (600, 1400)
    stream_count: int = 20
    scene: tuple[int, int] = (333, 777)
    torch_models: str = "resnet50,efficientnet_b0,vgg16,xception,mnistnet,vgg16_fcn"
    mnist_steps: int | None = None  # None: the recipes as they are
    mnist_995_epochs: int = 20


FULL = Sizes()
SMOKE = Sizes(backbone="mnistnet", image=28, train_batch=2, infer_batch=2, timed_steps=2, fcn="mnistnet",
              dense_sides=(48, 64), stream_sides=(30, 60), stream_count=4, scene=(60, 90),
              torch_models="mnistnet", mnist_steps=3, mnist_995_epochs=1)


def peak_flops(device_kind: str) -> dict | None:
    return next((peaks for name, peaks in PEAKS.items() if name in device_kind.upper()), None)


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` (which blocks until its result is ready) over `repeats` calls after one warm-up."""
    import statistics

    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


# ---------------------------------------------------------------------------------------------
# sections


def section_checks(sizes: Sizes) -> dict:
    import jax

    from zoo import cpu_conv

    device = jax.devices()[0]
    out = {"backend": jax.default_backend(), "device_kind": device.device_kind, "devices": jax.device_count(),
           "jax": jax.__version__, "cpu_fast_paths_enabled": cpu_conv.enabled()}
    out["custom_calls_in_training_step"] = _custom_calls(sizes)
    onednn_calls = [name for name in out["custom_calls_in_training_step"] if "onednn" in name.lower()]
    out["ok"] = (out["backend"] == "cpu") or (not out["cpu_fast_paths_enabled"] and not onednn_calls)
    return out


def _custom_calls(sizes: Sizes) -> list[str]:
    """Custom-call targets in the compiled training step of `sizes.backbone` (oneDNN's are CPU-only)."""
    import re

    import jax

    from train.bench import loop_step, synthetic_task
    from train.config import TrainConfig

    config = TrainConfig(model=sizes.backbone, dataset="mnist", batch_size=2, schedule="constant", progress=False)
    task = synthetic_task(config, (sizes.image, sizes.image, 3), 1000)
    fns, state = loop_step(config, task, task.build())
    images = jax.ShapeDtypeStruct((2, sizes.image, sizes.image, 3), jax.numpy.uint8)
    labels = jax.ShapeDtypeStruct((2,), jax.numpy.int32)
    order = jax.ShapeDtypeStruct((2,), jax.numpy.int32)
    text = fns.train_steps.lower(state, (images, labels), order, 1).as_text()
    return sorted(set(re.findall(r"custom_call @([\w.$-]+)", text)))


def section_train(sizes: Sizes) -> dict:
    import jax

    from train.bench import measure
    from train.config import TrainConfig

    kind = jax.devices()[0].device_kind
    peaks = peak_flops(kind)
    rows = {}
    for dtype in ("float32", "bfloat16"):
        config = TrainConfig(model=sizes.backbone, dataset="mnist", batch_size=sizes.train_batch, dtype=dtype,
                             optimizer="sgd", learning_rate=0.1, schedule="constant", progress=False)
        result = measure(config, sizes.timed_steps, image_shape=(sizes.image, sizes.image, 3), num_classes=1000)
        flops = result["flops_per_step"]
        achieved = flops * result["steps_per_s"] if flops else None
        row = {**result, "achieved_gflops": round(achieved / 1e9, 1) if achieved else None}
        if peaks and achieved:
            peak = peaks["bfloat16"] if dtype == "bfloat16" else peaks["tf32"]
            row["mfu"] = round(achieved / peak, 3)
            row["mfu_against"] = "bfloat16 peak" if dtype == "bfloat16" else "TF32 peak"
        if sizes.backbone == "resnet50":
            row["vs_mlperf_h100"] = round(result["images_per_s"] / MLPERF_RESNET50_PER_H100, 3)
        rows[dtype] = row
    return {"model": sizes.backbone, "batch": sizes.train_batch, "image": sizes.image, "rows": rows}


def section_infer(sizes: Sizes) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import zoo

    rows = {}
    for dtype in ("float32", "bfloat16"):
        model = zoo.create_model(sizes.backbone, input_size=sizes.image, in_channels=3, dtype=jnp.dtype(dtype), rngs=0)
        model.eval()
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
        x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (sizes.infer_batch, sizes.image, sizes.image, 3)),
                        jnp.dtype(dtype))
        seconds = timed(lambda: forward(state, x).block_until_ready(), sizes.timed_steps)
        rows[dtype] = {"ms_per_batch": round(1e3 * seconds, 2), "images_per_s": round(sizes.infer_batch / seconds, 1)}
    return {"model": sizes.backbone, "batch": sizes.infer_batch, "image": sizes.image, "rows": rows}


def section_torch(sizes: Sizes, smoke: bool) -> dict:
    import bench_vs_torch
    import jax

    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    # The smoke run leaves torch.compile out: its compilations (10-15 s each on a CPU) are the whole cost.
    return bench_vs_torch.run_table(sizes.torch_models.split(","), device=device, quick=smoke,
                                    repeats=3 if smoke else 10, compile_torch=not smoke,
                                    log=lambda *args: print(*args, file=sys.stderr))


def section_dense(sizes: Sizes) -> dict:
    import jax.numpy as jnp
    import numpy as np

    import convert
    import zoo

    model = zoo.create_model(sizes.fcn, rngs=0)
    model.eval()
    fcn = convert.to_fcn(model)
    rng = np.random.default_rng(0)
    rows = []
    for dtype in ("float32", "bfloat16"):
        predictor = convert.DensePredictor(fcn, dtype=jnp.dtype(dtype))
        for side in sizes.dense_sides:
            image = rng.uniform(0, 1, (side, side, fcn.input_shape[-1])).astype(np.float32)
            before = predictor.compilations
            seconds = timed(lambda: predictor.predict(image), 2)
            rows.append({"dtype": dtype, "side": side, "seconds": round(seconds, 3),
                         "megapixels_per_s": round(side * side / seconds / 1e6, 2),
                         "compilations": predictor.compilations - before, "tiles": len(predictor.plan(side, side))})
    predictor = convert.DensePredictor(fcn)
    lo, hi = sizes.stream_sides
    sides = rng.integers(lo, hi + 1, (sizes.stream_count, 2))
    start = time.perf_counter()
    for height, width in sides:
        predictor.predict(rng.uniform(0, 1, (int(height), int(width), fcn.input_shape[-1])).astype(np.float32))
    return {"model": sizes.fcn, "rows": rows,
            "stream": {"images": sizes.stream_count, "sizes": f"{lo}..{hi} per side", "compilations": predictor.compilations,
                       "seconds": round(time.perf_counter() - start, 2)}}


def section_segment(sizes: Sizes) -> dict:
    import numpy as np

    import convert
    from convert.segment_view import SegmentView
    from train import digit_scenes

    net = convert.load_shipped_segmentation("mnistnet_fcn8s", "digit_scenes")
    view = SegmentView(net, [str(i) for i in range(net.num_classes)])
    scene = digit_scenes.generate_scene("test", 0, size=sizes.scene)
    image = scene.image[..., None].astype(np.float32) / 255.0
    seconds = timed(lambda: view.segment(image), 3)
    return {"net": "mnistnet_fcn8s-digit_scenes", "scene": f"{sizes.scene[1]}x{sizes.scene[0]}",
            "seconds_per_image": round(seconds, 4), "compilations": view.compilations}


def section_mnist(sizes: Sizes) -> dict:
    """Both targets in fresh processes (imports, data, compilation counted), one after the other."""
    out = {}
    for name, recipe, target, overrides in (
            ("time_to_99", "fast_mnist", 0.99, {}),
            ("time_to_995", "mnistnet_mnist", 0.995, {"epochs": sizes.mnist_995_epochs})):
        if sizes.mnist_steps:
            overrides = {**overrides, "max_steps": sizes.mnist_steps, "train_examples": 512, "test_examples": 256}
        code = (
            "import time, json, dataclasses; t0 = time.perf_counter()\n"
            "from train.loop import train\n"
            "from train.recipes import get_recipe\n"
            f"config = dataclasses.replace(get_recipe({recipe!r}), progress=False, **{overrides!r})\n"
            "result = train(config)\n"
            "start = time.perf_counter() - t0 - result.seconds\n"
            "print('RESULT', json.dumps({'history': result.history, 'startup_seconds': start}))\n")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        wall = time.perf_counter() - started
        if done.returncode != 0:
            out[name] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
            continue
        payload = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT")).split(" ", 1)[1])
        key = "ema_test_accuracy" if "ema_test_accuracy" in payload["history"][-1] else "test_accuracy"
        reached = next((r for r in payload["history"] if r[key] >= target), None)
        process_start = wall - payload["startup_seconds"] - payload["history"][-1]["wall_seconds"]
        out[name] = {"recipe": recipe, "target": target, "final_accuracy": payload["history"][-1][key],
                     "reached": reached is not None,
                     "seconds": round(process_start + payload["startup_seconds"] + reached["wall_seconds"], 1)
                     if reached else None,
                     "epoch": reached["epoch"] if reached else None, "whole_run_seconds": round(wall, 1)}
    return out


# ---------------------------------------------------------------------------------------------


def run(only, smoke: bool) -> dict:
    import jax

    sizes = SMOKE if smoke else FULL
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "smoke": smoke,
              "host": f"{platform.machine()}, {os.cpu_count()} CPU cores", "device": jax.devices()[0].device_kind,
              "sizes": dataclasses.asdict(sizes), "sections": {}}
    for name in only:
        start = time.perf_counter()
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        try:
            if name == "torch":
                result = section_torch(sizes, smoke)
            else:
                result = globals()[f"section_{name}"](sizes)
        except Exception as error:  # noqa: BLE001 - one section's failure is reported, the rest still run
            result = {"error": f"{type(error).__name__}: {error}".splitlines()[0],
                      "where": traceback.format_exc().strip().splitlines()[-3:]}
        result["section_seconds"] = round(time.perf_counter() - start, 1)
        report["sections"][name] = result
        print(json.dumps({name: result}), flush=True)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every section at tiny sizes (runs on a CPU)")
    parser.add_argument("--only", help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [name for name in only if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
    report = run(only, args.smoke)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    failed = [name for name, result in report["sections"].items() if "error" in result]
    print(f"sections: {len(only) - len(failed)} ran, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from zoo import allocator

    allocator.retain_freed_memory()  # as the `zoo` command runs (zoo/allocator.py); FCNZOO_ALLOCATOR=glibc: without
    sys.exit(main())
