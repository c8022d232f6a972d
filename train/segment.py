"""Semantic segmentation of digit scenes: the converted classifier, then FCN-32s, FCN-16s, FCN-8s.

Long, Shelhamer & Darrell 2015, "Fully Convolutional Networks for Semantic Segmentation",
https://arxiv.org/abs/1411.4038. The pieces:

- data: `train.segment_data` (the `digit_scenes` TFDS data set, 11 classes, void rim ignored);
- models: `train.segment_models` (decoders grown from `convert.to_fcn` of the MNIST classifier);
- here: training (`train_variant`, `train_all`), the paper's metrics (`confusion`, `scores_from`:
  pixel accuracy and mean IU over classes), the converted-classifier baseline's background rule
  (`classifier_labels`), a bucketed predictor for images of any size (`SegmentPredictor`), and
  shipping/loading the trained weights (`export`, `load_shipped`).

Training does not go through `train.loop.train`: that loop is built around one label per image
(accuracy, batches gathered from an (N,) label array). Here each pixel has a label and inputs are
random crops of variously sized scenes, so a small loop of its own runs the jitted steps; the
optimizer and its schedule are `train.loop.make_optimizer` / `make_schedule` from a `TrainConfig`.
Like the paper, the nets are trained in stages: FCN-32s from the converted classifier, FCN-16s
from the trained FCN-32s, FCN-8s from the trained FCN-16s, all layers fine-tuned. BatchNorm keeps
the classifier's statistics (batches of mostly black crops would be poor estimates).

The baseline's background rule: a pixel is background when the converted classifier's highest
class probability there (bilinearly interpolated logits, softmax over the 10 digits) is below a
threshold t, else the most probable digit. t is the one value of a grid that maximizes mean IU on
training scenes (`calibrate_threshold`); nothing else is fitted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train import segment_data as sd
from train import segment_models as sm

WEIGHTS_FORMAT = "fcnzoo-segmentation"
DEFAULT_TAG = "digit_scenes"
CLASSIFIER = "mnistnet"
CLASSIFIER_TAG = "mnist"
MIN_SIZE = (28, 28)            # one MNIST digit; smaller images are refused
MAX_PIXELS = 64_000_000        # larger images are refused (memory); images above TILE are tiled
TILE = 1024                    # tile core size (pixels per side) for large images
TILE_MARGIN = 32               # context on each side of a tile: > half the FCN-8s receptive field
EVAL_LADDER = (128, 128, 1.0)  # evaluation: buckets 128, 256, 384, 512 per axis (few compilations)
CHECK_LADDER = (512, 512, 1.0)  # the weights' quick re-check: every scene at 512x512, one compilation
BUCKET_STEP = 16               # bucket sizes are MIN_BUCKET + k * BUCKET_STEP, growing by BUCKET_RATIO
MIN_BUCKET = 32
BUCKET_RATIO = 1.25


# ---------------------------------------------------------------------------------------------
# The classifier the decoders grow from


def classifier_fcn(tag: str = CLASSIFIER_TAG, *, model_dir: str | os.PathLike | None = None):
    """(converted FCN, (mean, std), source description) of the MNIST classifier.

    Args:
        tag: shipped weights of `mnistnet` (`zoo.create_model("mnistnet", pretrained=tag)`).
        model_dir: instead, a directory written by `zoo.saving.save_model` (e.g. a `zoo train`
            run's model/), for when no weights are shipped.
    """
    from convert.fcn import to_fcn
    from zoo import pretrained

    if model_dir is not None:
        from zoo.saving import load_model, read_config

        model = load_model(model_dir)
        preprocessing = read_config(model_dir)["metadata"]["preprocessing"]
        source = {"model_dir": str(model_dir)}
    else:
        import zoo

        model = zoo.create_model(CLASSIFIER, pretrained=tag)
        meta = pretrained.metadata(CLASSIFIER, tag)
        preprocessing = meta["preprocessing"]
        source = {"model": CLASSIFIER, "tag": tag, "sha256": meta["sha256"],
                  "test_accuracy": meta.get("test_accuracy")}
    model.eval()
    # x_net = (uint8 * scale - mean) / std; our inputs are uint8 / 255, so mean and std carry over
    # once the scale is checked.
    if not math.isclose(float(preprocessing["scale"]), 1 / 255, rel_tol=1e-6):
        raise ValueError(f"the classifier expects uint8 * {preprocessing['scale']}; the decoders assume 1/255")
    norm = (float(preprocessing["mean"][0]), float(preprocessing["std"][0]))
    return to_fcn(model), norm, source


# ---------------------------------------------------------------------------------------------
# Metrics (the paper's sec. 5: pixel accuracy, mean IU)


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int = sd.NUM_CLASSES) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, cols = predicted; VOID pixels are left out."""
    labels = np.asarray(labels).ravel()
    predictions = np.asarray(predictions).ravel()
    keep = labels != sd.VOID
    return np.bincount(labels[keep].astype(np.int64) * num_classes + predictions[keep].astype(np.int64),
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores_from(matrix: np.ndarray) -> dict:
    """Pixel accuracy, mean IU (over classes present in labels or predictions) and per-class IU."""
    matrix = np.asarray(matrix, np.float64)
    true_positive = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - true_positive
    present = union > 0
    iou = np.where(present, true_positive / np.maximum(union, 1), np.nan)
    return {"pixel_accuracy": float(true_positive.sum() / max(matrix.sum(), 1)),
            "mean_iou": float(np.nanmean(iou)) if present.any() else float("nan"),
            "class_iou": [None if np.isnan(v) else round(float(v), 4) for v in iou]}


def classifier_labels(logits: np.ndarray, threshold: float) -> np.ndarray:
    """Baseline: (..., 10) classifier logits -> (...) labels, BACKGROUND where max softmax < threshold."""
    logits = np.asarray(logits, np.float32)
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    confidence = 1.0 / shifted.sum(-1)  # softmax of the top class
    return np.where(confidence < threshold, sd.BACKGROUND, logits.argmax(-1)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Predicting images of any size: shape buckets, tiles for big images


def bucket_size(n: int, *, minimum: int = MIN_BUCKET, step: int = BUCKET_STEP, ratio: float = BUCKET_RATIO) -> int:
    """The padded length an axis of n pixels runs at: the first rung >= n of convert's bucket ladder
    (minimum + k * step, k growing by about `ratio`; step a multiple of the total stride)."""
    from convert.predict import bucket_ladder

    return next(size for size in bucket_ladder(minimum, step, n, ratio) if size >= n)


class SegmentPredictor:
    """Runs a per-pixel network on images of any size with few compilations.

    Each image is padded at the bottom and right with black background to a bucket of convert's
    ladder (`bucket_size`, per axis), run by an executable compiled ahead of time once per bucket,
    and cropped back. Images with a side above TILE are cut into TILE x TILE tiles with TILE_MARGIN
    pixels of context on every side, all run at one bucket; only the tiles' cores are kept, so the
    result equals an untiled run wherever the receptive field fits in the margin.

    Args:
        network: a module mapping (N, H, W, 1) in [0, 1] to (N, H, W, K) (a SegmentationFCN, or
            ConvertedClassifierScores), H and W any size.
        dtype: computation dtype (bfloat16 halves the memory traffic on accelerators).
        ladder: (minimum, step, ratio) of the bucket ladder (see `bucket_size`); coarser rungs mean
            fewer compilations and more padding.
    """

    def __init__(self, network: nnx.Module, *, dtype=jnp.float32,
                 ladder: tuple[int, int, float] = (MIN_BUCKET, BUCKET_STEP, BUCKET_RATIO)):
        self.ladder = tuple(ladder)
        self._graphdef, self._state = nnx.split(network)
        self.dtype = jnp.dtype(dtype)
        if self.dtype != jnp.float32:
            self._state = jax.tree.map(lambda a: a.astype(self.dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                                       else a, self._state)
        self._executables: dict[tuple[int, int, int], object] = {}
        self.compilations = 0
        self.compile_seconds = 0.0

    def _apply(self, state, x):
        return nnx.merge(self._graphdef, state)(x).astype(jnp.float32)

    def executable(self, batch: int, height: int, width: int):
        key = (batch, height, width)
        if key not in self._executables:
            start = time.perf_counter()
            spec = jax.ShapeDtypeStruct(key + (1,), self.dtype)
            self._executables[key] = jax.jit(self._apply).lower(self._state, spec).compile()
            self.compile_seconds += time.perf_counter() - start
            self.compilations += 1
        return self._executables[key]

    @property
    def buckets(self) -> list[tuple[int, int, int]]:
        return list(self._executables)

    def _run(self, padded: np.ndarray) -> np.ndarray:
        run = self.executable(*padded.shape[:3])
        return np.asarray(run(self._state, jnp.asarray(padded, self.dtype)))

    def predict(self, image: np.ndarray) -> np.ndarray:
        """image: (H, W) or (H, W, 1) floats in [0, 1] -> (H, W, K) float32 scores."""
        image = check_image_array(image)
        height, width = image.shape
        if max(height, width) <= TILE:
            bh, bw = (bucket_size(n, minimum=self.ladder[0], step=self.ladder[1], ratio=self.ladder[2])
                      for n in (height, width))
            padded = np.zeros((1, bh, bw, 1), np.float32)
            padded[0, :height, :width, 0] = image
            return self._run(padded)[0, :height, :width]
        return self._predict_tiled(image)

    def _predict_tiled(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape
        m = TILE_MARGIN
        side = bucket_size(TILE + 2 * m)
        framed = np.zeros((height + 2 * m + TILE, width + 2 * m + TILE), np.float32)
        framed[m:m + height, m:m + width] = image
        out = None
        for top in range(0, height, TILE):
            for left in range(0, width, TILE):
                tile = np.zeros((1, side, side, 1), np.float32)
                tile[0, :TILE + 2 * m, :TILE + 2 * m, 0] = framed[top:top + TILE + 2 * m, left:left + TILE + 2 * m]
                scores = self._run(tile)[0, m:m + TILE, m:m + TILE]
                if out is None:
                    out = np.zeros((height, width, scores.shape[-1]), np.float32)
                h, w = min(TILE, height - top), min(TILE, width - left)
                out[top:top + h, left:left + w] = scores[:h, :w]
        return out


def check_image_array(image) -> np.ndarray:
    """(H, W) float32 in [0, 1] from a 2-D or (H, W, 1) array, or a ValueError saying what to fix."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"expected one grayscale image (H, W) or (H, W, 1), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"the image must be numeric, got dtype {array.dtype}")
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError("the image has NaN or infinite pixels; clean it first")
    if array.shape[0] < MIN_SIZE[0] or array.shape[1] < MIN_SIZE[1]:
        raise ValueError(f"the image is {array.shape[1]}x{array.shape[0]} (WxH); segmentation needs at least "
                         f"{MIN_SIZE[1]}x{MIN_SIZE[0]} pixels (one MNIST digit). Upscale or pad it.")
    if array.size > MAX_PIXELS:
        raise ValueError(f"the image has {array.size / 1e6:.1f} megapixels; the limit is {MAX_PIXELS / 1e6:.0f} "
                         f"(memory). Downscale it or cut it into parts.")
    return array


# ---------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class SegmentTrainConfig:
    """One stage of training (one variant). Defaults: a few minutes on a 2-core CPU.

    steps: optimizer updates; batch_size crops of crop x crop pixels from training scenes.
    learning_rate: AdamW peak, cosine decay after a short warmup; weight_decay on kernels.
    """

    steps: int = 250
    batch_size: int = 8
    crop: int = 96
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    seed: int = 0

    def validate(self) -> SegmentTrainConfig:
        for name in ("steps", "batch_size", "crop"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.crop < MIN_SIZE[0]:
            raise ValueError(f"crop must be at least {MIN_SIZE[0]} pixels, got {self.crop}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        return self


def random_crops(scenes, count: int, crop: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` crops of crop x crop from random scenes: images (count, crop, crop, 1) float32 in [0, 1],
    labels (count, crop, crop) uint8. Scenes smaller than the crop are padded with background."""
    images = np.zeros((count, crop, crop, 1), np.float32)
    labels = np.full((count, crop, crop), sd.BACKGROUND, np.uint8)
    for k in range(count):
        image, label = scenes[int(rng.integers(len(scenes)))]
        h, w = image.shape
        top = int(rng.integers(0, max(h - crop, 0) + 1))
        left = int(rng.integers(0, max(w - crop, 0) + 1))
        part = image[top:top + crop, left:left + crop]
        images[k, :part.shape[0], :part.shape[1], 0] = part / 255.0
        labels[k, :part.shape[0], :part.shape[1]] = label[top:top + crop, left:left + crop]
    return images, labels


def pixel_loss(logits, labels):
    """Mean softmax cross-entropy over non-void pixels. logits: (N, H, W, K); labels: (N, H, W)."""
    valid = labels != sd.VOID
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    return jnp.sum(per_pixel * valid) / jnp.maximum(jnp.sum(valid), 1)


def train_variant(model: sm.SegmentationFCN, scenes, config: SegmentTrainConfig, *, log=None) -> dict:
    """Fine-tune `model` in place on crops of `scenes`; returns {"losses", "seconds", "steps"}."""
    from train.config import TrainConfig
    from train.loop import make_optimizer, make_schedule

    config.validate()
    model.eval()  # BatchNorm keeps the classifier's statistics; there is no dropout
    optimizer_config = TrainConfig(model=CLASSIFIER, optimizer="adamw", learning_rate=config.learning_rate,
                                   schedule="cosine", warmup_epochs=config.warmup_fraction,
                                   weight_decay=config.weight_decay, epochs=1, seed=config.seed)
    schedule = make_schedule(optimizer_config, config.steps, config.steps)
    tx = make_optimizer(optimizer_config, schedule)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, rest, images, labels):
        def loss_fn(params):
            return pixel_loss(nnx.merge(graphdef, params, rest)(images), labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng([config.seed, sm.VARIANTS[model.variant]])
    losses = []
    start = time.perf_counter()
    for i in range(config.steps):
        images, labels = random_crops(scenes, config.batch_size, config.crop, rng)
        params, opt_state, loss = step(params, opt_state, rest, jnp.asarray(images), jnp.asarray(labels))
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{model.variant}: the loss became {losses[-1]} at step {i}; lower the learning rate")
        if log and (i % 50 == 0 or i == config.steps - 1):
            log(f"{model.variant} step {i + 1}/{config.steps} loss {np.mean(losses[-50:]):.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    nnx.update(model, params)
    return {"losses": losses, "seconds": time.perf_counter() - start, "steps": config.steps}


def evaluate(predict_labels, scenes) -> dict:
    """Metrics of `predict_labels(image uint8 (H, W)) -> labels (H, W)` over (image, label) scenes."""
    matrix = np.zeros((sd.NUM_CLASSES, sd.NUM_CLASSES), np.int64)
    for image, label in scenes:
        matrix += confusion(label, predict_labels(image))
    return {**scores_from(matrix), "scenes": len(scenes), "pixels": int(matrix.sum())}


def fcn_labeler(predictor: SegmentPredictor):
    return lambda image: predictor.predict(image / 255.0).argmax(-1).astype(np.uint8)


def calibrate_threshold(predictor: SegmentPredictor, scenes, grid=None) -> tuple[float, dict]:
    """The baseline's background threshold t: the grid value with the best mean IU on `scenes`."""
    grid = np.round(np.arange(0.50, 1.0, 0.02), 2).tolist() + [0.99, 0.995, 0.999] if grid is None else grid
    logits = [predictor.predict(image / 255.0) for image, _ in scenes]
    results = {}
    for t in grid:
        matrix = sum(confusion(label, classifier_labels(lg, t)) for lg, (_, label) in zip(logits, scenes))
        results[t] = scores_from(matrix)["mean_iou"]
    best = max(results, key=results.get)
    return float(best), results


# ---------------------------------------------------------------------------------------------
# Shipping weights


def _weights_paths(variant: str, tag: str, weights_dir=None) -> tuple[Path, Path]:
    from zoo.pretrained import WEIGHTS_DIR

    directory = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    return directory / f"{variant}-{tag}.safetensors", directory / f"{variant}-{tag}.json"


def export(model: sm.SegmentationFCN, tag: str, *, metrics: dict, extra: dict, weights_dir=None) -> tuple[Path, Path]:
    """Write <variant>-<tag>.safetensors and .json (metrics, how to rebuild, sha256) into zoo/weights."""
    from safetensors.numpy import save

    from zoo.saving import flat_state

    weights_path, meta_path = _weights_paths(model.variant, tag, weights_dir)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    data = save({k: np.ascontiguousarray(v) for k, v in flat_state(model).items()})
    meta = {
        "format": WEIGHTS_FORMAT, "model": model.variant, "tag": tag, "weights_file": weights_path.name,
        "sha256": hashlib.sha256(data).hexdigest(), "num_classes": model.num_classes,
        "class_names": list(sd.CLASS_NAMES), "background": sd.BACKGROUND, "void": sd.VOID,
        "input": "grayscale floats in [0, 1] = uint8 / 255, white digits on black",
        "normalization": {"mean": model.mean, "std": model.std}, "output_strides": model.output_strides,
        "backbone": {"model": CLASSIFIER, "kwargs": extra.get("classifier_kwargs", {})},
        "dataset": {"name": sd.NAME, "version": sd.DATASET_VERSION}, **metrics,
        **{k: v for k, v in extra.items() if k != "classifier_kwargs"},
    }
    tmp = weights_path.with_name(f".{weights_path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, weights_path)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return weights_path, meta_path


def shipped_metadata(variant: str = "fcn8s", tag: str = DEFAULT_TAG, weights_dir=None) -> dict:
    weights_path, meta_path = _weights_paths(variant, tag, weights_dir)
    if not meta_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"no shipped segmentation weights {meta_path.name} in {meta_path.parent}; "
                                f"train them with `zoo segment-train` or reinstall fcnzoo")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{meta_path} is not fcnzoo segmentation metadata (format={meta.get('format')!r})")
    return meta


def load_shipped(variant: str = "fcn8s", tag: str = DEFAULT_TAG, *, weights_dir=None) -> sm.SegmentationFCN:
    """The shipped FCN-32s/16s/8s, offline, sha256 checked, in eval mode."""
    import zoo
    from zoo.saving import load_flat_into, read_weights, sha256_file

    if variant not in sm.VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(sm.VARIANTS)}")
    meta = shipped_metadata(variant, tag, weights_dir)
    weights_path, meta_path = _weights_paths(variant, tag, weights_dir)
    digest = sha256_file(weights_path)
    if digest != meta["sha256"]:
        raise ValueError(f"{weights_path} has sha256 {digest}, but {meta_path.name} records {meta['sha256']}: "
                         f"the file is damaged or was replaced; reinstall fcnzoo")
    from convert.fcn import to_fcn

    kwargs = dict(meta["backbone"]["kwargs"])
    if isinstance(kwargs.get("input_size"), list):
        kwargs["input_size"] = tuple(kwargs["input_size"])
    classifier = zoo.create_model(meta["backbone"]["model"], **kwargs)
    classifier.eval()
    model = sm.grow_from_classifier(to_fcn(classifier), variant, mean=meta["normalization"]["mean"],
                                    std=meta["normalization"]["std"], num_classes=meta["num_classes"])
    load_flat_into(model, read_weights(weights_path), source=str(weights_path))
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# The whole experiment: baseline + three stages, table, weights


def train_all(*, classifier_tag: str = CLASSIFIER_TAG, classifier_dir=None, data_dir=None,
              config: SegmentTrainConfig | None = None, test_scenes: int | None = None,
              calibration_scenes: int = 30, check_scenes: int = 10, ship: bool = True, tag: str = DEFAULT_TAG,
              weights_dir=None, out_json: str | os.PathLike | None = None, log=None) -> dict:
    """Train FCN-32s -> 16s -> 8s from the converted classifier and evaluate all four on the test scenes.

    Returns the results table as data (also written to `out_json`), and ships the three nets'
    weights when `ship`. `check_scenes`: the first test scenes whose metrics are also recorded with
    the weights, for a quick re-evaluation in the tests.
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    config = (config or SegmentTrainConfig()).validate()
    sd.prepare_scenes(data_dir, quiet=True)
    fcn, (mean, std), source = classifier_fcn(classifier_tag, model_dir=classifier_dir)
    train_scenes = sd.load_scenes("train", data_dir)
    test = sd.load_scenes("test", data_dir, limit=test_scenes)
    log(f"{len(train_scenes)} training scenes, {len(test)} test scenes; classifier {source}")
    results = {"machine": machine_description(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "config": dataclasses.asdict(config), "classifier": source, "rows": []}

    baseline = SegmentPredictor(sm.ConvertedClassifierScores(fcn, mean=mean, std=std), ladder=EVAL_LADDER)
    threshold, _ = calibrate_threshold(baseline, train_scenes[:calibration_scenes])
    start = time.perf_counter()
    row = evaluate(lambda image: classifier_labels(baseline.predict(image / 255.0), threshold), test)
    row.update(model="converted classifier", threshold=threshold, train_seconds=0.0,
               eval_seconds=round(time.perf_counter() - start, 1))
    log(f"converted classifier (t={threshold}): mean IU {row['mean_iou']:.4f}, pixel acc {row['pixel_accuracy']:.4f}")
    results["rows"].append(row)

    classifier_kwargs = {}
    if classifier_dir is None:
        from zoo import pretrained

        classifier_kwargs = pretrained.metadata(CLASSIFIER, classifier_tag)["kwargs"]
    previous = None
    for variant in sm.VARIANTS:
        model = (sm.grow_from_classifier(fcn, variant, mean=mean, std=std) if previous is None
                 else sm.grow_from(previous, variant))
        history = train_variant(model, train_scenes, config, log=log)
        predictor = SegmentPredictor(model, ladder=EVAL_LADDER)
        start = time.perf_counter()
        row = evaluate(fcn_labeler(predictor), test)
        row.update(model=variant, train_seconds=round(history["seconds"], 1),
                   eval_seconds=round(time.perf_counter() - start, 1), output_strides=model.output_strides,
                   final_loss=round(float(np.mean(history["losses"][-25:])), 4))
        log(f"{variant}: mean IU {row['mean_iou']:.4f}, pixel acc {row['pixel_accuracy']:.4f} "
            f"(trained {history['seconds']:.0f} s)")
        results["rows"].append(row)
        if ship:
            check = evaluate(fcn_labeler(SegmentPredictor(model, ladder=CHECK_LADDER)), test[:check_scenes])
            export(model, tag, weights_dir=weights_dir,
                   metrics={"test_mean_iou": row["mean_iou"], "test_pixel_accuracy": row["pixel_accuracy"],
                            "test_scenes": row["scenes"],
                            "check": {"scenes": check_scenes, "ladder": list(CHECK_LADDER),
                                      "mean_iou": check["mean_iou"],
                                      "pixel_accuracy": check["pixel_accuracy"]}},
                   extra={"classifier_kwargs": classifier_kwargs, "classifier": source,
                          "train": {**dataclasses.asdict(config), "seconds": round(history["seconds"], 1),
                                    "initialized_from": "converted classifier" if previous is None
                                    else previous.variant},
                          "baseline_threshold": threshold})
        previous = model
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def machine_description() -> str:
    import platform

    devices = jax.devices()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
            f"jax {jax.__version__} on {devices[0].platform} ({len(devices)} device(s): {devices[0].device_kind})")
