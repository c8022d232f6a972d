"""`zoo segment` (the demo) and `zoo segment-train` (the FCN-32s/16s/8s experiment)."""

from __future__ import annotations

import argparse
import json


def cmd_segment(args) -> int:
    from train import segment_data as sd
    from train import segment_demo

    if args.cache_dir:
        from convert.predict import enable_compilation_cache

        enable_compilation_cache(args.cache_dir)
    scene = sd.parse_size(args.scene) if args.scene else None
    if args.image is not None and scene is not None:
        raise ValueError("give either an IMAGE or --scene WxH, not both")
    if args.image is None and scene is None:
        raise ValueError("give an IMAGE file (PNG, JPEG, ...) or --scene WxH for a generated scene, e.g. --scene 777x333")
    say = (lambda *a, **k: None) if args.json else print
    report = segment_demo.run(image_path=args.image, scene_size=scene, seed=args.seed, out=args.out,
                              invert=args.invert, variant=args.variant, say=say)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def cmd_segment_train(args) -> int:
    from train import segment
    from train import segment_data as sd

    sd.prepare_scenes(args.data_dir, quiet=False)
    if args.prepare_only:
        print(sd.scenes_dir(args.data_dir))
        return 0
    config = segment.SegmentTrainConfig(steps=args.steps, batch_size=args.batch_size, crop=args.crop,
                                        learning_rate=args.lr, seed=args.seed)
    results = segment.train_all(classifier_tag=args.classifier_tag, classifier_dir=args.classifier_dir,
                                data_dir=args.data_dir, config=config, test_scenes=args.test_scenes,
                                ship=not args.no_ship, out_json=args.out)
    print(json.dumps([{k: r[k] for k in ("model", "mean_iou", "pixel_accuracy", "train_seconds")}
                      for r in results["rows"]], indent=2))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "segment", help="segment digits in an image of any size (FCN-8s beside the converted classifier)",
        description="Label every pixel of an image as one of the digits 0-9 or background with the shipped "
                    "FCN-8s, draw it beside the converted MNIST classifier's dense score map, and list the "
                    "digits found. Digits should be light on dark like MNIST's (dark-on-light images are "
                    "inverted automatically) and roughly 20-60 pixels tall.")
    p.add_argument("image", nargs="?", help="image file (PNG, JPEG, ...; grayscale, RGB or with alpha)")
    p.add_argument("--scene", metavar="WxH", help="segment a generated scene of this size instead, e.g. 777x333")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated scene (default 0)")
    p.add_argument("--out", help="overlay PNG to write (default: <image>-segment.png or segment-scene-*.png)")
    p.add_argument("--variant", default="fcn8s", choices=("fcn8s", "fcn16s", "fcn32s"),
                   help="which shipped decoder draws the segmentation (default fcn8s)")
    polarity = p.add_mutually_exclusive_group()
    polarity.add_argument("--invert", dest="invert", action="store_true", default=None,
                          help="always invert the image (dark digits on light paper)")
    polarity.add_argument("--no-invert", dest="invert", action="store_false",
                          help="never invert (default: invert when the image's median is light)")
    p.add_argument("--cache-dir", help="JAX persistent compilation cache directory (later runs skip compiling)")
    p.add_argument("--json", action="store_true", help="print a machine-readable report instead")
    p.set_defaults(func=cmd_segment)

    p = subparsers.add_parser(
        "segment-train", help="build digit_scenes, train FCN-32s/16s/8s from the converted classifier, evaluate",
        description="Builds the digit_scenes data set (offline, from the prepared MNIST), evaluates the converted "
                    "classifier, trains FCN-32s, then FCN-16s from it, then FCN-8s from that, evaluates each on "
                    "the test scenes and ships the weights to zoo/weights/. A few minutes on a 2-core CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=250, help="updates per stage")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=96, help="training crop side in pixels")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-scenes", type=int, help="evaluate on the first N test scenes only (default: all)")
    p.add_argument("--classifier-tag", default="mnist", help="shipped mnistnet weights to grow from")
    p.add_argument("--classifier-dir", help="grow from a saved classifier directory instead (zoo train's model/)")
    p.add_argument("--data-dir", help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--out", help="write the results table as JSON here")
    p.add_argument("--no-ship", action="store_true", help="do not write weights to zoo/weights/")
    p.add_argument("--prepare-only", action="store_true", help="only build the digit_scenes data set")
    p.set_defaults(func=cmd_segment_train)
