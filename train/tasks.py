"""What the training loop learns: the task-specific pieces of `train.loop.train`.

A task is a choice the data set makes, not a second loop (big_vision's evaluators and losses): the
loop asks its task for the data arrays it keeps on the device, how a step gathers its batch from
them, the loss, the evaluation totals and the scores made of them, the network and how to save it.

- `Classification`: one label per image (MNIST, Fashion-MNIST). Batches are gathered by index and
  augmented on the device (`train.augment`); softmax cross-entropy, accuracy.
- `Segmentation`: one label per pixel, void (255) pixels ignored (Long, Shelhamer & Darrell 2015,
  "Fully Convolutional Networks for Semantic Segmentation", https://arxiv.org/abs/1411.4038).
  Every training image is padded into one (N, Hmax, Wmax, C) uint8 array (labels padded with void)
  beside its (h, w); a step gathers its batch by index and takes one random crop of
  `crop_size` x `crop_size` per example on the device. The network is FCN-32s/16s/8s grown from a
  classifier (`convert.grow_segmentation`); per-pixel cross-entropy over non-void pixels; pixel
  accuracy and mean IU (the paper's sec. 5) from a confusion matrix accumulated on the device
  over whole test images, each padded at the bottom and right with black to the split's largest
  size (as the predictors' shape buckets pad; the padding's labels are void). With accumulate > 1
  the loss is the mean of the micro-batches' means over their non-void pixels.

`make_task(config)` picks the task from `config.dataset`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import augment
from train.config import SEGMENTATION_VARIANTS, TrainConfig
from zoo.pretrained import preprocess

VOID = 255
# Whole test images are evaluated in batches of at most this many pixels (4 images of 512 x 512).
MAX_EVAL_PIXELS = 2**20


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# which task


def task_name(dataset: str, data_dir=None) -> str:
    """"classification" or "segmentation"; an unknown name raises a ValueError listing the data sets."""
    from train import data

    return data.get_source(dataset, data_dir).task


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


CLASSIFICATION_ONLY = ("augment_shift", "augment_rotate", "augment_scale", "augment_flip", "augment_erase",
                       "label_smoothing")
SEGMENTATION_ONLY = ("variant", "pretrained", "crop_size")


def check_config(config: TrainConfig) -> str:
    """Settings that depend on the task (after `config.validate()`); returns the task's name.

    Raises a ValueError naming the setting when a classification option is given for a
    segmentation data set or the other way round, when no variant is chosen for a segmentation
    data set, or when the starting weights do not fit.
    """
    import convert

    name = task_name(config.dataset, config.data_dir)
    defaults = _defaults()
    changed = lambda names: [n for n in names if getattr(config, n) != defaults[n]]  # noqa: E731
    if name == "classification":
        wrong = changed(SEGMENTATION_ONLY)
        if wrong:
            raise ValueError(f"{', '.join(wrong)} appl{'y' if len(wrong) > 1 else 'ies'} to segmentation data sets; "
                             f"{config.dataset!r} is a classification data set (one label per image)")
        if config.init_from is not None and convert.is_segmentation_dir(config.init_from):
            raise ValueError(f"init_from={config.init_from!r} holds a segmentation net; a classifier starts from a "
                             f"saved classifier (a classification run's model/)")
        return name
    wrong = changed(CLASSIFICATION_ONLY)
    if wrong:
        what = "are classification options" if len(wrong) > 1 else "is a classification option"
        raise ValueError(f"{', '.join(wrong)} {what} (augmentation of whole images, smoothing of image labels); "
                         f"{config.dataset!r} is a segmentation data set (one label per pixel): leave them at "
                         f"their defaults")
    if config.variant is None:
        raise ValueError(f"{config.dataset!r} is a segmentation data set: choose the network with variant= "
                         f"(--variant) {', '.join(SEGMENTATION_VARIANTS)}")
    if config.pretrained is not None and config.init_from is not None:
        raise ValueError("give pretrained (shipped classifier weights) or init_from (a saved model), not both")
    if config.pretrained is not None:
        from zoo import pretrained

        pretrained.metadata(config.model, config.pretrained)  # an unknown tag lists those that exist
    if config.init_from is not None and convert.is_segmentation_dir(config.init_from):
        from convert.segment import read_segmentation_config

        backbone = read_segmentation_config(config.init_from).get("backbone", {}).get("model")
        if backbone not in (None, config.model):
            raise ValueError(f"init_from={config.init_from!r} is a segmentation net on a {backbone!r} backbone, "
                             f"but model={config.model!r}")
    return name


def make_task(config: TrainConfig):
    """The `Classification` or `Segmentation` task of `config.dataset` (metadata only; no data read)."""
    if task_name(config.dataset, config.data_dir) == "segmentation":
        return Segmentation(config)
    return Classification(config)


def freezes_batchnorm(config: TrainConfig) -> bool:
    """config.freeze_batchnorm, or the task's default: True for segmentation, False for classification."""
    if config.freeze_batchnorm is not None:
        return bool(config.freeze_batchnorm)
    return task_name(config.dataset, config.data_dir) == "segmentation"


# ---------------------------------------------------------------------------------------------
# classification


class Classification:
    """One label per image.

    Arrays on the device: images (N, H, W, C) uint8, labels (N,) int.
    Totals of an evaluation: {"loss_sum", "correct", "count"}; scores {"loss", "accuracy"}.
    """

    name = "classification"
    metric = "accuracy"            # the selection metric (metrics.jsonl: test_accuracy, ...)
    metric_label = "accuracy"
    train_metric = "accuracy"      # the per-step metric of the training batches

    def __init__(self, config: TrainConfig):
        from train import data

        self.config = config
        self.source = data.get_source(config.dataset, config.data_dir)
        self.num_classes = self.source.num_classes
        self.image_shape = tuple(self.source.image_shape)
        self.preprocessing = data.preprocessing_record(config.dataset, config.data_dir)
        self.dtype = jnp.dtype(config.dtype)

    def load(self, split: str, limit: int | None) -> tuple[np.ndarray, ...]:
        """(images, labels) of a split; TFDS slices read only what is needed."""
        from train import data

        return data.load_arrays(self.config.dataset, f"{split}[:{limit}]" if limit else split, self.config.data_dir)

    def eval_batch_size(self, arrays) -> int:
        return min(self.config.eval_batch_size, max(len(arrays[0]), 1))

    def inputs(self, images):
        return preprocess(images, self.preprocessing).astype(self.dtype)

    def batch(self, arrays, idx, keys):
        """The step's batch: idx (B,) indices, keys (B,) PRNG keys -> (x (B, H, W, C), y (B,))."""
        images, labels = arrays
        x = images[idx]
        if augment.requested(self.config):  # in [0, 255], so the background stays exactly 0
            x = augment.from_config(keys, x.astype(jnp.float32), self.config)
        return self.inputs(x), labels[idx]

    def loss(self, logits, y):
        """(loss, accuracy) of logits (B, K) against labels (B,)."""
        targets = jax.nn.one_hot(y, self.num_classes)
        if self.config.label_smoothing:
            targets = optax.smooth_labels(targets, self.config.label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, (logits.argmax(-1) == y).mean()

    def zero_totals(self):
        return {"loss_sum": jnp.float32(0), "correct": jnp.int32(0), "count": jnp.int32(0)}

    def eval_totals(self, logits, labels, mask):
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum((logits.argmax(-1) == labels) & mask),
                "count": jnp.sum(mask, dtype=jnp.int32)}

    def scores(self, totals) -> dict[str, float]:
        count = max(int(totals["count"]), 1)
        return {"loss": float(totals["loss_sum"]) / count, "accuracy": int(totals["correct"]) / count}

    def build(self):
        return build_classifier(self.config, self.image_shape, self.num_classes)

    def describe(self) -> str:
        return self.config.model

    def save(self, model, directory: Path, test_metrics: dict, step: int, steps_per_epoch: int) -> Path:
        return save_classifier(model, directory, self.config, test_metrics["accuracy"], step, steps_per_epoch)


def build_classifier(config: TrainConfig, image_shape, num_classes: int, *, dtype=None):
    """The registry model for `config`, sized for the data set (kwargs from config.model_kwargs win),
    with the weights of config.init_from when given."""
    import zoo

    kwargs = dict(num_classes=num_classes, input_size=tuple(image_shape[:2]), in_channels=image_shape[2])
    kwargs.update(config.model_kwargs)
    if isinstance(kwargs.get("input_size"), list):
        kwargs["input_size"] = tuple(kwargs["input_size"])
    dtype = dtype if dtype is not None else jnp.dtype(config.dtype)
    # An int seed lets create_model run every initializer in one quick compile; its Rngs are
    # nnx.Rngs(params=seed, dropout=seed + 1), and the dropout streams they fork travel with the
    # train state (`train.loop`).
    model = zoo.create_model(config.model, dtype=dtype, rngs=config.seed, **kwargs)
    if config.init_from is not None:
        from zoo import saving

        weights_path = Path(config.init_from) / saving.WEIGHTS_FILE
        saving.load_flat_into(model, saving.read_weights(weights_path), source=str(weights_path))
    return model


def model_kwargs_for_saving(config: TrainConfig, image_shape, num_classes: int) -> dict[str, Any]:
    kwargs = dict(num_classes=num_classes, input_size=list(image_shape[:2]), in_channels=image_shape[2])
    kwargs.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model_kwargs.items()})
    return kwargs


def save_classifier(model, directory: Path, config: TrainConfig, test_accuracy: float, step: int,
                    steps_per_epoch: int) -> Path:
    """`zoo.saving.save_model` with the run's facts (data set, accuracy, preprocessing, config)."""
    from train import data
    from zoo.saving import save_model

    source = data.get_source(config.dataset)
    metadata = {
        "dataset": config.dataset,
        "test_accuracy": test_accuracy,
        "preprocessing": data.preprocessing_record(config.dataset),
        "input_shape": list(source.image_shape),
        "step": step,
        "epoch": step / steps_per_epoch,
        "ema": config.ema_decay is not None,
        "train_config": config.to_dict(),
    }
    return save_model(model, directory, model_name=config.model,
                      kwargs=model_kwargs_for_saving(config, source.image_shape, source.num_classes),
                      metadata=metadata)


# ---------------------------------------------------------------------------------------------
# segmentation


def pad_examples(examples, *, min_size: int = 0, void: int = VOID) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Examples of various sizes as three arrays: images (N, Hmax, Wmax, C) uint8 padded with zeros,
    labels (N, Hmax, Wmax) uint8 padded with `void`, sizes (N, 2) int32 (h, w); Hmax, Wmax >= min_size."""
    height = max([min_size, *(image.shape[0] for image, _ in examples)])
    width = max([min_size, *(image.shape[1] for image, _ in examples)])
    channels = examples[0][0].shape[2]
    images = np.zeros((len(examples), height, width, channels), np.uint8)
    labels = np.full((len(examples), height, width), void, np.uint8)
    sizes = np.zeros((len(examples), 2), np.int32)
    for i, (image, label) in enumerate(examples):
        h, w = label.shape
        if image.shape[:2] != (h, w):
            raise ValueError(f"example {i}: image {image.shape[:2]} and label {label.shape} differ in size")
        images[i, :h, :w] = image
        labels[i, :h, :w] = label
        sizes[i] = h, w
    return images, labels, sizes


def random_crops(images, labels, sizes, keys, crop: int):
    """One crop of crop x crop per example, on the device.

    images (B, Hmax, Wmax, C), labels (B, Hmax, Wmax), sizes (B, 2), keys (B,), with Hmax, Wmax >=
    crop (`pad_examples(min_size=crop)`). The crop's top-left corner is uniform in [0, max(h - crop,
    0)] x [0, max(w - crop, 0)]: an example smaller than the crop comes with its padding (zero
    pixels, void labels). Returns (B, crop, crop, C) and (B, crop, crop).
    """
    def one(image, label, size, key):
        top_key, left_key = jax.random.split(key)
        top = jax.random.randint(top_key, (), 0, jnp.maximum(size[0] - crop, 0) + 1)
        left = jax.random.randint(left_key, (), 0, jnp.maximum(size[1] - crop, 0) + 1)
        return (jax.lax.dynamic_slice(image, (top, left, 0), (crop, crop, image.shape[-1])),
                jax.lax.dynamic_slice(label, (top, left), (crop, crop)))

    return jax.vmap(one)(images, labels, sizes, keys)


def pixel_loss(logits, labels, void: int = VOID):
    """Mean softmax cross-entropy over non-void pixels. logits: (N, H, W, K); labels: (N, H, W)."""
    valid = labels != void
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    return jnp.sum(per_pixel * valid) / jnp.maximum(jnp.sum(valid), 1)


def confusion_matrix(labels, predictions, valid, num_classes: int):
    """(K, K) int32 counts on the device, rows = true class, columns = predicted; only `valid` pixels."""
    index = jnp.where(valid, labels.astype(jnp.int32) * num_classes + predictions.astype(jnp.int32), 0)
    return jnp.bincount(index.ravel(), weights=valid.ravel().astype(jnp.int32),
                        length=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int, void: int = VOID) -> np.ndarray:
    """`confusion_matrix` on the host, for one image of any size: numpy, nothing compiled per shape.

    labels, predictions: (H, W) ints -> (K, K) int64 counts, rows = true class; void pixels left out.
    """
    labels, predictions = np.asarray(labels).ravel(), np.asarray(predictions).ravel()
    keep = labels != void
    return np.bincount(labels[keep].astype(np.int64) * num_classes + predictions[keep].astype(np.int64),
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores_from_confusion(matrix) -> dict[str, Any]:
    """Pixel accuracy, mean IU over the classes present in labels or predictions, per-class IU (None: absent)."""
    matrix = np.asarray(matrix, np.float64)
    true_positive = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - true_positive
    present = union > 0
    iou = np.where(present, true_positive / np.maximum(union, 1), np.nan)
    return {"pixel_accuracy": float(true_positive.sum() / max(matrix.sum(), 1)),
            "mean_iou": float(np.nanmean(iou)) if present.any() else float("nan"),
            "class_iou": [None if np.isnan(v) else round(float(v), 4) for v in iou]}


class Segmentation:
    """One label per pixel, `void` ignored.

    Arrays on the device: images (N, Hmax, Wmax, C) uint8, labels (N, Hmax, Wmax) uint8 (void
    padding), sizes (N, 2). Totals of an evaluation: {"loss_sum", "pixels", "confusion" (K, K)};
    scores {"loss", "pixel_accuracy", "mean_iou", "class_iou"}.
    """

    name = "segmentation"
    metric = "mean_iou"
    metric_label = "mean IU"
    train_metric = "pixel_accuracy"

    def __init__(self, config: TrainConfig):
        from train import data, segmentation_data

        self.config = config
        self.info = segmentation_data.segmentation_info(config.dataset, config.data_dir)
        self.num_classes = int(self.info["num_classes"])
        self.void = int(self.info["void"])
        self.preprocessing = data.preprocessing_record(config.dataset, config.data_dir)  # [0, 1] inputs
        self.image_shape = (config.crop_size, config.crop_size, int(self.info["channels"]))
        self.dtype = jnp.dtype(config.dtype)

    def load(self, split: str, limit: int | None) -> tuple[np.ndarray, ...]:
        """(images, labels, sizes) of "train" or "test" (a data set without a test split, such as a
        folder prepared with its own train and val lists, is evaluated on "val")."""
        from train import segmentation_data

        if split == "test" and "test" not in self.info["splits"] and "val" in self.info["splits"]:
            _say(f"{self.config.dataset} has no test split: evaluating on its val split (the test_* metrics)")
            split = "val"
        examples = segmentation_data.load_segmentation(self.config.dataset, split, self.config.data_dir, limit=limit)
        if not examples:
            raise ValueError(f"the {split} split of {self.config.dataset!r} is empty")
        # Training images are padded to at least one crop, so every crop lies inside the array.
        return pad_examples(examples, min_size=self.config.crop_size if split == "train" else 0, void=self.void)

    def eval_batch_size(self, arrays) -> int:
        height, width = arrays[0].shape[1:3]
        cap = max(1, MAX_EVAL_PIXELS // (height * width))
        return min(self.config.eval_batch_size, cap, max(len(arrays[0]), 1))

    def inputs(self, images):
        return preprocess(images, self.preprocessing).astype(self.dtype)

    def batch(self, arrays, idx, keys):
        """idx (B,), keys (B,) -> random crops: x (B, crop, crop, C) floats, y (B, crop, crop) uint8."""
        images, labels, sizes = arrays
        x, y = random_crops(images[idx], labels[idx], sizes[idx], keys, self.config.crop_size)
        return self.inputs(x), y

    def loss(self, logits, y):
        """(mean cross-entropy over non-void pixels, pixel accuracy over them)."""
        valid = y != self.void
        correct = jnp.sum((logits.argmax(-1) == y) & valid)
        return pixel_loss(logits, y, self.void), correct / jnp.maximum(jnp.sum(valid), 1)

    def zero_totals(self):
        return {"loss_sum": jnp.float32(0), "pixels": jnp.int32(0),
                "confusion": jnp.zeros((self.num_classes, self.num_classes), jnp.int32)}

    def eval_totals(self, logits, labels, mask):
        valid = (labels != self.void) & mask[:, None, None]
        safe = jnp.where(valid, labels, 0).astype(jnp.int32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
        return {"loss_sum": jnp.sum(loss * valid), "pixels": jnp.sum(valid, dtype=jnp.int32),
                "confusion": confusion_matrix(labels, logits.argmax(-1), valid, self.num_classes)}

    def scores(self, totals) -> dict[str, Any]:
        return {"loss": float(totals["loss_sum"]) / max(int(totals["pixels"]), 1),
                **scores_from_confusion(totals["confusion"])}

    def describe(self) -> str:
        return f"{self.config.variant} ({self.config.model})"

    def build(self):
        """The segmentation net: from a saved one (init_from), else grown from a classifier."""
        import convert

        config = self.config
        if config.init_from is not None and convert.is_segmentation_dir(config.init_from):
            net = convert.load_segmentation(config.init_from, dtype=self.dtype)
            if net.variant != config.variant:  # the paper's stages: FCN-16s from a trained FCN-32s, ...
                net = convert.grow_from(net, config.variant)
            return net
        classifier, kwargs, record = self._classifier()
        classifier.eval()
        return convert.grow_segmentation(convert.to_fcn(classifier), config.variant, num_classes=self.num_classes,
                                         preprocessing=record, backbone={"model": config.model, "kwargs": kwargs})

    def _classifier(self):
        """(classifier, its create_model kwargs, its preprocessing record) the backbone comes from."""
        import zoo
        from zoo import saving

        config = self.config
        if config.init_from is not None:
            saved = saving.read_config(config.init_from)
            return (saving.load_model(config.init_from, dtype=self.dtype), dict(saved["kwargs"]),
                    saved["metadata"].get("preprocessing"))
        if config.pretrained is not None:
            from zoo import pretrained

            meta = pretrained.metadata(config.model, config.pretrained)
            kwargs = {**meta["kwargs"], **config.model_kwargs}
            return (zoo.create_model(config.model, pretrained=config.pretrained, dtype=self.dtype,
                                     **config.model_kwargs), kwargs, meta["preprocessing"])
        _say(f"warning: neither pretrained nor init_from: the {config.model} backbone starts from random weights; "
             f"the paper's FCNs start from ImageNet classifiers, expect a far lower mean IU")
        kwargs = {"num_classes": self.num_classes, "in_channels": self.image_shape[2], **config.model_kwargs}
        model = zoo.create_model(config.model, dtype=self.dtype, rngs=config.seed, **kwargs)
        return model, {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}, self.preprocessing

    def save(self, model, directory: Path, test_metrics: dict, step: int, steps_per_epoch: int) -> Path:
        import convert

        metadata = {
            "dataset": self.config.dataset,
            "class_names": list(self.info.get("class_names", [])),
            "void": self.void,
            "variant": self.config.variant,
            "test_mean_iou": test_metrics["mean_iou"],
            "test_pixel_accuracy": test_metrics["pixel_accuracy"],
            "test_class_iou": test_metrics["class_iou"],
            "preprocessing": self.preprocessing,
            "step": step,
            "epoch": step / steps_per_epoch,
            "ema": self.config.ema_decay is not None,
            "train_config": self.config.to_dict(),
        }
        return convert.save_segmentation(model, directory, metadata=metadata)


def eval_arrays(arrays: tuple[np.ndarray, ...], batch: int):
    """(images, labels, ...) of n examples -> (images (M, B, ...), labels (M, B, ...), mask (M, B)),
    padded with zeros to M = ceil(n / B) batches; mask marks the real examples."""
    images, labels = arrays[0], arrays[1]
    n = len(images)
    m = max(1, math.ceil(n / batch))
    pad = m * batch - n
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros((pad, *labels.shape[1:]), labels.dtype)])
    mask = np.arange(m * batch) < n
    return (images.reshape(m, batch, *images.shape[1:]), labels.reshape(m, batch, *labels.shape[1:]),
            mask.reshape(m, batch))
