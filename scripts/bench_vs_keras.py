"""Throughput of zoo models vs Keras 3 (JAX backend): same architecture, same weights, same batch, one run.

    KERAS_BACKEND=jax .venv/bin/python scripts/bench_vs_keras.py [--batch 8] [--repeats 3] [--models resnet50,...]

For each model, Keras Applications builds it with random weights, the importer
loads those weights into the zoo model, and both are timed on the same batch:
inference (eval mode) and one SGD-with-momentum training step (train mode,
softmax cross-entropy on logits). Keras runs its own compiled paths
(`predict_on_batch`, `train_on_batch` after `compile(jit_compile=True)`); ours
runs `jax.jit` over `nnx.split` state (no NNX graph traversal inside the timed
loop). Each timing is the median of `repeats` runs after one warm-up call that
compiles; the timed calls alternate between the four functions, so background load hits
both sides alike. Prints a table of images/s and the ratio ours / Keras (> 1: we are faster).
Ours includes zoo's CPU convolution and pooling paths (zoo/cpu_conv.py), as every zoo model does.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from side_by_side import alternating_medians  # noqa: E402
from zoo.importers import import_keras  # noqa: E402
from zoo.importers.reference import keras_application, randomize_keras_weights, relative_error  # noqa: E402

# zoo name -> (Keras name, input side)
MODELS = {"resnet50": ("ResNet50", 224), "efficientnet_b0": ("EfficientNetB0", 224),
          "xception": ("Xception", 299), "vgg16": ("VGG16", 224)}


def ours_inference(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def predict(state, x):
        return nnx.merge(graphdef, state)(x)

    return lambda x: jax.block_until_ready(predict(state, x))


def ours_train_step(model, learning_rate=0.01):
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(learning_rate, momentum=0.9)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, rest, opt_state, x, y):
        model = nnx.merge(graphdef, params, rest)

        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        _, params, rest = nnx.split(model, nnx.Param, ...)  # rest: new BatchNorm statistics, RNG counts
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    carry = [params, rest, opt_state]

    def run(x, y):
        carry[0], carry[1], carry[2], loss = step(*carry, x, y)
        jax.block_until_ready(loss)

    return run


def bench(name, batch, repeats):
    import keras

    keras_name, side = MODELS[name]
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, side, side, 3)).astype(np.float32)
    y = rng.integers(0, 1000, batch)
    theirs = keras_application(keras_name, input_shape=(side, side, 3), classifier_activation=None)
    randomize_keras_weights(theirs, 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{keras_name}.weights.h5")
        theirs.save_weights(path)
        ours = import_keras(name, path).model
    infer = ours_inference(ours)
    error = relative_error(infer(x), theirs.predict_on_batch(x))
    row = {"model": name, "input": f"{batch}x{side}x{side}", "max_rel_err": error}
    theirs.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    step = ours_train_step(ours)
    seconds = alternating_medians({
        "ours_infer": lambda: infer(x), "keras_infer": lambda: theirs.predict_on_batch(x),
        "ours_train": lambda: step(x, y), "keras_train": lambda: theirs.train_on_batch(x, y)}, repeats)
    row.update({name: batch / s for name, s in seconds.items()})
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args(argv)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; {uptime}", flush=True)
    header = f"{'model':<16} {'batch':<12} {'infer ours':>11} {'keras':>8} {'ratio':>6}   " \
             f"{'train ours':>10} {'keras':>8} {'ratio':>6}   {'logit err':>9}"
    print(header + "\n" + "-" * len(header), flush=True)
    for name in args.models.split(","):
        r = bench(name, args.batch, args.repeats)
        print(f"{r['model']:<16} {r['input']:<12} {r['ours_infer']:>9.2f}/s {r['keras_infer']:>6.2f}/s "
              f"{r['ours_infer'] / r['keras_infer']:>5.2f}x   {r['ours_train']:>8.2f}/s {r['keras_train']:>6.2f}/s "
              f"{r['ours_train'] / r['keras_train']:>5.2f}x   {r['max_rel_err']:>9.1e}", flush=True)
    print(f"(images/s, median of {args.repeats} after a compiling warm-up; ratio = ours / Keras; "
          f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()})")
    return 0


if __name__ == "__main__":
    from zoo import allocator

    allocator.retain_freed_memory()  # as the `zoo` command runs (zoo/allocator.py); FCNZOO_ALLOCATOR=glibc: without
    sys.exit(main())
