"""`TrainConfig`: everything one training run depends on, as a plain dataclass.

    from train.config import TrainConfig
    config = TrainConfig(model="lenet5", dataset="mnist", epochs=10, batch_size=128,
                         learning_rate=3e-3, schedule="onecycle", augment_shift=2.0)
    config.validate()        # a ValueError that says what to fix, before anything is compiled

The run is a pure function of the config: the data order is a numpy permutation per epoch from
the seed, augmentation (or crop) keys fold the step into the seed, and dropout draws from the
model's own RNG streams, which the checkpoints carry; a resumed run repeats an uninterrupted one.

The data set chooses the task (`train.tasks`): classification (MNIST, Fashion-MNIST) or
segmentation (digit_scenes: FCN-32s/16s/8s grown from a classifier, `variant=` required):

    TrainConfig(model="mnistnet", dataset="digit_scenes", variant="fcn32s", pretrained="mnist",
                batch_size=8, crop_size=96, schedule="cosine", warmup_epochs=0.05)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")
DTYPES = ("float32", "bfloat16")
SEGMENTATION_VARIANTS = ("fcn32s", "fcn16s", "fcn8s")


@dataclasses.dataclass
class TrainConfig:
    """One training run.

    Model and data:
        model: a registry name (`zoo list`); model_kwargs: extra `zoo.create_model` options
            (e.g. {"activation": "relu", "input_padding": 2} for LeNet-5).
        dataset: a name from `train.data.list_datasets()`; data_dir: TFDS data dir (None: default).
        train_examples / test_examples: use only the first N examples of a split (None: all).
        validation_examples: hold out the last N training examples as the validation set that
            picks the best checkpoint; 0 validates on the test split (then the "best" test
            accuracy is chosen on the test set: report the final one, or hold out data).
        init_from: None (random initialization from the seed), or a saved model directory (a
            run's model/, `zoo.saving.save_model`) of the same model whose weights training
            starts from: fine-tuning, or a second stage of a recipe. For segmentation data sets
            also a saved segmentation net (`convert.save_segmentation`): FCN-16s from a trained
            FCN-32s; a saved classifier there is the backbone the net grows from.
    Segmentation data sets only (see `train.tasks`):
        variant: "fcn32s", "fcn16s" or "fcn8s" (required); model is then the backbone classifier.
        pretrained: a shipped tag of the backbone (`zoo.create_model(model, pretrained=tag)`, e.g.
            "mnist" for mnistnet); without it and without init_from the backbone is random.
        crop_size: training crops of crop_size x crop_size pixels, one per example and step.
        freeze_batchnorm: BatchNorm layers keep their (classifier's) statistics in training too
            (dropout stays active); None: True for segmentation, False for classification.
    Optimization:
        epochs, batch_size (examples per optimizer update, all devices together),
        accumulate: micro-batches per update (each of batch_size // accumulate examples): the
            memory of a small batch, the update of the big one.
        optimizer: "adamw" or "sgd" (Nesterov momentum); momentum; weight_decay (decoupled;
            kernels only, not biases or normalization scales).
        learning_rate: peak; schedule: "constant", "cosine" (linear warmup, cosine decay to 0)
            or "onecycle"; warmup_epochs: length of the warmup (cosine) or of the rising phase
            (onecycle).
        label_smoothing: in [0, 1); ema_decay: None, or e.g. 0.999 to evaluate and ship an
            exponential moving average of the weights.
        grad_clip_norm: None or a global-norm clip.
    Augmentation (on the device, per example, a pure function of (seed, step, example)):
        augment_shift: max shift in pixels; augment_rotate: max rotation in degrees;
        augment_scale: max relative zoom (0.1 = 0.9x..1.1x); augment_flip: mirror left-right
            with probability 1/2 (Fashion-MNIST; never for digits); augment_erase: probability of
            random erasing (one rectangle of noise per image; `train.augment.random_erase`).
    Out-of-memory playbook:
        dtype: "float32" or "bfloat16" (computation in bf16, parameters and optimizer in fp32);
        remat: recompute the activations of each backbone block in the backward pass;
        data_parallel: split each batch over all devices (all processes with jax.distributed).
    Bookkeeping:
        seed; out_dir: where metrics.jsonl, curves.png, checkpoints/ and the best model go
            (None: nothing is written); checkpoint_every: also save every N steps (0: at the end
            of each epoch only); keep_checkpoints: latest checkpoints kept for resuming;
        resume: continue from the latest good checkpoint in out_dir;
        max_steps: stop after this many updates (tests, smoke runs); steps_per_call: updates run
            inside one jitted call (fewer Python round trips on fast devices);
        eval_batch_size; progress: show a tqdm bar; fast_compile: compile the steps without XLA's
            backend optimizations (compiles about 2x faster, runs about 2.5x slower on CPU: tests).
    """

    model: str
    dataset: str = "mnist"
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_dir: str | None = None
    train_examples: int | None = None
    test_examples: int | None = None
    validation_examples: int = 0
    init_from: str | None = None
    variant: str | None = None
    pretrained: str | None = None
    crop_size: int = 96
    freeze_batchnorm: bool | None = None

    epochs: int = 10
    batch_size: int = 128
    accumulate: int = 1
    optimizer: str = "adamw"
    momentum: float = 0.9
    learning_rate: float = 1e-3
    schedule: str = "onecycle"
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    ema_decay: float | None = None
    grad_clip_norm: float | None = None

    augment_shift: float = 0.0
    augment_rotate: float = 0.0
    augment_scale: float = 0.0
    augment_flip: bool = False
    augment_erase: float = 0.0

    dtype: str = "float32"
    remat: bool = False
    data_parallel: bool = False

    seed: int = 0
    out_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    max_steps: int | None = None
    steps_per_call: int = 1
    eval_batch_size: int = 1000
    progress: bool = True
    fast_compile: bool = False

    @property
    def micro_batch_size(self) -> int:
        """Examples per forward/backward pass (all devices together)."""
        return self.batch_size // self.accumulate

    def validate(self) -> TrainConfig:
        """Raise a ValueError naming the setting to fix; checks only what needs no data or model."""
        def positive_int(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("epochs", "batch_size", "accumulate", "keep_checkpoints", "steps_per_call",
                     "eval_batch_size", "crop_size"):
            positive_int(name)
        for name in ("train_examples", "test_examples", "max_steps"):
            if getattr(self, name) is not None:
                positive_int(name)
        if self.batch_size % self.accumulate:
            raise ValueError(
                f"accumulate={self.accumulate} must divide batch_size={self.batch_size}: each update "
                f"averages {self.accumulate} micro-batches of equal size. Try batch_size="
                f"{max(1, self.batch_size // self.accumulate) * self.accumulate}.")
        if not isinstance(self.validation_examples, int) or self.validation_examples < 0:
            raise ValueError(f"validation_examples must be an integer >= 0, got {self.validation_examples!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0: at epoch ends), got {self.checkpoint_every}")
        if not self.learning_rate > 0:  # also rejects NaN
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        for name, low, high in (("momentum", 0.0, 1.0), ("label_smoothing", 0.0, 1.0)):
            value = getattr(self, name)
            if not low <= value < high:
                raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        for name in ("weight_decay", "warmup_epochs", "augment_shift", "augment_rotate", "augment_scale"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.augment_erase <= 1.0:
            raise ValueError(f"augment_erase is a probability in [0, 1], got {self.augment_erase}")
        if self.augment_scale >= 1:
            raise ValueError(f"augment_scale must be < 1 (a relative zoom), got {self.augment_scale}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm must be positive or None, got {self.grad_clip_norm}")
        if self.variant is not None and self.variant not in SEGMENTATION_VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; use one of {', '.join(SEGMENTATION_VARIANTS)}")
        if self.pretrained is not None and not (isinstance(self.pretrained, str) and self.pretrained):
            raise ValueError(f"pretrained must be the tag of shipped weights (e.g. 'mnist'), got {self.pretrained!r}")
        if self.freeze_batchnorm not in (None, True, False):
            raise ValueError(f"freeze_batchnorm must be True, False or None (the task's default), "
                             f"got {self.freeze_batchnorm!r}")
        if self.init_from is not None:
            from zoo.saving import CONFIG_FILE, read_config

            if (Path(self.init_from) / CONFIG_FILE).is_file():
                saved = read_config(self.init_from)["model"]
                if saved != self.model:
                    raise ValueError(f"init_from={self.init_from!r} holds a {saved!r} model, but model={self.model!r}")
            elif not _is_segmentation_dir(self.init_from):
                raise ValueError(f"init_from={self.init_from!r} is not a saved model directory (no {CONFIG_FILE}); "
                                 "give a run's model/ directory, e.g. runs/<name>/model")
        if self.resume and not self.out_dir:
            raise ValueError("resume=True needs out_dir: the checkpoints live in <out_dir>/checkpoints")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    # Settings that may change when a run is resumed; anything else must match the checkpoint.
    RESUMABLE_CHANGES = ("out_dir", "resume", "progress", "max_steps", "steps_per_call", "fast_compile",
                         "data_dir", "eval_batch_size", "checkpoint_every", "keep_checkpoints")


def _is_segmentation_dir(directory) -> bool:
    import convert

    return convert.is_segmentation_dir(directory)
