"""Measure the playbook's switches on this machine: step time, compile time, XLA temp memory.

    python -m train.bench lenet5 --model-kwargs '{"input_padding": 2}' --batch-size 128
    python -m train.bench mnistnet --batch-size 256 --steps 10

For each setting (fp32, bf16, remat, accumulate 4) it builds the loop's own jitted train
step (`train.loop.make_functions`) on random uint8 images, reports XLA's `memory_analysis()`
temp bytes of the compiled step, the compile time, and updates per second (after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from train import loop, parallel, tasks
from train.config import TrainConfig


def synthetic_task(config: TrainConfig, image_shape=None, num_classes: int | None = None) -> tasks.Classification:
    """The classification task of `config` with its images and labels replaced by random ones of
    `image_shape` (H, W, C) and `num_classes` (default: the data set's): ImageNet-sized benchmarks
    run the loop's own step without the data set."""
    task = tasks.Classification(config)
    if image_shape is not None:
        task.image_shape = tuple(image_shape)
        channels = task.image_shape[-1]
        task.preprocessing = {**task.preprocessing, "mean": [0.5] * channels, "std": [0.25] * channels}
    if num_classes is not None:
        task.num_classes = int(num_classes)
    return task


def loop_step(config: TrainConfig, task, model, *, steps_per_epoch: int = 1, mesh=None):
    """The jitted functions of `train.loop` for `model` and a fresh train state (no EMA) on a copy of
    its weights (the step donates its state): what `zoo train` runs, for benchmarks. With a `mesh`
    (`train.parallel.make_mesh`), the data-parallel functions and a replicated state.

    Returns (fns, state): `fns.train_steps(state, (images, labels), order, n)`; `model` is left in eval mode.
    """
    model.eval()
    eval_graphdef = loop.split_model(model)[0]
    if config.remat:
        loop.remat_blocks(model)
    model.train()
    graphdef, params, rng_keys, rng_counts, other = loop.split_model(model)
    model.eval()
    schedule = loop.make_schedule(config, 1000, steps_per_epoch)
    tx = loop.make_optimizer(config, schedule)
    fns = loop.make_functions(config, task, train_graphdef=graphdef, eval_graphdef=eval_graphdef,
                              rng_keys=parallel.put_replicated(rng_keys, mesh),
                              rng_counts=parallel.put_replicated(rng_counts, mesh), tx=tx, schedule=schedule,
                              steps_per_epoch=steps_per_epoch, mesh=mesh)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    state = jax.jit(lambda p, c, o: {"step": jnp.int32(0), "params": copy(p), "rng_counts": copy(c),
                                     "other": copy(o), "opt_state": tx.init(p), "ema": None})(params, rng_counts, other)
    return fns, parallel.put_replicated(state, mesh)


def measure(config: TrainConfig, steps: int, image_shape=None, num_classes: int | None = None) -> dict:
    """Compile and time the loop's train step for `config` on random uint8 images.

    image_shape / num_classes: (H, W, C) and classes of the random data and of the model built for it
    (default: the data set's). Returns temp memory, compile seconds, ms per step, the step's FLOPs
    (XLA's cost analysis of the compiled step; None where the backend gives none) and the last loss.
    """
    task = synthetic_task(config, image_shape, num_classes)
    n = config.batch_size * 4
    rng = np.random.default_rng(0)
    data = jax.device_put((rng.integers(0, 256, (n, *task.image_shape), dtype=np.uint8),
                           rng.integers(0, task.num_classes, (n,), dtype=np.int32)))
    fns, state = loop_step(config, task, task.build(), steps_per_epoch=4)
    order = jax.device_put(loop.epoch_order(config.seed, 0, n, n))
    start = time.perf_counter()
    compiled = fns.train_steps.lower(state, data, order, 1).compile()
    compile_seconds = time.perf_counter() - start
    temp = compiled.memory_analysis().temp_size_in_bytes
    flops = step_flops(compiled)
    state, metrics = compiled(state, data, order)
    metrics.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, data, order)
    metrics.block_until_ready()
    seconds = (time.perf_counter() - start) / steps
    return {"temp_MiB": round(temp / 2**20, 1), "compile_s": round(compile_seconds, 1),
            "ms_per_step": round(1e3 * seconds, 1), "steps_per_s": round(1 / seconds, 2),
            "images_per_s": round(config.batch_size / seconds, 1), "flops_per_step": flops,
            "loss": float(metrics[0, 0])}


def step_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled function, from XLA's cost analysis (None if it has none)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - backends without a cost model raise different errors
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--model-kwargs", default="{}")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--settings", default="fp32,bf16,remat,accumulate4")
    args = parser.parse_args()
    base = dict(model=args.model, model_kwargs=json.loads(args.model_kwargs), batch_size=args.batch_size,
                schedule="constant", progress=False)
    variants = {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "remat": {"remat": True},
                "accumulate4": {"accumulate": 4}}
    print(f"{args.model}, batch {args.batch_size}, {jax.devices()[0].device_kind} ({jax.default_backend()})")
    for name in args.settings.split(","):
        result = measure(TrainConfig(**base, **variants[name]), args.steps)
        print(json.dumps({"setting": name, **result}), flush=True)


if __name__ == "__main__":
    main()
