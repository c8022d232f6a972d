"""`zoo convert` and `zoo predict-dense`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def cmd_convert(args) -> int:
    from convert.checkpoint import convert_checkpoint

    fcn, out = convert_checkpoint(args.checkpoint, args.out)
    g = fcn.geometry
    print(f"converted {fcn.source} ({fcn.pool} head) -> {out}")
    for step in fcn.describe()[1:]:
        print("  " + ", ".join(f"{k}={v}" for k, v in step.items()))
    print(f"geometry: stride {g.stride}, receptive field {g.receptive_field}, offset {g.offset}, "
          f"{'VALID (exact windows)' if g.valid else 'padded (border windows see zero padding)'}")
    return 0


def cmd_predict_dense(args) -> int:
    from convert.checkpoint import load_any
    from convert.predict import DensePredictor, enable_compilation_cache, load_image, save_heatmap

    if args.cache_dir:
        enable_compilation_cache(args.cache_dir)
    source = Path(args.model)
    if not source.exists():
        print(f"warning: {args.model} is a registry name: random weights, the scores mean nothing; "
              f"pass a saved model directory for real predictions", file=sys.stderr)
    fcn = load_any(args.model)
    image = load_image(args.image, fcn.input_shape[-1])
    predictor = DensePredictor(fcn, score_map=args.score_map)
    start = time.perf_counter()
    result = predictor.predict(image)
    seconds = time.perf_counter() - start
    g = result.geometry
    top = result.top_classes(5)
    if args.cls is not None and not 0 <= args.cls < result.scores.shape[-1]:
        raise ValueError(f"--class must be between 0 and {result.scores.shape[-1] - 1}, got {args.cls}")
    summary = {
        "image": str(args.image), "image_size": list(result.image_size), "bucket": list(result.bucket),
        "score_map": list(result.scores.shape), "geometry": g.to_dict(), "top_classes": top,
        "compilations": predictor.compilations, "seconds": round(seconds, 3),
    }
    if args.out:
        save_heatmap(image, result, args.out, class_index=args.cls)
        summary["heatmap"] = str(args.out)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    h, w, k = result.scores.shape
    print(f"{args.image}: {result.image_size[0]}x{result.image_size[1]} px -> {h}x{w} windows x {k} classes "
          f"(ran at {result.bucket[0]}x{result.bucket[1]}, {predictor.compilations} compilation(s), {seconds:.2f} s)")
    print(f"window of cell (i, j): top = {g.offset[0]} + {g.stride[0]}*i, left = {g.offset[1]} + {g.stride[1]}*j, "
          f"size {g.receptive_field[0]}x{g.receptive_field[1]}")
    print("best classes anywhere: " + ", ".join(f"{c} ({p:.2f})" for c, p in top))
    if args.out:
        print(f"heatmap: {args.out}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("convert", help="turn a saved classifier into a saved fully convolutional network")
    p.add_argument("checkpoint", help="saved classifier directory (model.json + weights.safetensors)")
    p.add_argument("--out", required=True, help="directory for the FCN (fcn.json + weights.safetensors)")
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser("predict-dense", help="class score map of an image of any size")
    p.add_argument("model", help="saved FCN or classifier directory, or a registry name (random weights)")
    p.add_argument("image", help="image file (PNG, JPEG, ...)")
    p.add_argument("--out", help="write a heatmap overlay PNG here")
    p.add_argument("--class", dest="cls", type=int, help="class to draw (default: the best class anywhere)")
    p.add_argument("--score-map", action="store_true",
                   help="average-pool heads: per-position scores instead of per-training-window scores")
    p.add_argument("--cache-dir", help="JAX persistent compilation cache directory")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=cmd_predict_dense)
