#!/usr/bin/env python
"""SAME-padding border study: how far an FCN cell is from the classifier run on its window.

    .venv/bin/python scripts/bench_fcn_border.py                      # default model list
    .venv/bin/python scripts/bench_fcn_border.py --models resnet18:64,resnet18:128 --cells 4

A classifier run on a cut-out window zero-pads that window at every SAME layer;
the FCN's cell instead sees the real pixels around the window (and, with
squeeze-excitation, the whole image). So the two differ, while at the training
size (one cell) they agree to float precision. For each MODEL:SIZE the model is
built at that training size (random weights, random BatchNorm statistics), the
FCN runs on an image `cells` strides larger per side, and every cell (i, j) is
compared with the classifier on the training-size window at (i*S, j*S), S the
total stride (the sliding window the cell stands for).

Images are smooth random fields (sums of random sinusoids), closer to natural
images than white noise. Random weights give no real classes, so the argmax
agreement is a lower-bound-style indication only; the relative difference
(max |diff| / std of the logits) is the number to read.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import zoo  # noqa: E402
from convert import to_fcn  # noqa: E402

DEFAULT = "alexnet:227,vgg11:64,resnet18:64,resnet18:128,googlenet:64,efficientnet_b0:64,lenet5:32"


def smooth_image(size, channels, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    img = np.zeros((size, size, channels), np.float32)
    for _ in range(8):
        f = rng.uniform(0.01, 0.15, 2)
        phase = rng.uniform(0, 2 * np.pi)
        img += np.sin(f[0] * yy + f[1] * xx + phase)[..., None] * rng.normal(size=channels)
    return (img - img.mean()) / img.std()


def randomize_batch_stats(model, seed=0):
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.BatchStat):
            shape = var.get_value().shape
            value = rng.uniform(0.5, 1.5, shape) if path[-1] == "var" else rng.normal(0, 0.2, shape)
            var.set_value(jnp.asarray(value, jnp.float32))


def study(name: str, size: int, cells: int) -> dict:
    spec = zoo.get_spec(name)
    model = zoo.create_model(name, num_classes=10, input_size=size, rngs=0)
    randomize_batch_stats(model)
    model.eval()
    fcn = to_fcn(model)
    g = fcn.geometry
    c = spec.input_shape[2]
    train = jnp.asarray(smooth_image(size, c, 1))[None]
    exact = float(jnp.max(jnp.abs(fcn(train)[0, 0, 0] - model(train)[0])))
    big = size + cells * g.stride[0]
    image = smooth_image(big, c, 2)
    out = np.asarray(fcn(jnp.asarray(image)[None]))[0]
    windows, kept = [], []
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            top, left = i * g.stride[0], j * g.stride[1]  # the classifier's input window: training size
            if top + size <= big and left + size <= big:
                windows.append(image[top:top + size, left:left + size])
                kept.append(out[i, j])
    windows = np.stack(windows)
    ref = np.concatenate([np.asarray(model(jnp.asarray(windows[k:k + 16]))) for k in range(0, len(windows), 16)])
    dense = np.stack(kept)
    diff = np.abs(dense - ref)
    return {
        "model": name, "train": size, "image": big, "cells": dense.shape[0], "stride": g.stride[0],
        "rf": g.receptive_field[0], "offset": g.offset[0], "valid": g.valid, "global": g.global_context,
        "exact_1x1": exact, "max_diff": float(diff.max()), "mean_diff": float(diff.mean()),
        "rel_max": float(diff.max() / ref.std()), "argmax_agree": float(np.mean(dense.argmax(-1) == ref.argmax(-1))),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT, help="comma-separated MODEL:TRAINING_SIZE")
    parser.add_argument("--cells", type=int, default=3, help="extra strides per side of the larger image")
    args = parser.parse_args(argv)
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}  jax {jax.__version__}  devices {jax.devices()}  "
          f"load {os.getloadavg()}")
    header = ("model", "train", "image", "cells", "stride", "RF", "offset", "valid", "global ctx", "1x1 |diff|",
              "max |diff|", "mean |diff|", "max/std", "argmax agree")
    rows = []
    for item in args.models.split(","):
        name, size = item.split(":")
        if name not in zoo.list_models():
            print(f"  skip {name}: not registered")
            continue
        r = study(name, int(size), args.cells)
        rows.append((r["model"], r["train"], r["image"], r["cells"], r["stride"], r["rf"], r["offset"], r["valid"],
                     r["global"], f"{r['exact_1x1']:.1e}", f"{r['max_diff']:.3g}", f"{r['mean_diff']:.3g}",
                     f"{r['rel_max']:.3f}", f"{100 * r['argmax_agree']:.0f}%"))
        print(f"  done {item}: {r}", flush=True)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")
    print(f"# load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    from zoo import allocator

    allocator.retain_freed_memory()  # as the `zoo` command runs (zoo/allocator.py); FCNZOO_ALLOCATOR=glibc: without
    sys.exit(main())
