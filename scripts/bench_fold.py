"""BatchNorm folding (convert/fold.py): folded vs unfolded inference, side by side in one run.

    .venv/bin/python scripts/bench_fold.py [--cases mnistnet:8,resnet50:8,fcn-mnistnet:512,...] [--repeats 9]

Cases: NAME:BATCH is a classifier's inference (eval mode, random weights and BatchNorm
statistics) on a batch at the model's input size; fcn-NAME:SIZE is dense prediction of the
model converted to an FCN (`convert.to_fcn`) on one SIZE x SIZE image through
`convert.DensePredictor` (run whole: tile=SIZE). Each case is compiled twice from the same weights, once as it is and
once after `convert.fold_batchnorm`; calls alternate between the two sides (median of
`repeats`, more for calls under 0.1 s, after a compiling warm-up), so background load hits
both alike. Prints seconds per call, the speed-up (unfolded / folded) and the largest relative
output difference.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import convert
import zoo
from side_by_side import alternating_medians

DEFAULT = "mnistnet:8,resnet50:8,efficientnet_b0:8,fcn-mnistnet:512,fcn-resnet50:512"


def random_batchnorms(model, seed=0):
    """Random BatchNorm statistics and affine parameters (so folding has something to fold)."""
    bn_paths = {tuple(p) for p, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)}
    state = nnx.state(model, lambda path, _: tuple(path[:-1]) in bn_paths)
    rng = np.random.default_rng(seed)
    draw = lambda name, shape: jnp.asarray(
        rng.uniform(0.5, 1.5, shape) if name in ("var", "scale") else rng.normal(0, 0.3, shape), jnp.float32)
    nnx.update(model, nnx.from_flat_state([(p, draw(p[-1], v.get_value().shape)) for p, v in nnx.to_flat_state(state)]))
    return model


def classifier_case(name, batch):
    model = random_batchnorms(zoo.create_model(name, rngs=0))
    model.eval()
    h, w, c = zoo.get_spec(name).input_shape
    x = jax.random.normal(jax.random.key(0), (batch, h, w, c))

    def compiled(module):
        graphdef, state = nnx.split(module)
        fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
        return lambda: jax.block_until_ready(fn(state, x))

    start = time.perf_counter()
    folded = convert.fold_batchnorm(model)
    fold_seconds = time.perf_counter() - start
    return compiled(model), compiled(folded), folded, model, f"{batch}x{h}x{w}x{c}", fold_seconds


def fcn_case(name, size):
    model = random_batchnorms(zoo.create_model(name, rngs=0))
    model.eval()
    fcn = convert.to_fcn(model)
    image = np.asarray(jax.random.normal(jax.random.key(0), (size, size, fcn.input_shape[-1])))
    start = time.perf_counter()
    folded = convert.fold_batchnorm(fcn)
    fold_seconds = time.perf_counter() - start

    def predicting(network):
        predictor = convert.DensePredictor(network, tile=size)  # the whole image in one call, not tiles
        return lambda: predictor.predict(image).scores

    return predicting(fcn), predicting(folded), folded, fcn, f"1x{size}x{size}x{fcn.input_shape[-1]}", fold_seconds


def bench(case: str, repeats: int) -> dict:
    kind, value = case.rsplit(":", 1)
    if kind.startswith("fcn-"):
        plain, folded_fn, folded, original, shape, fold_seconds = fcn_case(kind[4:], int(value))
    else:
        plain, folded_fn, folded, original, shape, fold_seconds = classifier_case(kind, int(value))
    a, b = np.asarray(plain(), np.float64), np.asarray(folded_fn(), np.float64)  # compiles both
    error = float(np.abs(a - b).max() / max(1.0, np.abs(a).max()))
    start = time.perf_counter()
    plain()
    once = time.perf_counter() - start
    rounds = repeats if once >= 0.1 else min(200, max(repeats, int(2.0 / max(once, 1e-4))))
    row = alternating_medians({"unfolded": plain, "folded": folded_fn}, rounds, warm_up=False)
    count = lambda m, cls: sum(type(n) is cls for _, n in nnx.iter_graph(m))
    row.update(case=case, input=shape, rel_diff=error, rounds=rounds, fold_seconds=fold_seconds,
               batchnorms=count(original, nnx.BatchNorm), folded_bns=count(folded, convert.FoldedBatchNorm))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=DEFAULT, help="comma-separated NAME:BATCH or fcn-NAME:SIZE")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; {uptime()}", flush=True)
    header = (f"{'case':<20} {'input':<16} {'BN folded':>9} {'unfolded':>10} {'folded':>10} {'speed-up':>8} "
              f"{'rel. diff':>9} {'rounds':>6} {'fold time':>9}")
    print(header + "\n" + "-" * len(header), flush=True)
    for case in args.cases.split(","):
        r = bench(case, args.repeats)
        print(f"{r['case']:<20} {r['input']:<16} {r['folded_bns']:>4}/{r['batchnorms']:<4} "
              f"{r['unfolded'] * 1e3:>8.2f}ms {r['folded'] * 1e3:>8.2f}ms {r['unfolded'] / r['folded']:>7.2f}x "
              f"{r['rel_diff']:>9.1e} {r['rounds']:>6} {r['fold_seconds']:>8.2f}s", flush=True)
    print(f"(median per call; speed-up = unfolded / folded; {uptime()})")
    return 0


if __name__ == "__main__":
    from zoo import allocator

    allocator.retain_freed_memory()  # as the `zoo` command runs (zoo/allocator.py); FCNZOO_ALLOCATOR=glibc: without
    sys.exit(main())
