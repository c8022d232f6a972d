"""Offline TFDS data: the prepared MNIST against its published facts, the IDX/PNG codecs, bad input."""

from __future__ import annotations

import gzip
import io
import time

import numpy as np
import pytest
from PIL import Image

from train import data

# Published class counts of the official MNIST split (LeCun et al.); independent of our pipeline.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _mnist_or_skip():
    if not data.is_prepared("mnist"):
        pytest.skip("mnist is not prepared; run `zoo data prepare mnist` (scripts/setup-env does)")


def test_idx_codec_matches_the_format_spec():
    # Header written by hand from the IDX spec: magic 0x00000803 (uint8, 3 dims), then big-endian dims.
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    expected = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4]) + bytes(range(24))
    assert data.idx_bytes(array) == expected
    np.testing.assert_array_equal(data.parse_idx(expected), array)
    with pytest.raises(ValueError, match="truncated"):
        data.parse_idx(expected[:-1])
    with pytest.raises(ValueError, match="magic"):
        data.parse_idx(b"\x00\x00\x0d\x01" + expected[4:])


def test_png_codec_round_trips_through_pillow():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    ours = data.encode_png(image)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ours))), image)  # Pillow decodes ours
    np.testing.assert_array_equal(data.decode_png(ours)[..., 0], image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # Pillow's filtered PNG takes the fallback path
    np.testing.assert_array_equal(data.decode_png(buffer.getvalue())[..., 0], image)


@pytest.mark.parametrize("shape", [(20, 30), (20, 30, 1), (20, 30, 3)])
@pytest.mark.parametrize("filter_up", [False, True])
def test_png_codec_grayscale_and_rgb_with_either_row_filter(shape, filter_up):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    ours = data.encode_png(image, filter_up=filter_up)
    with Image.open(io.BytesIO(ours)) as decoded:  # Pillow undoes the filters by the PNG spec
        assert decoded.mode == ("RGB" if len(shape) == 3 and shape[2] == 3 else "L")
        np.testing.assert_array_equal(np.asarray(decoded).reshape(shape), image)
    expected = image if len(shape) == 3 else image[..., None]
    np.testing.assert_array_equal(data.decode_png(ours), expected)  # the fast path
    buffer = io.BytesIO()
    Image.fromarray(expected if expected.shape[2] == 3 else expected[..., 0]).save(buffer, format="PNG")
    np.testing.assert_array_equal(data.decode_png(buffer.getvalue()), expected)  # Pillow's adaptive filters
    with pytest.raises(ValueError, match="encode_png takes"):
        data.encode_png(np.zeros((4, 4, 2), np.uint8))


def test_read_verified_idx_rejects_a_wrong_hash(tmp_path):
    payload = data.idx_bytes(np.zeros((2, 28, 28), np.uint8))
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(payload)
    got = data.read_verified_idx(tmp_path, "train_images", data.sha256_bytes(payload))
    assert got.shape == (2, 28, 28)
    with pytest.raises(ValueError, match="sha256"):
        data.read_verified_idx(tmp_path, "train_images", "0" * 64)


def test_unknown_dataset_and_split_list_what_exists():
    with pytest.raises(ValueError, match="mnist, fashion_mnist"):
        data.load_arrays("cifar10", "train")
    with pytest.raises(ValueError, match="mnist, fashion_mnist"):
        data.prepare("emnist")
    with pytest.raises(ValueError, match="train, test"):
        data.load_arrays("mnist", "validation")


def test_not_prepared_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="zoo data prepare mnist"):
        data.load_arrays("mnist", "test", data_dir=tmp_path)


@pytest.mark.slow
def test_prepared_mnist_has_the_published_split():
    _mnist_or_skip()
    start = time.perf_counter()
    assert data.prepare("mnist", quiet=True) == data.dataset_dir("mnist")
    assert time.perf_counter() - start < 2.0, "an already prepared data set must be quick"
    images, labels = data.load_arrays("mnist", "train")
    test_images, test_labels = data.load_arrays("mnist", "test")
    assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.int32
    assert test_images.shape == (10000, 28, 28, 1)
    assert np.bincount(labels).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(test_labels).tolist() == MNIST_TEST_COUNTS
    # The normalization constants we record are the split's own statistics.
    pixels = images.astype(np.float64) / 255
    assert abs(pixels.mean() - data.DATASETS["mnist"].mean) < 5e-5
    assert abs(pixels.std() - data.DATASETS["mnist"].std) < 5e-5


def test_records_match_the_sha256_checked_idx_sources():
    _mnist_or_skip()
    manual = data.default_data_dir() / "downloads" / "manual" / "mnist"
    if not (manual / "t10k-images-idx3-ubyte").is_file():
        pytest.skip(f"no IDX sources in {manual}")
    sha = data.DATASETS["mnist"].idx_sha256
    idx_images = data.read_verified_idx(manual, "test_images", sha["test_images"])
    idx_labels = data.read_verified_idx(manual, "test_labels", sha["test_labels"])
    images, labels = data.load_arrays("mnist", "test")
    # TFDS shuffles records when writing; compare as multisets of (image, label) rows.
    def rows(x, y):
        return sorted(xi.tobytes() + bytes([yi]) for xi, yi in zip(x.reshape(len(x), -1), y.astype(np.uint8)))
    assert rows(images, labels) == rows(idx_images, idx_labels)


def test_tfds_own_reader_agrees_with_load_arrays():
    _mnist_or_skip()
    import tensorflow_datasets as tfds

    source = tfds.data_source("mnist", split="test", data_dir=str(data.default_data_dir()), download=False)
    images, labels = data.load_arrays("mnist", "test")
    for i in (0, 1, 4321, 9999):  # TFDS decodes the PNG with its own (Pillow) path
        record = source[i]
        np.testing.assert_array_equal(record["image"], images[i])
        assert record["label"] == labels[i]


def test_slices_read_only_what_they_name():
    _mnist_or_skip()
    images, labels = data.load_arrays("mnist", "test[:100]")
    full_images, full_labels = data.load_arrays("mnist", "test")
    np.testing.assert_array_equal(images, full_images[:100])
    np.testing.assert_array_equal(labels, full_labels[:100])


def test_prepared_fashion_mnist_is_balanced():
    if not data.is_prepared("fashion_mnist"):
        pytest.skip("fashion_mnist is not prepared (`zoo data prepare fashion_mnist`)")
    _, labels = data.load_arrays("fashion_mnist", "test")
    assert np.bincount(labels).tolist() == [1000] * 10  # the published split: 1,000 per class
