"""Throughput of the shipped FCN-8s on a stream of mixed image sizes vs one fixed size.

    .venv/bin/python scripts/bench_segment.py                 # CPU defaults, about 2-4 minutes
    .venv/bin/python scripts/bench_segment.py --images 50 --max-side 1024 --dtype bfloat16   # on a GPU

Both streams run through `convert.DensePredictor` (shape buckets from convert's ladder,
one ahead-of-time compilation per bucket). Reported: megapixels per second with and without the
compilations, the number of compilations and buckets, and how many pixels the buckets padded on.
The mixed stream draws each side uniformly from [--min-side, --max-side]; the fixed stream repeats
one size with the same total pixel count. Images are digit_scenes scenes (MNIST test digits).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np


def stream(predictor, images) -> dict:
    compile_before, count_before = predictor.compile_seconds, predictor.compilations
    start = time.perf_counter()
    padded = 0
    for image in images:
        result = predictor.predict(image)  # numpy scores: the run has finished
        padded += int(np.prod(result.bucket))
    seconds = time.perf_counter() - start
    compile_seconds = predictor.compile_seconds - compile_before
    pixels = sum(image.shape[0] * image.shape[1] for image in images)
    return {"images": len(images), "megapixels": round(pixels / 1e6, 3),
            "seconds": round(seconds, 2), "compile_seconds": round(compile_seconds, 2),
            "compilations": predictor.compilations - count_before,
            "mpix_per_s": round(pixels / 1e6 / seconds, 3),
            "mpix_per_s_without_compiling": round(pixels / 1e6 / max(seconds - compile_seconds, 1e-9), 3),
            "padded_pixel_ratio": round(padded / pixels, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--min-side", type=int, default=64)
    parser.add_argument("--max-side", type=int, default=768)
    parser.add_argument("--fixed", type=int, default=0, help="side of the fixed-size stream (default: the "
                        "side giving the mixed stream's mean image area)")
    parser.add_argument("--model", default="mnistnet_fcn8s-digit_scenes", help="a shipped net or a saved net's directory")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import convert
    from convert.segment import load_any_segmentation
    from train import digit_scenes as sd

    rng = np.random.default_rng(args.seed)
    sizes = [tuple(int(v) for v in rng.integers(args.min_side, args.max_side + 1, size=2)) for _ in range(args.images)]
    mixed = [sd.generate_scene("test", i, size=s).image[..., None] / np.float32(255) for i, s in enumerate(sizes)]
    side = args.fixed or int(round(np.sqrt(np.mean([h * w for h, w in sizes]))))
    side -= side % 4
    fixed = [sd.generate_scene("test", 1000 + i, size=(side, side)).image[..., None] / np.float32(255)
             for i in range(args.images)]
    model, _ = load_any_segmentation(args.model)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32

    results = {"command": "python scripts/bench_segment.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": f"{jax.devices()[0].device_kind}, jax {jax.__version__}",
               "cpu": platform.processor() or platform.machine(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model, "dtype": args.dtype}
    predictor = convert.DensePredictor(model, dtype=dtype)
    results["ladder"] = [predictor.bucket_minimum, predictor.bucket_step, predictor.ratio]
    results["fixed"] = {"size": [side, side], **stream(predictor, fixed)}
    results["fixed_again"] = stream(predictor, fixed)   # compiled: the steady state
    predictor = convert.DensePredictor(model, dtype=dtype)
    results["mixed"] = {"sides": [args.min_side, args.max_side], **stream(predictor, mixed)}
    results["mixed_again"] = stream(predictor, mixed)
    buckets = {tuple(b[1:]) for b in predictor.buckets}
    results["mixed"]["buckets_touched"] = len(buckets)
    results["ratio_fixed_over_mixed_steady"] = round(
        results["fixed_again"]["mpix_per_s"] / results["mixed_again"]["mpix_per_s"], 2)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    from zoo import allocator

    allocator.retain_freed_memory()  # as the `zoo` command runs (zoo/allocator.py); FCNZOO_ALLOCATOR=glibc: without
    sys.exit(main())
