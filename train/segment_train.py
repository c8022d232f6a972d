"""`zoo segment-train`: the paper's staged training, FCN-32s -> FCN-16s -> FCN-8s, through `train.loop.train`.

Long, Shelhamer & Darrell 2015, "Fully Convolutional Networks for Semantic Segmentation",
https://arxiv.org/abs/1411.4038, sec. 4.2: each net starts from the trained coarser one
(`convert.grow_from`), all layers fine-tuned. Every stage is one run of the one training loop
(`TrainConfig(variant=...)`, a segmentation data set): its checkpoints, metrics.jsonl, curves.png
and model/ land in OUT/<variant>/. Beside the three nets the table has the converted classifier
alone (`baseline`), where the data set's classes are the classifier's plus a background class:
its per-pixel class scores (bilinear from its cells), a pixel being background when the top
softmax probability is below a threshold t fitted on training images; nothing else is fitted.

    rows = train_staged(StagedConfig(backbone="mnistnet", pretrained="mnist", dataset="digit_scenes",
                                     out="runs/segment"))
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from convert.segment import VARIANTS


@dataclasses.dataclass
class StagedConfig:
    """The staged experiment. Defaults: a few minutes per stage on a 2-core CPU (digit_scenes).

    backbone: a registry classifier; pretrained (its shipped tag) or init_from (a saved
        classifier's directory) gives its weights, else it starts from random weights.
    variant: the last net to train; the coarser ones are trained first ("fcn8s": all three).
    steps: updates per stage, batch_size crops of crop x crop pixels; learning_rate: AdamW peak,
        cosine decay after a 5% warmup.
    test_examples: evaluate on the first N test images only; check_examples: the first test images
        whose metrics are recorded with shipped weights for a quick re-check.
    """

    backbone: str
    dataset: str
    out: str
    variant: str = "fcn8s"
    pretrained: str | None = None
    init_from: str | None = None
    steps: int = 150
    batch_size: int = 8
    crop: int = 96
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    test_examples: int | None = None
    calibration_examples: int = 30
    check_examples: int = 10
    data_dir: str | None = None
    resume: bool = False
    progress: bool = True


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stage_configs(config: StagedConfig):
    """The TrainConfig of each stage, coarse to fine, each starting from the previous stage's model/."""
    from train import segmentation_data
    from train.config import TrainConfig

    if config.variant not in VARIANTS:
        raise ValueError(f"unknown variant {config.variant!r}; use one of {', '.join(VARIANTS)}")
    if config.pretrained and config.init_from:
        raise ValueError("give --pretrained TAG or --init-from DIR, not both")
    variants = list(VARIANTS)[:list(VARIANTS).index(config.variant) + 1]
    train_images = segmentation_data.segmentation_info(config.dataset, config.data_dir)["splits"]["train"]
    # The schedule spans whole epochs (the loop's rule); `steps` of them are run.
    epochs = max(1, math.ceil(config.steps * config.batch_size / max(train_images, 1)))
    configs, previous = [], None
    for variant in variants:
        configs.append(TrainConfig(
            model=config.backbone, dataset=config.dataset, data_dir=config.data_dir, variant=variant,
            pretrained=config.pretrained if previous is None else None,
            init_from=(config.init_from if previous is None else str(Path(config.out) / previous / "model")),
            test_examples=config.test_examples, epochs=epochs, max_steps=config.steps, batch_size=config.batch_size,
            crop_size=config.crop, optimizer="adamw", learning_rate=config.learning_rate, schedule="cosine",
            warmup_epochs=0.05, weight_decay=config.weight_decay, seed=config.seed,
            # --resume continues the stages that started; the later ones start afresh.
            out_dir=str(Path(config.out) / variant), resume=config.resume and (Path(config.out) / variant).is_dir(),
            progress=config.progress))
        previous = variant
    return configs


def _shipped_classifier(config: StagedConfig):
    """(converted classifier, preprocessing) of the backbone's weights, or (None, None) for random ones."""
    import convert
    import zoo
    from zoo import pretrained, saving

    if config.pretrained:
        model = zoo.create_model(config.backbone, pretrained=config.pretrained)
        preprocessing = pretrained.metadata(config.backbone, config.pretrained)["preprocessing"]
    elif config.init_from:
        model = saving.load_model(config.init_from)
        preprocessing = saving.read_config(config.init_from)["metadata"]["preprocessing"]
    else:
        return None, None
    model.eval()
    return convert.to_fcn(model), preprocessing


def evaluation_split(info: dict) -> str:
    """The split the loop reports as test_*: "test", or "val" for a data set without one (`train.tasks`)."""
    return "test" if "test" in info["splits"] or "val" not in info["splits"] else "val"


def classifier_labels(scores: np.ndarray, threshold: float, background: int) -> np.ndarray:
    """Baseline: (..., K0) classifier scores -> labels, `background` where the top softmax is below threshold."""
    scores = np.asarray(scores, np.float32)
    shifted = np.exp(scores - scores.max(-1, keepdims=True))
    confidence = 1.0 / shifted.sum(-1)  # the softmax of the top class
    return np.where(confidence < threshold, background, scores.argmax(-1)).astype(np.uint8)


def baseline(config: StagedConfig, info: dict) -> dict | None:
    """The converted classifier alone on the test images (see the module docstring); None when it does not apply."""
    import convert
    from train import segmentation_data, tasks

    fcn, preprocessing = _shipped_classifier(config)
    names = [str(n).lower() for n in info["class_names"]]
    if fcn is None or "background" not in names or fcn.num_classes != info["num_classes"] - 1 \
            or names.index("background") != fcn.num_classes:
        return None
    background = names.index("background")
    net = convert.grow_segmentation(fcn, "fcn32s", num_classes=fcn.num_classes, preprocessing=preprocessing,
                                    keep_class_filters=True)
    net.eval()
    predictor = convert.DensePredictor(net)

    def scores_of(examples):
        return [(predictor.predict(image / 255.0).scores, label) for image, label in examples]

    calibration = scores_of(segmentation_data.load_segmentation(config.dataset, "train", config.data_dir,
                                                                limit=config.calibration_examples))
    grid = [round(float(t), 2) for t in np.arange(0.50, 1.0, 0.02)] + [0.99, 0.995, 0.999]
    fitted = {t: tasks.scores_from_confusion(sum(tasks.confusion(label, classifier_labels(s, t, background), info["num_classes"])
                                       for s, label in calibration))["mean_iou"] for t in grid}
    threshold = max(fitted, key=fitted.get)
    start = time.perf_counter()
    matrix = np.zeros((info["num_classes"],) * 2, np.int64)
    test = segmentation_data.load_segmentation(config.dataset, evaluation_split(info), config.data_dir,
                                               limit=config.test_examples)
    for image, label in test:
        matrix += tasks.confusion(label, classifier_labels(predictor.predict(image / 255.0).scores, threshold,
                                                           background), info["num_classes"])
    scores = tasks.scores_from_confusion(matrix)
    return {"model": "converted classifier", "threshold": threshold, "mean_iou": scores["mean_iou"],
            "pixel_accuracy": scores["pixel_accuracy"], "class_iou": scores["class_iou"], "train_seconds": 0.0,
            "eval_seconds": round(time.perf_counter() - start, 1), "images": len(test)}


def check_metrics(model_dir: Path, dataset: str, count: int, data_dir=None) -> dict:
    """Mean IU and pixel accuracy of a saved net on the first `count` test images, through DensePredictor:
    what tests/test_segment.py re-measures for shipped weights."""
    import convert
    from train import segmentation_data, tasks

    net = convert.load_segmentation(model_dir)
    predictor = convert.DensePredictor(net)
    matrix = np.zeros((net.num_classes,) * 2, np.int64)
    info = segmentation_data.segmentation_info(dataset, data_dir)
    for image, label in segmentation_data.load_segmentation(dataset, evaluation_split(info), data_dir, limit=count):
        matrix += tasks.confusion(label, predictor.predict(image / 255.0).labels(), net.num_classes)
    scores = tasks.scores_from_confusion(matrix)
    return {"images": count, "mean_iou": scores["mean_iou"], "pixel_accuracy": scores["pixel_accuracy"]}


def train_staged(config: StagedConfig, *, ship_tag: str | None = None) -> dict:
    """Train every stage, evaluate, write OUT/results.json; ship the nets to zoo/weights with `ship_tag`."""
    import platform

    import jax

    from train import loop, segmentation_data
    from zoo.saving import check_output_dir

    info = segmentation_data.segmentation_info(config.dataset, config.data_dir)
    configs = stage_configs(config)
    # Its own stages are continued with --resume (the "force" of this command); anything else is refused.
    out = check_output_dir(config.out, owns={*VARIANTS, "results.json"}, what="staged run", force=config.resume,
                           force_flag="--resume to continue its stages")
    machine = (f"{platform.processor() or platform.machine()}, jax {jax.__version__} on {jax.devices()[0].platform} "
               f"({jax.device_count()} device(s))")
    results = {"machine": machine, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "config": dataclasses.asdict(config), "rows": []}
    row = baseline(config, info)
    if row is not None:
        _say(f"converted classifier (t={row['threshold']}): mean IU {row['mean_iou']:.4f}, "
             f"pixel accuracy {row['pixel_accuracy']:.4f}")
        results["rows"].append(row)
    for stage in configs:
        result = loop.train(stage)
        record = result.history[-1] if result.history else {}
        row = {"model": stage.variant, "mean_iou": result.test_mean_iou if hasattr(result, "test_mean_iou")
               else record.get("test_mean_iou"), "pixel_accuracy": record.get("test_pixel_accuracy"),
               "train_seconds": round(result.seconds, 1), "steps": result.steps,
               "final_loss": record.get("train_loss"), "model_dir": str(result.model_dir)}
        _say(f"{stage.variant}: mean IU {row['mean_iou']:.4f}, pixel accuracy {row['pixel_accuracy']:.4f} "
             f"({row['train_seconds']:.0f} s)")
        results["rows"].append(row)
        if ship_tag:
            from zoo import pretrained

            check = check_metrics(result.model_dir, config.dataset, config.check_examples, config.data_dir)
            # Where the classifier beside the net in `zoo segment` comes from (shipped weights only).
            origin = {"model": config.backbone, "pretrained": config.pretrained} if config.pretrained else {}
            pretrained.export(result.model_dir, ship_tag, extra={"check": check, "classifier": origin})
    from zoo.saving import write_files_atomically

    write_files_atomically(out, {"results.json": (json.dumps(results, indent=2) + "\n").encode()})
    return results


def cmd_segment_train(args) -> int:
    config = StagedConfig(backbone=args.backbone, dataset=args.dataset, out=args.out, variant=args.variant,
                          pretrained=args.pretrained, init_from=args.init_from, steps=args.steps,
                          batch_size=args.batch_size, crop=args.crop, learning_rate=args.lr, seed=args.seed,
                          test_examples=args.test_examples, data_dir=args.data_dir, resume=args.resume,
                          progress=not args.no_progress)
    results = train_staged(config, ship_tag=args.ship)
    width = max(len(r["model"]) for r in results["rows"])
    print(f"{'model':{width}s}  mean IU  pixel acc  train (s)")
    for r in results["rows"]:
        print(f"{r['model']:{width}s}  {r['mean_iou']:7.4f}  {r['pixel_accuracy']:9.4f}  {r['train_seconds']:9.1f}")
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def add_commands(subparsers) -> None:
    import argparse

    p = subparsers.add_parser(
        "segment-train", help="train FCN-32s -> 16s -> 8s from a zoo classifier on a segmentation data set",
        description="Grow FCN-32s from a converted classifier and train it, then FCN-16s from it, then FCN-8s "
                    "(Long et al. 2015, staged training), each a run of the training loop in OUT/<variant>/ "
                    "(checkpoints, metrics.jsonl, curves.png, model/). Data sets: digit_scenes, or your own "
                    "(`zoo data prepare-segmentation`). Prints mean IU and pixel accuracy per net.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", required=True, help="a registry classifier (`zoo list`), e.g. mnistnet or vgg16")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", metavar="TAG", help="the backbone's shipped weights, e.g. mnist")
    weights.add_argument("--init-from", metavar="DIR", help="a saved classifier (a `zoo train` run's model/)")
    p.add_argument("--dataset", default="digit_scenes", help="a segmentation data set")
    p.add_argument("--variant", default="fcn8s", choices=list(VARIANTS), help="the last net of the stages")
    p.add_argument("--steps", type=int, default=150, help="updates per stage")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=96, help="training crop side in pixels")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-examples", type=int, help="evaluate on the first N test images only (default: all)")
    p.add_argument("--data-dir", help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--out", required=True, help="output directory: one run per stage, results.json")
    p.add_argument("--resume", action="store_true", help="continue interrupted stages from their checkpoints")
    p.add_argument("--ship", metavar="TAG", help="also ship the nets to zoo/weights as <backbone>_<variant>-TAG")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_segment_train)
