"""`zoo convert`, `zoo predict-dense` and `zoo segment`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def cmd_convert(args) -> int:
    from convert.checkpoint import FCN_CONFIG, convert_checkpoint

    fcn, out = convert_checkpoint(args.checkpoint, args.out, force=args.force)
    g = fcn.geometry
    print(f"converted {fcn.source} ({fcn.pool} head) -> {out}")
    for note in json.loads((Path(out) / FCN_CONFIG).read_text())["source"]["metadata"].get("notes", []):
        print("  note: " + ("the final softmax is left out: the FCN returns logits (their softmax is Keras's "
                            "predict)" if note == "softmax" else note))
    for step in fcn.describe()[1:]:
        print("  " + ", ".join(f"{k}={v}" for k, v in step.items()))
    print(f"geometry: stride {g.stride}, receptive field {g.receptive_field}, offset {g.offset}, "
          f"{'VALID (exact windows)' if g.valid else 'padded (border windows see zero padding)'}")
    return 0


def cmd_predict_dense(args) -> int:
    from convert import stream
    from convert.checkpoint import load_any
    from convert.predict import DensePredictor, enable_compilation_cache, load_image, save_heatmap

    folder = stream.is_stream_run(args.image, args.out)
    process = stream.start_processes(args) if folder else (0, 1)  # before anything touches a device
    if args.cache_dir:
        enable_compilation_cache(args.cache_dir)
    source = Path(args.model)
    if not source.exists():
        print(f"warning: {args.model} is a registry name: random weights, the scores mean nothing; "
              f"pass a saved model directory for real predictions", file=sys.stderr)
    fcn = load_any(args.model)
    predictor = DensePredictor(fcn, score_map=args.score_map, tile=args.tile, halo=args.halo, batch=args.batch,
                                  fold=not args.no_fold)
    if folder:
        if args.cls is not None:
            raise ValueError("--class draws one image's heatmap; a folder run's pictures show each cell's best class")
        return stream.run_command(args, predictor, kind="dense", model=str(args.model), process=process)
    image = load_image(args.image, fcn.input_shape[-1])
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


def _classifier_beside(net, metadata: dict, depth: int = 0):
    """(converted classifier, its preprocessing) the net grew from, when its weights can be found; else (None, None).

    Shipped nets record it ("classifier": {"model", "pretrained"}); a trained net's directory records its
    stage's config, whose init_from leads back through the earlier stages to the classifier.
    """
    import zoo
    from convert.fcn import to_fcn
    from convert.segment import is_segmentation_dir, read_segmentation_config
    from zoo import pretrained, saving

    origin = metadata.get("classifier") or metadata.get("train_config") \
        or metadata.get("train", {}).get("train_config") or {}
    model, tag, init_from = origin.get("model"), origin.get("pretrained"), origin.get("init_from")
    classifier = record = None
    if model and tag and (model, tag) in pretrained.shipped("classifier"):
        classifier, record = zoo.create_model(model, pretrained=tag), pretrained.metadata(model, tag)["preprocessing"]
    elif init_from and Path(init_from).is_dir() and depth < 5:
        if is_segmentation_dir(init_from):
            return _classifier_beside(net, read_segmentation_config(init_from).get("metadata", {}), depth + 1)
        if (Path(init_from) / saving.CONFIG_FILE).is_file():
            classifier = saving.load_model(init_from)
            record = saving.read_config(init_from).get("metadata", {}).get("preprocessing")
    if classifier is None or record is None:
        return None, None
    fcn = to_fcn(classifier)
    return (fcn, record) if fcn.num_classes <= net.num_classes else (None, None)


def cmd_segment(args) -> int:
    import numpy as np

    from convert import segment_view, stream
    from convert.predict import DensePredictor, enable_compilation_cache, read_image
    from convert.segment import load_any_segmentation

    folder = stream.is_stream_run(args.image, args.out)
    process = stream.start_processes(args) if folder else (0, 1)  # before anything touches a device
    if args.cache_dir:
        enable_compilation_cache(args.cache_dir)
    if (args.image is None) == (args.scene is None):
        raise ValueError("give an IMAGE file (PNG, JPEG, ...) or --scene WxH for a generated digit scene, "
                         "e.g. --scene 777x333 (one of them)")
    if folder:
        net, metadata = load_any_segmentation(args.model)
        predictor = DensePredictor(net, tile=args.tile, halo=args.halo, batch=args.batch,
                                  fold=not args.no_fold)
        invert = args.invert if args.invert is not None else (None if net.in_channels == 1 else False)
        return stream.run_command(args, predictor, kind="segment", model=str(args.model), invert=invert,
                                  class_names=metadata.get("class_names"), process=process)
    scene = None
    if args.scene is not None:
        from train import digit_scenes

        scene = digit_scenes.generate_scene("test", args.seed, size=digit_scenes.parse_size(args.scene))
    net, metadata = load_any_segmentation(args.model)
    class_names = metadata.get("class_names") or [str(k) for k in range(net.num_classes)]
    if scene is not None:
        if net.in_channels != 1:
            raise ValueError(f"--scene makes grayscale digit scenes; {args.model} takes {net.in_channels} channels")
        image, notes, truth = scene.image[..., None].astype(np.float32) / 255.0, {}, scene.label
        name = f"scene {scene.image.shape[1]}x{scene.image.shape[0]} (seed {args.seed}, MNIST test digits)"
        default_out = f"segment-scene-{scene.image.shape[1]}x{scene.image.shape[0]}-seed{args.seed}.png"
    else:
        # Light-on-dark nets (digits) see dark-on-light images inverted unless told otherwise.
        invert = args.invert if args.invert is not None else (None if net.in_channels == 1 else False)
        image, notes = read_image(args.image, net.in_channels, invert=invert)
        truth, name, default_out = None, str(args.image), f"{Path(args.image).stem}-segment.png"
    classifier, preprocessing = _classifier_beside(net, metadata)
    view = segment_view.SegmentView(net, class_names, classifier=classifier, classifier_preprocessing=preprocessing,
                                    fold=not args.no_fold)
    result = view.segment(image)
    out = Path(args.out) if args.out else Path(default_out)
    report = {
        "input": name, "size": [int(image.shape[1]), int(image.shape[0])], "notes": notes, "model": str(args.model),
        "regions": [{"class": class_names[r.label], "box_tlhw": list(map(int, r.box)), "pixels": r.pixels,
                     "confidence": round(r.confidence, 3)} for r in result.regions],
        "seconds_per_image": round(result.seconds, 3), "compile_seconds": round(result.compile_seconds, 2),
        "compilations": result.compilations, "buckets": [list(b) for b in view.net.buckets],
    }
    title = f"{name}: {len(result.regions)} region(s) found by {result.name}"
    if truth is not None:
        from train.tasks import confusion, scores_from_confusion

        mine = scores_from_confusion(confusion(truth, result.labels, net.num_classes))
        report.update(truth_classes=sorted(d["label"] for d in scene.digits),
                      mean_iou=round(mine["mean_iou"], 4), pixel_accuracy=round(mine["pixel_accuracy"], 4))
        title += f"; mean IU {report['mean_iou']:.3f}, pixel accuracy {report['pixel_accuracy']:.3f}"
    segment_view.draw(result, out, class_names=class_names, colors=view.colors, background=view.background,
                      title=title, truth=truth)
    report["picture"] = str(out)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{name}: {image.shape[1]}x{image.shape[0]} px"
          + (f" ({', '.join(f'{k}: {v}' for k, v in notes.items())})" if notes else ""))
    print(f"found {len(result.regions)} region(s), in reading order: "
          + (", ".join(class_names[r.label] for r in result.regions) or "none"))
    for r in result.regions[:40]:
        top, left, h, w = r.box
        print(f"  {class_names[r.label]} at x={left}..{left + w - 1}, y={top}..{top + h - 1} "
              f"({r.pixels} px, confidence {r.confidence:.2f})")
    if len(result.regions) > 40:
        print(f"  ... and {len(result.regions) - 40} more")
    if truth is not None:
        print(f"ground truth: {len(scene.digits)} digits; {result.name} mean IU {report['mean_iou']:.3f}, "
              f"pixel accuracy {report['pixel_accuracy']:.3f}")
    import jax

    print(f"time per image: {result.seconds:.3f} s ({'both networks' if classifier is not None else 'the net'}, "
          f"compilation excluded); {result.compilations} compilation(s) taking {result.compile_seconds:.1f} s; "
          f"device: {jax.devices()[0].platform}")
    print(f"picture: {out.resolve()}")
    return 0


def _size_arg(text: str) -> tuple[int, int]:
    """"HxW" or "S" (square) -> (H, W)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"sizes are HxW or one number, e.g. 64x48 or 64; got {text!r}")
    values = [int(p) for p in parts]
    return (values[0], values[-1])


def cmd_export(args) -> int:
    from convert.checkpoint import load_fcn
    from convert.export import ONNX_UNAVAILABLE, check_export_path, export_fcn

    if args.format == "onnx":
        raise ValueError(ONNX_UNAVAILABLE)
    check_export_path(args.out, force=args.force)
    fcn = load_fcn(args.fcn_dir)
    result = export_fcn(fcn, min_size=_size_arg(args.min_size) if args.min_size else None,
                        multiple_of=_size_arg(args.multiple_of) if args.multiple_of else 1,
                        max_size=_size_arg(args.max_size) if args.max_size else None,
                        platforms=args.platform, fold=not args.no_fold, verify=not args.no_verify)
    out = result.save(args.out, force=args.force)
    info = result.info
    if args.json:
        print(json.dumps({**info, "artifact": str(out), "bytes": out.stat().st_size}, indent=2))
        return 0
    g = info["geometry"]
    print(f"exported FCN({info['source']}) -> {out} ({out.stat().st_size / 1e6:.1f} MB StableHLO, "
          f"{', '.join(info['platforms'])}; description in {out}.json)")
    print(f"input  (n, H, W, {info['input']['channels']}) float32, {info['input']['sizes']}")
    print(f"output ({', '.join(info['output']['shape'])}) float32 scores; cell (i, j) judges the window "
          f"top = {g['offset'][0]} + {g['stride'][0]}*i, left = {g['offset'][1]} + {g['stride'][1]}*j, "
          f"{g['receptive_field'][0]}x{g['receptive_field'][1]} px")
    print(f"BatchNorms folded into their convolutions: {info['folded_batchnorms']}")
    for check in info["verified"]:
        print(f"checked against the live network on {check['size'][0]}x{check['size'][1]} images: "
              f"max |diff| {check['max_abs_diff']:.2g}")
    print(f"serve it with jax alone: jax.export.deserialize(open({str(out)!r}, 'rb').read()).call(images)")
    return 0


def add_commands(subparsers) -> None:
    from convert.stream import add_stream_arguments as stream_arguments

    p = subparsers.add_parser(
        "convert", help="turn a saved classifier or a Keras model file into a saved fully convolutional network",
        description="Convert a classifier into a fully convolutional network with the same weights. A Keras file is "
                    "read as data (its config JSON and HDF5 weights; no code in it runs): a Sequential or "
                    "functional chain of Conv2D, DepthwiseConv2D, SeparableConv2D, pooling, BatchNormalization, "
                    "Dropout, Flatten, Dense, Activation/ReLU, Rescaling and ZeroPadding2D layers.")
    p.add_argument("checkpoint", help="saved classifier directory (model.json + weights.safetensors), or a Keras "
                                      "model file (.keras, or a legacy full-model .h5)")
    p.add_argument("--out", required=True, help="directory for the FCN (fcn.json + weights.safetensors)")
    p.add_argument("--force", action="store_true", help="replace the saved FCN already in --out")
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser("predict-dense", help="class score map of an image of any size, or of a folder")
    p.add_argument("model", help="saved FCN or classifier directory, or a registry name (random weights)")
    p.add_argument("image", help="image file (PNG, JPEG, ...), .npy array, directory or glob")
    p.add_argument("--out", help="one image: write a heatmap overlay PNG here; a folder: the results directory")
    p.add_argument("--class", dest="cls", type=int, help="class to draw (default: the best class anywhere)")
    p.add_argument("--score-map", action="store_true",
                   help="average-pool heads: per-position scores instead of per-training-window scores")
    p.add_argument("--cache-dir", help="JAX persistent compilation cache directory")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    stream_arguments(p, default_save="scores,labels")
    p.set_defaults(func=cmd_predict_dense)

    p = subparsers.add_parser(
        "segment", help="label every pixel of an image of any size with a segmentation net",
        description="Label every pixel of an image with a trained segmentation net (default: the shipped FCN-8s "
                    "grown from the MNIST classifier: digits 0-9 and background), draw the labels beside the "
                    "converted classifier's dense score map and the class legend, and list the regions found. "
                    "Grayscale nets expect light shapes on dark like MNIST's (dark-on-light images are "
                    "inverted automatically).")
    p.add_argument("image", nargs="?", help="image file (PNG, JPEG, ...; grayscale, RGB, with alpha, 16-bit), "
                                            ".npy array, directory or glob")
    p.add_argument("--model", default="mnistnet_fcn8s-digit_scenes",
                   help="a trained net's directory (zoo segment-train's output) or a shipped net, e.g. "
                        "mnistnet_fcn16s (default: %(default)s; `zoo list` shows them)")
    p.add_argument("--scene", metavar="WxH", help="segment a generated digit scene of this size instead, e.g. 777x333")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated scene (default 0)")
    p.add_argument("--out", help="picture to write (default: <image>-segment.png or segment-scene-*.png); "
                                 "a folder: the results directory")
    polarity = p.add_mutually_exclusive_group()
    polarity.add_argument("--invert", dest="invert", action="store_true", default=None,
                          help="always invert the image (dark shapes on light paper)")
    polarity.add_argument("--no-invert", dest="invert", action="store_false",
                          help="never invert (default for grayscale nets: invert when the median is light)")
    p.add_argument("--cache-dir", help="JAX persistent compilation cache directory (later runs skip compiling)")
    p.add_argument("--json", action="store_true", help="print a machine-readable report instead")
    stream_arguments(p, default_save="labels")
    p.set_defaults(func=cmd_segment)

    p = subparsers.add_parser(
        "export", help="a saved FCN as one StableHLO file that runs on any image size without this project",
        description="Export a saved FCN (what `zoo convert` writes) with jax.export: symbolic batch, height and "
                    "width constrained to the sizes the network accepts, weights inside, BatchNorms folded. "
                    "The artifact is checked against the live network on three image sizes.")
    p.add_argument("fcn_dir", help="saved FCN directory (fcn.json + weights.safetensors)")
    p.add_argument("--out", required=True, help="artifact to write, e.g. model.stablehlo (+ model.stablehlo.json)")
    p.add_argument("--format", choices=("stablehlo", "onnx"), default="stablehlo", help="default: %(default)s")
    p.add_argument("--min-size", metavar="HxW", help="smallest image to allow (default: the receptive field of "
                                                     "VALID nets, the training size of padded ones)")
    p.add_argument("--max-size", metavar="HxW", help="largest image to allow (default: no limit)")
    p.add_argument("--multiple-of", metavar="HxW",
                   help="allow only sizes that are multiples of this (e.g. 32 for EfficientNet, whose padding "
                        "depends on whether a side is even)")
    p.add_argument("--platform", action="append", choices=("cpu", "cuda", "rocm", "tpu"),
                   help="where the artifact may run; repeat for several (default: this machine's)")
    p.add_argument("--no-fold", action="store_true", help="keep the BatchNorms as they are")
    p.add_argument("--no-verify", action="store_true", help="skip the check against the live network")
    p.add_argument("--force", action="store_true", help="replace the export already at --out")
    p.add_argument("--json", action="store_true", help="print the artifact's description as JSON")
    p.set_defaults(func=cmd_export)
