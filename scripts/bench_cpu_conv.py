"""zoo's CPU convolution and pooling paths (zoo/cpu_conv.py) vs XLA's own, side by side in one run.

    .venv/bin/python scripts/bench_cpu_conv.py [--models mnistnet:128,resnet50:8,...] [--repeats 3]

For each model (random weights, NAME:BATCH at the model's input size): inference (eval
mode) and a training step's gradient (train mode, softmax cross-entropy), each jitted twice
from the same state: once as zoo traces it, once inside `cpu_conv.xla_ops_only()` (XLA's
convolution, grouped convolution and max-pool gradient). Timings alternate between the two
sides (median of `repeats`, after a compiling warm-up), so background load hits both alike.
Prints a table with the speed-up (XLA time / ours) and the largest relative logit difference.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import zoo
from side_by_side import alternating_medians
from zoo import cpu_conv

DEFAULT = "mnistnet:128,resnet50:8,efficientnet_b0:8,xception:8,vgg16:4"


def compiled_pair(model, x, labels):
    """(inference, gradient) jitted functions of `model`'s state, and the states they take."""
    model.eval()
    graphdef, state = nnx.split(model)
    infer = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    model.train()
    train_graphdef, train_state = nnx.split(model)

    @jax.jit
    def grad(state, x):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

        return nnx.grad(loss)(nnx.merge(train_graphdef, state))

    jax.block_until_ready((infer(state, x), grad(train_state, x)))  # trace and compile now
    return (lambda: jax.block_until_ready(infer(state, x))), (lambda: jax.block_until_ready(grad(train_state, x)))


def bench(name, batch, repeats):
    model = zoo.create_model(name, rngs=0)
    h, w, c = zoo.get_spec(name).input_shape
    x = jax.random.normal(jax.random.key(0), (batch, h, w, c))
    labels = jnp.zeros((batch,), jnp.int32)
    ours = compiled_pair(model, x, labels)
    with cpu_conv.xla_ops_only():
        theirs = compiled_pair(model, x, labels)
    a, b = ours[0](), theirs[0]()
    error = float(jnp.abs(a - b).max() / jnp.abs(b).max())
    row = alternating_medians({"ours_infer": ours[0], "xla_infer": theirs[0], "ours_grad": ours[1],
                               "xla_grad": theirs[1]}, repeats, warm_up=False)  # compiled already
    row.update(model=name, input=f"{batch}x{h}x{w}x{c}", max_rel_err=error)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=DEFAULT, help="comma-separated NAME:BATCH")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; {uptime()}", flush=True)
    header = (f"{'model':<16} {'input':<14} {'infer ours':>10} {'XLA':>8} {'speed-up':>8}   "
              f"{'grad ours':>9} {'XLA':>8} {'speed-up':>8}   {'logit diff':>10}")
    print(header + "\n" + "-" * len(header), flush=True)
    for item in args.models.split(","):
        name, batch = item.split(":")
        r = bench(name, int(batch), args.repeats)
        print(f"{r['model']:<16} {r['input']:<14} {r['ours_infer']:>9.3f}s {r['xla_infer']:>7.3f}s "
              f"{r['xla_infer'] / r['ours_infer']:>7.2f}x   {r['ours_grad']:>8.3f}s {r['xla_grad']:>7.3f}s "
              f"{r['xla_grad'] / r['ours_grad']:>7.2f}x   {r['max_rel_err']:>10.1e}", flush=True)
    print(f"(seconds per batch, median of {args.repeats}; speed-up = XLA / ours; {uptime()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
