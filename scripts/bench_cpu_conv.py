"""zoo's CPU convolution and pooling paths (zoo/cpu_conv.py) vs XLA's own, side by side in one run.

    .venv/bin/python scripts/bench_cpu_conv.py [--models mnistnet:128,resnet50:8,...] [--repeats 3]
                                               [--reference xla|no-onednn]

For each model (random weights, NAME:BATCH at the model's input size): inference (eval
mode) and a training step (train mode, softmax cross-entropy, SGD with momentum 0.9), each
jitted twice from the same state: once as zoo traces it, once as the reference: inside
`cpu_conv.xla_ops_only()` (XLA's convolution, grouped convolution and max-pool gradient), or
with `--reference no-onednn` inside `cpu_conv.without_onednn()` (zoo's paths without the oneDNN
convolutions of zoo/onednn.py). Timings alternate between the two sides (median of `repeats`,
after a compiling warm-up), so background load hits both alike. Prints a table with the
speed-up (reference time / ours) and the largest relative logit difference.
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
    """(inference, training step) jitted functions of `model`'s state, and the states they take."""
    model.eval()
    graphdef, state = nnx.split(model)
    infer = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    model.train()
    train_graphdef, train_state = nnx.split(model)

    optimizer = optax.sgd(0.01, momentum=0.9)
    opt_state = optimizer.init(nnx.state(model, nnx.Param))

    @jax.jit
    def step(state, opt_state, x):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

        model = nnx.merge(train_graphdef, state)
        grads = nnx.grad(loss)(model)
        params = nnx.state(model, nnx.Param)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    jax.block_until_ready((infer(state, x), step(train_state, opt_state, x)))  # trace and compile now
    return ((lambda: jax.block_until_ready(infer(state, x))),
            (lambda: jax.block_until_ready(step(train_state, opt_state, x))))


REFERENCES = {"xla": cpu_conv.xla_ops_only, "no-onednn": cpu_conv.without_onednn}


def bench(name, batch, repeats, reference="xla"):
    model = zoo.create_model(name, rngs=0)
    h, w, c = zoo.get_spec(name).input_shape
    x = jax.random.normal(jax.random.key(0), (batch, h, w, c))
    labels = jnp.zeros((batch,), jnp.int32)
    ours = compiled_pair(model, x, labels)
    with REFERENCES[reference]():
        theirs = compiled_pair(model, x, labels)
    a, b = ours[0](), theirs[0]()
    error = float(jnp.abs(a - b).max() / jnp.abs(b).max())
    # Inference and training steps alternate in pairs of their own: after a call of another size,
    # the next one pays for fresh memory (page faults), which would favour the side that comes second.
    row = alternating_medians({"ours_infer": ours[0], "xla_infer": theirs[0]}, repeats, warm_up=False)
    row.update(alternating_medians({"ours_grad": ours[1], "xla_grad": theirs[1]}, repeats, warm_up=False))
    row.update(model=name, input=f"{batch}x{h}x{w}x{c}", max_rel_err=error)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=DEFAULT, help="comma-separated NAME:BATCH")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", choices=sorted(REFERENCES), default="xla")
    args = parser.parse_args(argv)
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; {uptime()}", flush=True)
    ref = "XLA" if args.reference == "xla" else "no-dnn"
    header = (f"{'model':<16} {'input':<14} {'infer ours':>10} {ref:>8} {'speed-up':>8}   "
              f"{'step ours':>9} {ref:>8} {'speed-up':>8}   {'logit diff':>10}")
    print(header + "\n" + "-" * len(header), flush=True)
    for item in args.models.split(","):
        name, batch = item.split(":")
        r = bench(name, int(batch), args.repeats, args.reference)
        print(f"{r['model']:<16} {r['input']:<14} {r['ours_infer']:>9.3f}s {r['xla_infer']:>7.3f}s "
              f"{r['xla_infer'] / r['ours_infer']:>7.2f}x   {r['ours_grad']:>8.3f}s {r['xla_grad']:>7.3f}s "
              f"{r['xla_grad'] / r['ours_grad']:>7.2f}x   {r['max_rel_err']:>10.1e}", flush=True)
    print(f"(seconds per batch, median of {args.repeats}; speed-up = {ref} / ours; {uptime()})")
    return 0


if __name__ == "__main__":
    from zoo import allocator

    allocator.retain_freed_memory()  # as the `zoo` command runs (zoo/allocator.py); FCNZOO_ALLOCATOR=glibc: without
    sys.exit(main())
