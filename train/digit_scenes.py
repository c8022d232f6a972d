"""`digit_scenes`: canvases of any size holding real MNIST digits, with a label for every pixel.

The segmentation data set the shipped FCNs (`convert.segment`) learn from and are measured on, in the
spirit of PASCAL VOC's segmentation task used by Long, Shelhamer & Darrell 2015, "Fully
Convolutional Networks for Semantic Segmentation", https://arxiv.org/abs/1411.4038.

A scene is a black canvas of H x W pixels (each side drawn from `SIZE_RANGE`, so scenes are rarely
square) with several MNIST digits pasted at random positions and scales; the digits' boxes never
overlap. Training scenes use digits of MNIST's training split only, test scenes digits of its test
split only (`train.data.load_arrays("mnist", split)`).

Labels, one per pixel (uint8):
    0..9   the digit's class, where the pasted digit's intensity is >= INK_THRESHOLD (128 of 255)
    10     background (BACKGROUND): intensity exactly 0, inside a digit's box or not
    255    void (VOID): the faint anti-aliased rim of a digit, 0 < intensity < 128; like VOC's
           boundary band it is ignored by the loss and by the metrics.

Scene `index` of a split is a pure function of (seed, split, index) (`generate_scene`), so any
scene can be regenerated without the data set, and the data set itself is deterministic.

The TFDS builder (`prepare_scenes`) stores each scene as two PNGs (image and label) plus the placed
digits' MNIST indices, classes and boxes, in TFDS's array_record layout under
`<data_dir>/digit_scenes/<DATASET_VERSION>/`, built offline from the prepared MNIST in well under a minute.
It is one of the segmentation data sets of `train.segmentation_data`:
`load_segmentation("digit_scenes", "train")` builds it on first use and gives (H, W, 1) images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import sys
from pathlib import Path

import numpy as np

NAME = "digit_scenes"
DATASET_VERSION = "1.0.0"
NUM_CLASSES = 11          # ten digits + background
BACKGROUND = 10
VOID = 255
CLASS_NAMES = tuple(str(d) for d in range(10)) + ("background",)
INK_THRESHOLD = 128       # a pixel belongs to its digit from this intensity (uint8) on
SIZE_RANGE = (64, 512)    # canvas height and width, each drawn uniformly in this range (inclusive)
SCALE_RANGE = (0.75, 2.0)  # a digit's 28x28 box is resized to round(28 * scale) pixels
MAX_DIGITS = 60
PIXELS_PER_DIGIT = 4000   # a scene tries area / (2 * PIXELS_PER_DIGIT) .. area / PIXELS_PER_DIGIT digits
SPLIT_IDS = {"train": 0, "test": 1}
DEFAULT_SEED = 20151114   # FCN's arXiv v1 date; any fixed number would do
DEFAULT_SIZES = {"train": 1200, "test": 200}


@dataclasses.dataclass(frozen=True)
class Scene:
    """One generated scene.

    image: (H, W) uint8, white digits on black.
    label: (H, W) uint8, 0..9 digit, BACKGROUND, or VOID (see the module docstring).
    digits: one dict per pasted digit: "mnist_index" (into the split's MNIST arrays), "label",
        "box" = [top, left, height, width] in pixels.
    """

    image: np.ndarray
    label: np.ndarray
    digits: list[dict]


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of scene `index` of `split`: independent of every other scene."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLIT_IDS)}")
    return np.random.default_rng([int(seed), SPLIT_IDS[split], int(index)])


def resize_digit(digit: np.ndarray, size: int) -> np.ndarray:
    """(28, 28) uint8 -> (size, size) uint8, bilinear (Pillow), deterministic."""
    from PIL import Image

    if size == digit.shape[0]:
        return np.asarray(digit, np.uint8).copy()
    return np.asarray(Image.fromarray(np.asarray(digit, np.uint8)).resize((size, size), Image.BILINEAR))


def render_scene(height: int, width: int, digits: np.ndarray, classes: np.ndarray, rng: np.random.Generator,
                 *, num_digits: int | None = None, scale_range=SCALE_RANGE) -> Scene:
    """Paste digits drawn with `rng` from `digits` onto a black (height, width) canvas.

    Args:
        digits: (N, 28, 28) or (N, 28, 28, 1) uint8 MNIST images to draw from.
        classes: (N,) their labels.
        num_digits: how many to try to place (default: drawn from about area/(2*PIXELS_PER_DIGIT) to
            area/PIXELS_PER_DIGIT, at least 1, at most MAX_DIGITS). Boxes never overlap; a digit that finds no free place after 50 tries is skipped.
        scale_range: (low, high) of the uniform scale of the 28x28 box.
    """
    digits = np.asarray(digits)
    if digits.ndim == 4:
        digits = digits[..., 0]
    image = np.zeros((height, width), np.uint8)
    label = np.full((height, width), BACKGROUND, np.uint8)
    if num_digits is None:
        most = int(np.clip(height * width // PIXELS_PER_DIGIT, 1, MAX_DIGITS))
        num_digits = int(rng.integers((most + 1) // 2, most + 1))
    occupied = np.zeros((height, width), bool)
    placed = []
    for _ in range(num_digits):
        index = int(rng.integers(len(digits)))
        size = int(round(28 * rng.uniform(*scale_range)))
        size = min(size, min(height, width))
        for _try in range(50):
            top = int(rng.integers(0, height - size + 1))
            left = int(rng.integers(0, width - size + 1))
            if not occupied[top:top + size, left:left + size].any():
                break
        else:
            continue
        occupied[top:top + size, left:left + size] = True
        patch = resize_digit(digits[index], size)
        image[top:top + size, left:left + size] = patch
        cls = int(classes[index])
        box_label = np.where(patch >= INK_THRESHOLD, cls, np.where(patch > 0, VOID, BACKGROUND))
        label[top:top + size, left:left + size] = box_label
        placed.append({"mnist_index": index, "label": cls, "box": [top, left, size, size]})
    return Scene(image, label, placed)


@functools.lru_cache(maxsize=2)
def mnist_digits(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) of MNIST's `split`, prepared offline by `train.data`."""
    from train import data

    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLIT_IDS)}")
    if not data.is_prepared("mnist", data_dir):
        data.prepare("mnist", data_dir, quiet=True)
    images, labels = data.load_arrays("mnist", split, data_dir)
    return images[..., 0], labels


def generate_scene(split: str, index: int, *, seed: int = DEFAULT_SEED, size: tuple[int, int] | None = None,
                   data_dir: str | None = None, scale_range=SCALE_RANGE) -> Scene:
    """Scene `index` of `split` (the one the data set stores), or, with `size`=(H, W), a scene of that size.

    Digits come from MNIST's `split` only. The canvas size is drawn from SIZE_RANGE unless given;
    `scale_range` (1, 1) pastes the digits unscaled (for checks against the MNIST arrays).
    """
    rng = scene_rng(seed, split, index)
    height, width = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=2))
    if size is not None:
        height, width = check_scene_size(size)
    images, labels = mnist_digits(split, data_dir)
    return render_scene(height, width, images, labels, rng, scale_range=scale_range)


def check_scene_size(size) -> tuple[int, int]:
    """(H, W) of a requested scene, or a ValueError saying what is allowed."""
    height, width = (int(v) for v in size)
    if min(height, width) < 28 or max(height, width) > 4096:
        raise ValueError(f"a generated scene must be between 28 and 4096 pixels per side (one digit fits "
                         f"in 28x28); got {height}x{width} (HxW)")
    return height, width


def parse_size(text: str) -> tuple[int, int]:
    """'777x333' (width x height, as image sizes are usually written) -> (H, W) = (333, 777)."""
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"a scene size is WIDTHxHEIGHT in pixels, e.g. 777x333; got {text!r}")
    width, height = int(parts[0]), int(parts[1])
    return check_scene_size((height, width))


# ---------------------------------------------------------------------------------------------
# The TFDS data set


def default_data_dir() -> Path:
    from train import data

    return data.default_data_dir()


def scenes_dir(data_dir=None) -> Path:
    """<data_dir>/digit_scenes/<DATASET_VERSION>, where the built data set lives."""
    from train import data

    return data._resolve(data_dir) / NAME / DATASET_VERSION


@functools.cache
def builder_class():
    """The TFDS builder of `digit_scenes` (GeneratorBasedBuilder, array_record on disk)."""
    import tensorflow_datasets as tfds

    class DigitScenes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Real MNIST digits pasted on canvases of varied size, with per-pixel labels."""

        VERSION = tfds.core.Version(DATASET_VERSION)
        # Nothing is downloaded: no checksums file to look up next to this module (which, under an
        # editable install, importlib.resources cannot always open).
        url_infos = {}
        RELEASE_NOTES = {DATASET_VERSION: "Initial release: 11 classes (10 digits + background), void rim."}

        def __init__(self, *, sizes: dict[str, int] | None = None, seed: int = DEFAULT_SEED,
                     mnist_data_dir: str | None = None, **kwargs):
            self._sizes = dict(sizes or DEFAULT_SIZES)
            self._seed = int(seed)
            self._mnist_data_dir = mnist_data_dir
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=__doc__,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "digits": tfds.features.Sequence({
                        "mnist_index": np.int32, "label": np.int32,
                        "box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
                    }),
                }),
                homepage="https://arxiv.org/abs/1411.4038",
                # Record i of a split is scene i: anyone can regenerate a stored scene from its index.
                disable_shuffling=True,
                metadata=tfds.core.MetadataDict(seed=self._seed, sizes=self._sizes, background=BACKGROUND,
                                                void=VOID, ink_threshold=INK_THRESHOLD,
                                                size_range=list(SIZE_RANGE), scale_range=list(SCALE_RANGE)),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in self._sizes}

        def _generate_examples(self, split):
            for index in range(self._sizes[split]):
                scene = generate_scene(split, index, seed=self._seed, data_dir=self._mnist_data_dir)
                yield index, {
                    "image": _png(scene.image), "label": _png(scene.label),
                    "digits": {"mnist_index": [d["mnist_index"] for d in scene.digits],
                               "label": [d["label"] for d in scene.digits],
                               "box": [d["box"] for d in scene.digits] or np.zeros((0, 4), np.int32)},
                }

    DigitScenes.name = NAME
    return DigitScenes


def _png(array: np.ndarray) -> bytes:
    from train import data

    return data.encode_png(array, filter_up=True, level=3)


def is_prepared(data_dir=None) -> bool:
    directory = scenes_dir(data_dir)
    return (directory / "dataset_info.json").is_file() and all(
        any(directory.glob(f"{NAME}-{split}.array_record-*")) for split in SPLIT_IDS)


def _built_with(directory: Path) -> tuple[int | None, dict[str, int]]:
    """(seed, scenes per split) recorded in a built data set."""
    from train import segmentation_data

    counts = segmentation_data.split_counts(directory)
    seed = None
    metadata_file = directory / "metadata.json"
    if metadata_file.is_file():
        seed = json.loads(metadata_file.read_text()).get("seed")
    return seed, counts


def prepare_scenes(data_dir=None, *, seed: int = DEFAULT_SEED, sizes: dict[str, int] | None = None,
                   mnist_data_dir=None, quiet: bool = False) -> Path:
    """Build `digit_scenes` offline from the prepared MNIST (a quick no-op when already built).

    Args:
        data_dir: TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
        mnist_data_dir: where MNIST is prepared (default: data_dir when MNIST is there, else the
            default TFDS data dir; prepared there when missing).
        seed: scene seed; sizes: scenes per split (default DEFAULT_SIZES).
    Returns:
        the directory of the built data set.
    Raises:
        ValueError when a data set built with another seed or size is already there.
    """
    target = scenes_dir(data_dir)
    sizes = dict(sizes or DEFAULT_SIZES)
    if is_prepared(data_dir):
        built_seed, counts = _built_with(target)
        if built_seed == seed and counts == sizes:
            return target
        raise ValueError(f"{target} was built with seed {built_seed} and {counts} scenes, not seed {seed} and "
                         f"{sizes}; delete that directory to rebuild")
    import tensorflow_datasets as tfds

    if quiet:
        from absl import logging as absl_logging

        tfds.disable_progress_bar()
        absl_logging.set_verbosity(absl_logging.ERROR)
    else:
        print(f"{NAME}: building {sizes} scenes from MNIST into {target}", file=sys.stderr, flush=True)
    from train import data

    mnist_dir = mnist_data_dir
    if mnist_dir is None and data_dir is not None and data.is_prepared("mnist", data_dir):
        mnist_dir = str(Path(data_dir).expanduser().resolve())
    mnist_digits("train", mnist_dir)  # prepares MNIST when needed, before TFDS starts
    builder = builder_class()(data_dir=str(target.parent.parent), sizes=sizes, seed=seed, mnist_data_dir=mnist_dir)
    # TFDS prints its own banner; quiet means nothing at all (errors still raise), as in train.data.prepare.
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False), file_format="array_record")
    if not is_prepared(data_dir):
        raise RuntimeError(f"TFDS finished but {target} does not hold both splits; see the log above")
    return target


def load_scenes(split: str, data_dir=None, *, limit: int | None = None):
    """Decoded scenes of a built split: a list of (image (H, W) uint8, label (H, W) uint8).

    Raises FileNotFoundError (saying how to build it) when the data set is not there.
    `train.segmentation_data.load_segmentation("digit_scenes", split)` gives the same scenes with
    (H, W, 1) images and builds the data set when it is missing.
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLIT_IDS)}")
    if not is_prepared(data_dir):
        raise FileNotFoundError(f"{NAME} is not built in {scenes_dir(data_dir)}; run "
                                f"`zoo data prepare {NAME}` (about 30 s, offline)")
    from train import segmentation_data

    return [(image[..., 0], label) for image, label in segmentation_data.read_split(scenes_dir(data_dir), split, limit)]
