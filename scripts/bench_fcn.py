#!/usr/bin/env python
"""Benchmark: FCN dense prediction vs batched sliding windows, and a stream of image sizes.

    .venv/bin/python scripts/bench_fcn.py                 # LeNet-5 512, AlexNet 1024, VGG-16 1024 (slow on CPU)
    .venv/bin/python scripts/bench_fcn.py --quick         # smaller images
    .venv/bin/python scripts/bench_fcn.py --models lenet5 --size 256 --no-stream

Sliding windows: every window the FCN judges is cut out of the same image
(inside the jitted function) and classified in batches by the same jitted
classifier; all outputs are asserted equal to the FCN's cells. With
--max-windows N (default for VGG-16: 48) only N evenly spread windows are classified (and compared), and
the full sliding time is extrapolated per window; the table says so.
FLOPs come from XLA's cost analysis of the two compiled computations, so the
ratio is the physical limit of the speedup. Random weights: speed does not
depend on them.

Stream: 50 random sizes in [64, 1024] per side through a bucketing
DensePredictor (LeNet-5), against 50 images of one fixed size.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import zoo  # noqa: E402
from convert import DensePredictor, to_fcn  # noqa: E402

DEFAULT_SIZES = {"lenet5": 512, "alexnet": 1024, "vgg16": 1024}
QUICK_SIZES = {"lenet5": 256, "alexnet": 512, "vgg16": 384}
BATCH = {"lenet5": 512, "alexnet": 32, "vgg16": 8}
# VGG-16 sliding windows on 1024x1024 are ~20 TFLOP: classify this many, extrapolate the rest.
SAMPLED_WINDOWS = 48


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def timed(fn, *args, repeats=3):
    fn(*args).block_until_ready()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def bench_sliding(name: str, size: int, max_windows: int | None) -> dict:
    model = zoo.create_model(name, rngs=0)
    model.eval()
    fcn = to_fcn(model)
    g = fcn.geometry
    c = model.input_shape[2]
    image = jax.random.uniform(jax.random.key(0), (1, size, size, c))

    fcn_graph, fcn_state = nnx.split(fcn)
    fcn_apply = jax.jit(lambda s, x: nnx.merge(fcn_graph, s)(x)).lower(fcn_state, image).compile()
    fcn_seconds = timed(fcn_apply, fcn_state, image, repeats=3 if size * size * c < 2**20 else 1)
    dense = np.asarray(fcn_apply(fcn_state, image))[0]
    rows, cols = dense.shape[:2]
    cells = [(i, j) for i in range(rows) for j in range(cols)]

    # VALID nets: the window a cell judges; SAME nets: the training-size window at (i*S, j*S)
    # (the classifier's own input), which differs from the cell at the window's border.
    rh, rw = g.receptive_field if g.valid else model.input_shape[:2]
    top_of = lambda i: (g.offset[0] if g.valid else 0) + i * g.stride[0]  # noqa: E731
    left_of = lambda j: (g.offset[1] if g.valid else 0) + j * g.stride[1]  # noqa: E731
    cells = [(i, j) for i, j in cells if top_of(i) + rh <= size and left_of(j) + rw <= size]
    total_windows = len(cells)
    if max_windows and max_windows < total_windows:
        pick = np.linspace(0, total_windows - 1, max_windows).round().astype(int)
        cells = [cells[k] for k in sorted(set(pick))]
    batch = min(BATCH[name], len(cells))
    clf_graph, clf_state = nnx.split(model)

    def classify_windows(state, img, tops, lefts):
        # Cut the windows out inside the jitted function, then classify them as one batch.
        crops = jax.vmap(lambda t, l: jax.lax.dynamic_slice(img[0], (t, l, 0), (rh, rw, c)))(tops, lefts)
        return nnx.merge(clf_graph, state)(crops)

    idx = jax.ShapeDtypeStruct((batch,), jnp.int32)
    slide = jax.jit(classify_windows).lower(clf_state, image, idx, idx).compile()
    padded = cells + [cells[-1]] * (-len(cells) % batch)
    tops = np.array([top_of(i) for i, _ in padded], np.int32).reshape(-1, batch)
    lefts = np.array([left_of(j) for _, j in padded], np.int32).reshape(-1, batch)
    slide(clf_state, image, tops[0], lefts[0]).block_until_ready()  # warm-up
    start = time.perf_counter()
    outputs = [slide(clf_state, image, t, l) for t, l in zip(tops, lefts)]
    outputs = np.concatenate([np.asarray(o) for o in outputs])[: len(cells)]
    slide_seconds = time.perf_counter() - start
    expected = np.stack([dense[i, j] for i, j in cells])
    max_diff = float(np.max(np.abs(outputs - expected)))
    scale = max(1.0, float(np.max(np.abs(expected))))
    agree = float(np.mean(outputs.argmax(-1) == expected.argmax(-1)))
    if g.valid:
        assert max_diff <= 1e-4 * scale, f"{name}: FCN and sliding windows differ by {max_diff}"
    slide_full = slide_seconds * total_windows / len(cells)
    slide_flops = flops(slide) / batch * total_windows
    fcn_flops = flops(fcn_apply)
    return {
        "model": name, "image": f"{size}x{size}", "windows": total_windows, "classified": len(cells),
        "window": f"{rh}x{rw}", "stride": g.stride[0], "fcn_s": fcn_seconds, "slide_s": slide_full,
        "speedup": slide_full / fcn_seconds, "flop_ratio": slide_flops / fcn_flops,
        "fcn_gflop": fcn_flops / 1e9, "slide_gflop": slide_flops / 1e9, "max_diff": max_diff,
        "valid": g.valid, "argmax_agree": agree, "logit_std": float(expected.std()),
    }


def bench_stream(seed: int = 0, count: int = 50, fixed: int = 512) -> dict:
    model = zoo.create_model("lenet5", rngs=0)
    model.eval()
    fcn = to_fcn(model)
    rng = np.random.default_rng(seed)
    sizes = [tuple(int(v) for v in rng.integers(64, 1025, 2)) for _ in range(count)]
    images = [rng.random((h, w, 1), dtype=np.float32) for h, w in sizes]
    predictor = DensePredictor(fcn)
    start = time.perf_counter()
    for image in images:
        predictor.predict(image)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    for image in images:
        predictor.predict(image)
    warm = time.perf_counter() - start
    pixels = sum(h * w for h, w in sizes)
    touched = {predictor.bucket_for(*predictor.used_size(h, w)) for h, w in sizes}

    fixed_predictor = DensePredictor(fcn)
    fixed_images = [rng.random((fixed, fixed, 1), dtype=np.float32) for _ in range(count)]
    fixed_predictor.predict(fixed_images[0])
    start = time.perf_counter()
    for image in fixed_images:
        fixed_predictor.predict(image)
    fixed_seconds = time.perf_counter() - start
    fixed_rate = count * fixed * fixed / fixed_seconds
    return {
        "images": count, "buckets_touched": len(touched), "compilations": predictor.compilations,
        "compile_s": predictor.compile_seconds, "cold_px_s": pixels / cold, "warm_px_s": pixels / warm,
        "fixed_px_s": fixed_rate, "fixed": f"{fixed}x{fixed}", "warm_vs_fixed": fixed_rate / (pixels / warm),
        "cold_vs_fixed": fixed_rate / (pixels / cold),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller images (LeNet 256, AlexNet 512, VGG-16 384)")
    parser.add_argument("--models", default="lenet5,alexnet,vgg16")
    parser.add_argument("--size", type=int, help="image side for every model (default: 512 LeNet, 1024 others)")
    parser.add_argument("--max-windows", type=int, help="classify only this many windows per model, extrapolate")
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--no-sliding", action="store_true")
    args = parser.parse_args(argv)

    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}  {platform.node()}  jax {jax.__version__}  "
          f"devices {jax.devices()}  cpus {os.cpu_count()}  load {os.getloadavg()}")
    if not args.no_sliding:
        header = ("model", "image", "window", "stride", "windows", "classified", "FCN s", "sliding s", "speedup",
                  "FLOP ratio", "speedup/FLOP", "max |diff|", "argmax agree")
        rows = []
        for name in args.models.split(","):
            size = args.size or (QUICK_SIZES if args.quick else DEFAULT_SIZES)[name]
            limit = args.max_windows or (SAMPLED_WINDOWS if name == "vgg16" else None)
            r = bench_sliding(name, size, limit)
            rows.append((r["model"], r["image"], r["window"], r["stride"], r["windows"],
                         r["classified"], f"{r['fcn_s']:.3f}", f"{r['slide_s']:.2f}"
                         + ("*" if r["classified"] < r["windows"] else ""), f"{r['speedup']:.1f}x",
                         f"{r['flop_ratio']:.1f}x", f"{r['speedup'] / r['flop_ratio']:.2f}",
                         f"{r['max_diff']:.1e}" + ("" if r["valid"] else " (SAME)"), f"{100 * r['argmax_agree']:.0f}%"))
            print(f"  done {name}: {r}", flush=True)
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in rows:
            print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")
        if any(r[5] < r[4] for r in rows):
            print("* extrapolated from the classified windows (time per window x all windows)")
    if not args.no_stream:
        s = bench_stream()
        print(f"stream of {s['images']} sizes in [64, 1024]^2 (LeNet-5): {s['compilations']} compilations for "
              f"{s['buckets_touched']} buckets touched ({s['compile_s']:.1f} s compiling); cold "
              f"{s['cold_px_s'] / 1e6:.2f} Mpx/s, warm {s['warm_px_s'] / 1e6:.2f} Mpx/s; fixed {s['fixed']} stream "
              f"{s['fixed_px_s'] / 1e6:.2f} Mpx/s -> fixed/warm {s['warm_vs_fixed']:.2f}x, "
              f"fixed/cold {s['cold_vs_fixed']:.2f}x")
    print(f"# load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    from zoo import allocator

    allocator.retain_freed_memory()  # as the `zoo` command runs (zoo/allocator.py); FCNZOO_ALLOCATOR=glibc: without
    sys.exit(main())
