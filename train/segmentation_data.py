"""Segmentation data sets in TFDS's layout: folders of your own (PASCAL VOC or image/mask pairs) and digit_scenes.

The data of semantic segmentation as in Long, Shelhamer & Darrell 2015, "Fully Convolutional Networks
for Semantic Segmentation", https://arxiv.org/abs/1411.4038, trained and measured on PASCAL VOC
(Everingham et al. 2010, http://host.robots.ox.ac.uk/pascal/VOC/): an image and a class id for each of
its pixels, 255 (void) where the label is unknown.

`prepare_segmentation(DIR, NAME)` (`zoo data prepare-segmentation DIR --name NAME`) turns a folder into
a TFDS data set, offline; `load_segmentation(NAME, split)` and `segmentation_info(NAME)` read it, and
serve `digit_scenes` (`train.digit_scenes`, built on first use) the same way. The layout is detected:

PASCAL VOC (DIR holds JPEGImages/), as in VOC2012's VOCdevkit/VOC2012:
    JPEGImages/ID.jpg                  the images (.jpeg and .png also accepted)
    SegmentationClass/ID.png           palette ("P") PNGs: palette index = class id
    ImageSets/Segmentation/train.txt   one ID per line; val.txt and test.txt too when present
    classes.txt                        optional, one name per line (default: VOC's 21, VOC_CLASS_NAMES)
  Images without a mask (VOC's detection-only ones) are left out; a mask without its image is an error.

Image/mask pairs (DIR holds images/ and masks/):
    images/NAME.png|.jpg|.jpeg         the images
    masks/NAME.png                     single-channel PNGs ("L" or "P"): pixel value = class id
    classes.txt                        one class name per line: line i names class i (from 0)
    splits/train.txt, val.txt, test.txt   optional, one NAME per line
  Without splits/, the names are sorted (Python string order) and every tenth of them, at positions
  9, 19, 29, ..., makes the "val" split, the rest "train" (with fewer than 10 pairs, the last name is
  val): deterministic, and spread over the whole folder. Every image needs its mask and every mask
  its image, listed in a split or not.

In both, 255 is void (VOC's boundary band, ignored by losses and metrics); any other value must be a
class id, below the number of class names. A class named "background" (or labelme's "_background_")
is recorded as the background.

Images are stored as they are, as PNG, with one channel (grayscale) or three (RGB): "L" as it is,
1-bit as 0/255, 16-bit grayscale scaled to 8 bits (v * 255 / 65535, rounded), "LA" without its
alpha; "RGB" as it is, "RGBA" and palette images converted to RGB (alpha dropped), CMYK and YCbCr
JPEGs to RGB. A data set that mixes grayscale and colour images stores all of them as RGB (the gray
ones with three equal channels). EXIF orientation is not applied: the pixels are those stored in
the file, as annotation tools draw the masks on them.

On disk, TFDS's stock layout (`tfds.builder_from_directory(dir)` and `tfds.data_source` read it,
TensorFlow-free), beside MNIST and digit_scenes:

    <data_dir>/<NAME>/1.0.0/
        dataset_info.json  features.json  metadata.json  (task, class_names, void, background,
                                                          channels, layout, source_dir, split_rule)
        <NAME>-train.array_record-00000-of-00001   <NAME>-val.array_record-...   [<NAME>-test...]

Each record: "image" (H, W, C) PNG, "label" (H, W, 1) PNG, "id" (the file name without extension);
record i of a split is its i-th id (sorted names, or the split file's order). Preparation is all or
nothing: TFDS writes into a hidden temporary directory in <data_dir>, renamed into place at the end;
on an error (a ValueError of one line naming the file and what to do) nothing is left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np

from train import data, digit_scenes

DATASET_VERSION = "1.0.0"
TASK = "segmentation"
VOID = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_NAMES = ("train", "val", "test")
BACKGROUND_NAMES = ("background", "_background_")
VOC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")  # a subset of TFDS's dataset names
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N"}
COLOR_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
_SPLIT_RULE = "sorted names; every tenth (positions 9, 19, ...) is val, or the last one with fewer than 10"


@dataclasses.dataclass(frozen=True)
class Pair:
    """One example of a folder: its id (file name without extension), image file and mask file."""

    id: str
    image: Path
    mask: Path


@dataclasses.dataclass(frozen=True)
class FolderPlan:
    """What a folder holds, checked without decoding any image.

    layout: "voc" or "pairs"; splits: split name -> its pairs in record order; split_rule: how the
    splits were chosen (recorded in the metadata).
    """

    directory: Path
    layout: str
    class_names: tuple[str, ...]
    splits: dict[str, list[Pair]]
    split_rule: str

    @property
    def classes_from(self) -> str:
        """Where the class names came from, for messages."""
        if self.layout == "voc" and not (self.directory / "classes.txt").is_file():
            return "PASCAL VOC (no classes.txt in the folder)"
        return str(self.directory / "classes.txt")


# ---------------------------------------------------------------------------------------------
# Reading a folder


def scan_folder(directory) -> FolderPlan:
    """Detect the layout of `directory` and pair its images and masks (no pixels decoded).

    Raises:
        ValueError (one line) for a folder of neither layout, a missing classes.txt, an image without
        its mask or a mask without its image, an empty or missing split.
    """
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory; give the folder that holds the images and masks")
    if (directory / "JPEGImages").is_dir() or (directory / "SegmentationClass").is_dir():
        return _scan_voc(directory)
    if (directory / "images").is_dir() or (directory / "masks").is_dir():
        return _scan_pairs(directory)
    nested = sorted(p.parent for p in [*directory.glob("*/JPEGImages"), *directory.glob("*/*/JPEGImages")])
    hint = f" ({nested[0]} looks like PASCAL VOC: give that folder)" if nested else ""
    raise ValueError(f"{directory} is neither a PASCAL VOC folder (JPEGImages/, SegmentationClass/, "
                     f"ImageSets/Segmentation/) nor an image/mask folder (images/, masks/, classes.txt){hint}")


def _files_by_stem(directory: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        if path.stem in files:
            raise ValueError(f"{path} and {files[path.stem]} share the name {path.stem!r}; keep one of them")
        files[path.stem] = path
    return files


def read_class_names(path: Path) -> tuple[str, ...]:
    """The names of classes.txt: line i (from 0) names class i; trailing blank lines are ignored."""
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ValueError(f"{path} names no class; write one class name per line (line i names class i, from 0)")
    for number, name in enumerate(names, 1):
        if not name:
            raise ValueError(f"{path}: line {number} is empty; every line names a class (line i names class i, "
                             f"from 0), so remove the blank line or name the class")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path} names {duplicates[0]!r} twice; every class needs its own name")
    if len(names) > VOID:
        raise ValueError(f"{path} names {len(names)} classes; at most {VOID} fit in a uint8 label (255 is void)")
    return tuple(names)


def _split_files(directory: Path) -> dict[str, Path]:
    found = {split: directory / f"{split}.txt" for split in SPLIT_NAMES if (directory / f"{split}.txt").is_file()}
    if found and "train" not in found:
        raise ValueError(f"{directory} has {', '.join(p.name for p in found.values())} but no train.txt; "
                         f"list the training images there, one name per line")
    return found


def _read_split_file(path: Path) -> list[str]:
    ids = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        name = line.strip()
        if Path(name).suffix.lower() in IMAGE_SUFFIXES:
            name = name[: -len(Path(name).suffix)]
        if name:
            ids.append(name)
    if not ids:
        raise ValueError(f"{path} lists no images; write one image name per line, or delete the file")
    return ids


def _listed_pairs(split_files: dict[str, Path], images: dict[str, Path], masks: dict[str, Path],
                  image_dir: Path, mask_dir: Path) -> dict[str, list[Pair]]:
    splits = {}
    for split, path in split_files.items():
        pairs = []
        for id_ in _read_split_file(path):
            if id_ not in images:
                raise ValueError(f"{path} lists {id_!r} but {image_dir} has no {id_}.png, .jpg or .jpeg; "
                                 f"add the image or remove the line")
            if id_ not in masks:
                raise ValueError(f"{images[id_]} has no mask {mask_dir / (id_ + '.png')} (it is listed in {path}); "
                                 f"add the mask or remove the line")
            pairs.append(Pair(id_, images[id_], masks[id_]))
        splits[split] = pairs
    return splits


def _scan_voc(directory: Path) -> FolderPlan:
    image_dir, mask_dir = directory / "JPEGImages", directory / "SegmentationClass"
    sets_dir = directory / "ImageSets" / "Segmentation"
    for needed in (image_dir, mask_dir):
        if not needed.is_dir():
            raise ValueError(f"{directory} looks like PASCAL VOC but has no {needed.name}/; a VOC folder holds "
                             f"JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/")
    classes_file = directory / "classes.txt"
    class_names = read_class_names(classes_file) if classes_file.is_file() else VOC_CLASS_NAMES
    images = _files_by_stem(image_dir, IMAGE_SUFFIXES)
    masks = _files_by_stem(mask_dir, (".png",))
    for id_, mask in masks.items():
        if id_ not in images:
            raise ValueError(f"{mask} has no image {image_dir / (id_ + '.jpg')}; add the image or remove the mask")
    split_files = _split_files(sets_dir)
    if not split_files:
        raise ValueError(f"{sets_dir / 'train.txt'} is missing; list the ids of the training images there, one per "
                         f"line (and those of the validation images in val.txt)")
    splits = _listed_pairs(split_files, images, masks, image_dir, mask_dir)
    return FolderPlan(directory, "voc", class_names, splits, "ImageSets/Segmentation/<split>.txt")


def _scan_pairs(directory: Path) -> FolderPlan:
    image_dir, mask_dir = directory / "images", directory / "masks"
    for needed in (image_dir, mask_dir):
        if not needed.is_dir():
            raise ValueError(f"{directory} has no {needed.name}/; an image/mask folder holds images/NAME.png|.jpg, "
                             f"masks/NAME.png and classes.txt")
    classes_file = directory / "classes.txt"
    if not classes_file.is_file():
        raise ValueError(f"{classes_file} is missing; write one class name per line (line i names class i, from 0)")
    class_names = read_class_names(classes_file)
    images = _files_by_stem(image_dir, IMAGE_SUFFIXES)
    masks = _files_by_stem(mask_dir, (".png",))
    if not images:
        raise ValueError(f"{image_dir} holds no .png, .jpg or .jpeg image")
    for id_, image in images.items():
        if id_ not in masks:
            raise ValueError(f"{image} has no mask {mask_dir / (id_ + '.png')}; add the mask or remove the image")
    for id_, mask in masks.items():
        if id_ not in images:
            raise ValueError(f"{mask} has no image {image_dir / id_}.png, .jpg or .jpeg; add the image or remove "
                             f"the mask")
    split_files = _split_files(directory / "splits")
    if split_files:
        splits = _listed_pairs(split_files, images, masks, image_dir, mask_dir)
        return FolderPlan(directory, "pairs", class_names, splits, "splits/<split>.txt")
    names = sorted(images)
    if len(names) < 2:
        raise ValueError(f"{directory} holds a single image/mask pair; the automatic train/val split needs at "
                         f"least 2 (or list the training images in splits/train.txt)")
    val = set(names[9::10]) or {names[-1]}
    pairs = {split: [Pair(n, images[n], masks[n]) for n in names if (n in val) == (split == "val")]
             for split in ("train", "val")}
    return FolderPlan(directory, "pairs", class_names, pairs, _SPLIT_RULE)


def _open_image(path: Path):
    from PIL import Image

    from convert.predict import MAX_PIXELS

    try:
        image = Image.open(path)
    except Exception as e:  # noqa: BLE001  (Pillow raises many kinds: UnidentifiedImageError, SyntaxError, ...)
        raise ValueError(f"{path} is not a readable image ({e}); replace or remove it") from None
    width, height = image.size
    if width * height > MAX_PIXELS:  # checked from the header, before decoding (memory)
        image.close()
        raise ValueError(f"{path} is {width}x{height} ({width * height / 1e6:.0f} megapixels); the limit is "
                         f"{MAX_PIXELS / 1e6:.0f} megapixels per image. Cut it into parts or downscale it.")
    return image


def _channels_of(image, path: Path) -> int:
    if image.mode in GRAY_MODES:
        return 1
    if image.mode in COLOR_MODES:
        return 3
    raise ValueError(f"{path}: images of mode {image.mode} are not supported; save it as 8-bit grayscale or RGB")


def read_image(path, channels: int | None = None) -> np.ndarray:
    """(H, W, C) uint8 of an image file, converted as the module docstring says.

    Args:
        channels: 1 or 3; default: the image's own (1 for grayscale modes, 3 for colour ones).
            A grayscale image asked for 3 gets three equal channels.
    """
    path = Path(path)
    with _open_image(path) as image:
        own = _channels_of(image, path)
        try:
            if image.mode.startswith("I"):  # 16-bit grayscale: scale to 8 bits
                wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
                array = ((wide * 255 + 32767) // 65535).astype(np.uint8)
            else:
                array = np.asarray(image.convert("L" if own == 1 else "RGB"), dtype=np.uint8)
        except Exception as e:  # noqa: BLE001  (a truncated or damaged file fails only when decoded)
            raise ValueError(f"{path} cannot be decoded ({e}); replace or remove it") from None
    if array.ndim == 2:
        array = array[:, :, None]
    if (channels or own) == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return array


def read_mask(path, num_classes: int, classes_from: str = "classes.txt") -> np.ndarray:
    """(H, W) uint8 class ids of a mask PNG ("L": pixel values, "P": palette indices).

    Raises ValueError for another mode or a value >= num_classes other than VOID; `classes_from` says
    where the class count came from, for that message.
    """
    path = Path(path)
    with _open_image(path) as mask:
        if mask.mode not in ("L", "P"):
            raise ValueError(f"{path} is a {mask.mode} image; a mask is a single-channel PNG (mode L or P) whose "
                             f"pixel values are class ids, so save it as 8-bit grayscale or palette")
        try:
            label = np.array(mask, dtype=np.uint8)  # a palette image gives its indices
        except Exception as e:  # noqa: BLE001  (as in read_image)
            raise ValueError(f"{path} cannot be decoded ({e}); replace or remove it") from None
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != VOID)]
    if bad.size:
        raise ValueError(f"{path} holds class value {int(bad[0])}, but {classes_from} has only {num_classes} classes "
                         f"(0..{num_classes - 1}; 255 is void); fix the mask or add the class")
    return label


def _check_pairs(plan: FolderPlan) -> int:
    """Check every mask against its image (sizes, modes, class values); returns the channels to store."""
    channels = 1
    for pairs in plan.splits.values():
        for pair in pairs:
            with _open_image(pair.image) as image:
                width, height = image.size
                channels = max(channels, _channels_of(image, pair.image))
            label = read_mask(pair.mask, len(plan.class_names), plan.classes_from)
            if label.shape != (height, width):
                turned = " (its image turned by 90 degrees?)" if label.shape == (width, height) else ""
                raise ValueError(f"{pair.mask} is {label.shape[1]}x{label.shape[0]} but its image {pair.image} is "
                                 f"{width}x{height} (width x height){turned}; a mask must cover its image pixel for "
                                 f"pixel")
    return channels


# ---------------------------------------------------------------------------------------------
# Preparing


def _builder_class(plan: FolderPlan, name: str, channels: int):
    """A TFDS builder that writes the pairs of `plan` (decoded, converted, PNG-encoded) as `name`."""
    import tensorflow_datasets as tfds

    background = next((i for i, n in enumerate(plan.class_names) if n.lower() in BACKGROUND_NAMES), None)

    class FolderSegmentation(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """A segmentation data set prepared from a folder of images and masks."""

        VERSION = tfds.core.Version(DATASET_VERSION)
        RELEASE_NOTES: ClassVar[dict] = {DATASET_VERSION: "Prepared by `zoo data prepare-segmentation`."}
        url_infos: ClassVar[dict] = {}  # nothing is downloaded: no checksums file to look up (see train.digit_scenes)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Semantic segmentation: {plan.layout} folder {plan.directory}, "
                            f"{len(plan.class_names)} classes, 255 = void.",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, channels), encoding_format="png"),
                    "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "id": tfds.features.Text(),
                }),
                disable_shuffling=True,  # record i of a split is its i-th id
                metadata=tfds.core.MetadataDict(
                    task=TASK, class_names=list(plan.class_names), void=VOID, background=background,
                    channels=channels, layout=plan.layout, source_dir=str(plan.directory),
                    split_rule=plan.split_rule),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(pairs) for split, pairs in plan.splits.items()}

        def _generate_examples(self, pairs):
            for index, pair in enumerate(pairs):
                image = read_image(pair.image, channels)
                label = read_mask(pair.mask, len(plan.class_names), plan.classes_from)
                yield index, {"image": data.encode_png(image, filter_up=True, level=3),
                              "label": data.encode_png(label, filter_up=True, level=3), "id": pair.id}

    FolderSegmentation.name = name
    return FolderSegmentation


def _check_name(name: str, root: Path, force: bool) -> None:
    if name == "downloads":
        raise ValueError("downloads is the folder TFDS keeps its downloads in; choose another --name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"--name {name!r}: use lower-case letters, digits and underscores, starting with a letter "
                         f"(a TFDS name), e.g. my_voc")
    if name in data.builtin_datasets():
        raise ValueError(f"{name} is a built-in data set; choose another --name")
    existing = root / name
    if is_prepared(name, root):
        if not force:
            raise ValueError(f"{dataset_dir(name, root)} already holds the prepared data set {name}; pass --force to "
                             f"replace it, or choose another --name")
    elif existing.exists() and (not existing.is_dir() or any(existing.iterdir())):
        raise ValueError(f"{existing} exists and is not a data set prepared by `zoo data prepare-segmentation`; "
                         f"choose another --name, or move it away")


def prepare_segmentation(directory, name: str, data_dir=None, *, force: bool = False, quiet: bool = False) -> Path:
    """Turn a folder of images and masks (either layout of the module docstring) into the TFDS data set `name`.

    Args:
        directory: the folder (VOC: the one holding JPEGImages/; pairs: the one holding images/ and masks/).
        name: the data set's name (lower-case letters, digits, underscores); not a built-in one.
        data_dir: TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
        force: replace a data set of that name prepared before.
        quiet: print nothing.
    Returns:
        the prepared data set's directory, <data_dir>/<name>/1.0.0.
    Raises:
        ValueError of one line naming the file at fault and what to do; nothing is written then.
    """
    root = data._resolve(data_dir)
    _check_name(name, root, force)
    plan = scan_folder(directory)
    channels = _check_pairs(plan)
    target = dataset_dir(name, root)
    counts = ", ".join(f"{split} {len(pairs)}" for split, pairs in plan.splits.items())
    _say(quiet, f"{name}: {plan.layout} folder {plan.directory}: {len(plan.class_names)} classes, {counts} "
                f"examples, {'RGB' if channels == 3 else 'grayscale'}; writing TFDS array_record files to {target}")
    import tensorflow_datasets as tfds

    if quiet:
        from absl import logging as absl_logging

        tfds.disable_progress_bar()
        absl_logging.set_verbosity(absl_logging.ERROR)
    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    # The pattern of zoo.saving.write_files_atomically, for a directory: write beside the target, rename.
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.incomplete-"))
    try:
        builder = _builder_class(plan, name, channels)(data_dir=str(staging))
        # TFDS's banner names the staging directory, which is gone once this returns.
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False), file_format="array_record")
        built = staging / name / DATASET_VERSION
        if not (built / "dataset_info.json").is_file():
            raise RuntimeError(f"TFDS finished but {built} holds no dataset_info.json; see the log above")
        target.parent.mkdir(exist_ok=True)
        if target.exists():  # --force: the old data set goes with the staging directory
            os.replace(target, staging / "replaced")
        os.replace(built, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_root and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
    _say(quiet, f"{name}: prepared in {target}")
    return target


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Reading a prepared data set


def dataset_dir(name: str, data_dir=None) -> Path:
    """Where `name` lives (prepared or not): <data_dir>/<name>/<version>."""
    if name == digit_scenes.NAME:
        return digit_scenes.scenes_dir(data_dir)
    return data._resolve(data_dir) / name / DATASET_VERSION


def _metadata(directory: Path) -> dict | None:
    """The metadata a prepared folder data set records, or None when `directory` holds none."""
    metadata_file = directory / "metadata.json"
    if not (directory / "dataset_info.json").is_file() or not metadata_file.is_file():
        return None
    record = json.loads(metadata_file.read_text())
    return record if record.get("task") == TASK else None


def split_counts(directory: Path) -> dict[str, int]:
    """Split name -> number of examples, as a prepared data set's dataset_info.json records them."""
    info = json.loads((Path(directory) / "dataset_info.json").read_text())
    return {s["name"]: int(sum(int(n) for n in s.get("shardLengths", []))) for s in info.get("splits", [])}


def is_prepared(name: str, data_dir=None) -> bool:
    """True when `name` is digit_scenes and built, or a folder data set prepared in `data_dir`."""
    if name == digit_scenes.NAME:
        return digit_scenes.is_prepared(data_dir)
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in data.DATASETS:
        return False
    directory = dataset_dir(name, data_dir)
    if _metadata(directory) is None:
        return False
    return all(any(directory.glob(f"{name}-{split}.array_record-*")) for split in split_counts(directory))


def is_segmentation_dataset(name: str, data_dir=None) -> bool:
    """True for digit_scenes (prepared or not) and for the folder data sets prepared in `data_dir`."""
    return name == digit_scenes.NAME or is_prepared(name, data_dir)


def list_prepared(data_dir=None) -> list[str]:
    """The folder data sets prepared in `data_dir` (digit_scenes not included), sorted."""
    root = data._resolve(data_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != digit_scenes.NAME
                  and is_prepared(p.name, root))


def _not_prepared(name: str, data_dir) -> Exception:
    if name in data.DATASETS:
        return ValueError(f"{name} is a classification data set (one label per image); read it with "
                          f"train.data.load_arrays({name!r}, split)")
    root = data._resolve(data_dir)
    where = f" --data-dir {root}" if data_dir is not None else ""
    return FileNotFoundError(f"{name} is not prepared in {root}; run `zoo data prepare-segmentation DIR --name {name}"
                             f"{where}` with DIR the folder of its images and masks")


def segmentation_info(name: str, data_dir=None) -> dict:
    """What a segmentation data set holds.

    Returns:
        {"name", "num_classes", "class_names": [...], "void": 255, "channels": 1 or 3,
         "splits": {split: examples}, "background": class index or None}. For digit_scenes not yet
        built, "splits" gives the sizes it will be built with.
    Raises:
        FileNotFoundError saying which command prepares `name` when it is not prepared.
    """
    if name == digit_scenes.NAME:
        splits = (split_counts(digit_scenes.scenes_dir(data_dir)) if digit_scenes.is_prepared(data_dir)
                  else dict(digit_scenes.DEFAULT_SIZES))
        return {"name": name, "num_classes": digit_scenes.NUM_CLASSES, "class_names": list(digit_scenes.CLASS_NAMES),
                "void": digit_scenes.VOID, "channels": 1, "splits": splits, "background": digit_scenes.BACKGROUND}
    if not is_prepared(name, data_dir):
        raise _not_prepared(name, data_dir)
    directory = dataset_dir(name, data_dir)
    record = _metadata(directory)
    return {"name": name, "num_classes": len(record["class_names"]), "class_names": list(record["class_names"]),
            "void": int(record["void"]), "channels": int(record["channels"]), "splits": split_counts(directory),
            "background": record["background"]}


def read_split(directory: Path, split: str, limit: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(image (H, W, C) uint8, label (H, W) uint8)] of a split of the TFDS data set in `directory`.

    Reads the raw records through `tfds.builder_from_directory(...).as_data_source` and decodes the
    "image" and "label" PNGs with `train.data.decode_png`.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.proto import tf_example_pb2

    source = tfds.builder_from_directory(str(directory)).as_data_source(
        split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    count = len(source) if limit is None else min(int(limit), len(source))
    examples = []
    chunk = 256
    for start in range(0, count, chunk):
        for record in source.__getitems__(list(range(start, min(count, start + chunk)))):
            feature = tf_example_pb2.Example.FromString(record).features.feature
            image = data.decode_png(feature["image"].bytes_list.value[0])
            label = data.decode_png(feature["label"].bytes_list.value[0])[..., 0]
            examples.append((np.ascontiguousarray(image), np.ascontiguousarray(label)))
    return examples


def load_segmentation(name: str, split: str, data_dir=None, *, limit: int | None = None
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The examples of a split, decoded: [(image (H, W, C) uint8, label (H, W) uint8)], sizes varying.

    Args:
        name: digit_scenes (built on first use, about 30 s offline) or a data
            set prepared with `prepare_segmentation`.
        split: one of `segmentation_info(name)["splits"]` (digit_scenes: "train", "test").
        limit: only the first `limit` examples.
    Labels are class ids, VOID (255) where unknown.
    """
    if name == digit_scenes.NAME and not digit_scenes.is_prepared(data_dir):
        digit_scenes.prepare_scenes(data_dir, quiet=True)
    info = segmentation_info(name, data_dir)
    if split not in info["splits"]:
        raise ValueError(f"{name} has no split {split!r}; its splits: {', '.join(info['splits'])}")
    return read_split(dataset_dir(name, data_dir), split, limit)
