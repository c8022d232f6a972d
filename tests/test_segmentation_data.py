"""Segmentation data sets from folders (PASCAL VOC, image/mask pairs) and digit_scenes, through one reader.

What is written to the folders is the reference: pixel arrays written here with Pillow (JPEGs: Pillow's
own decode of the same file), VOC's class list and colour palette written out from its devkit, and
TFDS's own reader (`tfds.data_source`, which decodes with Pillow) beside ours.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train import data, digit_scenes
from train import segmentation_data as sdata

# VOCdevkit's VOCcode/VOClabelcolormap.m and the class list of its VOC2012 development kit.
VOC_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
             "tvmonitor"]


def voc_palette() -> list[int]:
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def palette_png(label: np.ndarray, path: Path) -> None:
    image = Image.frombytes("P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label, np.uint8).tobytes())
    image.putpalette(voc_palette())
    image.save(path)


def random_mask(rng, num_classes: int, shape=(20, 30)) -> np.ndarray:
    mask = rng.integers(0, num_classes, shape).astype(np.uint8)
    mask[rng.random(shape) < 0.1] = 255  # void pixels
    return mask


def write_pairs(directory: Path, count: int = 6, *, classes=("background", "cat", "dog"), seed: int = 0) -> dict:
    """An image/mask folder of RGB PNGs and L masks; returns {name: (image path, mask array)}."""
    rng = np.random.default_rng(seed)
    (directory / "images").mkdir(parents=True)
    (directory / "masks").mkdir()
    (directory / "classes.txt").write_text("\n".join(classes) + "\n")
    written = {}
    for i in range(count):
        name = f"img{i:02d}"
        image_path = directory / "images" / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(image_path)
        mask = random_mask(rng, len(classes))
        Image.fromarray(mask).save(directory / "masks" / f"{name}.png")
        written[name] = (image_path, mask)
    return written


def write_voc(directory: Path, ids=("2007_000032", "2007_000039", "2008_000002", "2008_000003"), *, seed: int = 1):
    """A VOC2012-shaped folder: RGB JPEGs, palette masks, ImageSets; returns {id: (jpeg path, mask array)}."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (directory / sub).mkdir(parents=True)
    written = {}
    for index, id_ in enumerate(ids):
        jpeg = directory / "JPEGImages" / f"{id_}.jpg"
        smooth = np.linspace(0, 255, 30)[None, :, None] * np.ones((20, 30, 3))
        pixels = np.clip(smooth + rng.normal(0, 20, (20, 30, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(jpeg, quality=90)
        mask = random_mask(rng, len(VOC_NAMES))
        palette_png(mask, directory / "SegmentationClass" / f"{id_}.png")
        written[id_] = (jpeg, mask)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(directory / "JPEGImages" / "2009_000001.jpg")  # no mask
    (directory / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:3]) + "\n")
    (directory / "ImageSets/Segmentation/val.txt").write_text(ids[3] + "\n")
    return written


def pillow_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# Round trips


def test_pairs_folder_round_trips_pixel_for_pixel(tmp_path):
    written = write_pairs(tmp_path / "pets", count=12)
    # Other image kinds in the same folder: stored as RGB like the rest.
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "pets/images/img03.png")
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "pets/images/img05.png")
    (tmp_path / "pets/images/img07.png").unlink()
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "pets/images/img07.jpg")
    expected_images = {name: pillow_rgb(path) for name, (path, _) in written.items() if name != "img07"}
    expected_images["img03"] = np.repeat(gray[..., None], 3, axis=2)
    expected_images["img05"] = rgba[..., :3]
    expected_images["img07"] = pillow_rgb(tmp_path / "pets/images/img07.jpg")

    root = tmp_path / "tfds"
    target = sdata.prepare_segmentation(tmp_path / "pets", "pets", root, quiet=True)
    assert target == root / "pets" / "1.0.0"
    info = sdata.segmentation_info("pets", root)
    assert info == {"name": "pets", "num_classes": 3, "class_names": ["background", "cat", "dog"], "void": 255,
                    "channels": 3, "splits": {"train": 11, "val": 1}, "background": 0}
    names = sorted(written)
    for split, expected_names in (("train", [n for n in names if n != "img09"]), ("val", ["img09"])):
        examples = sdata.load_segmentation("pets", split, root)
        assert len(examples) == len(expected_names)
        for (image, label), name in zip(examples, expected_names):
            assert image.dtype == np.uint8 and label.dtype == np.uint8
            np.testing.assert_array_equal(image, expected_images[name])
            np.testing.assert_array_equal(label, written[name][1])
    assert len(sdata.load_segmentation("pets", "train", root, limit=2)) == 2

    # TFDS's own reader, without TensorFlow, sees the same records.
    import tensorflow_datasets as tfds

    record = tfds.data_source("pets", split="val", data_dir=str(root), download=False)[0]
    assert record["id"] == b"img09"
    np.testing.assert_array_equal(record["image"], expected_images["img09"])
    np.testing.assert_array_equal(record["label"][..., 0], written["img09"][1])

    # The registry knows it.
    assert "pets" in data.list_datasets(root) and sdata.is_segmentation_dataset("pets", root)
    source = data.get_source("pets", root)
    assert (source.task, source.num_classes, source.image_shape) == ("segmentation", 3, (None, None, 3))
    assert source.class_names == ("background", "cat", "dog")
    assert data.preprocessing_record("pets", root) == {"input": "uint8 NHWC", "scale": 1 / 255,
                                                       "mean": [0.0] * 3, "std": [1.0] * 3}
    with pytest.raises(ValueError, match="load_segmentation"):
        data.load_arrays("pets", "train", root)
    with pytest.raises(ValueError, match="its splits: train, val"):
        sdata.load_segmentation("pets", "test", root)


def test_grayscale_pairs_with_split_files_palette_masks_and_16_bit_images(tmp_path):
    folder = tmp_path / "cells"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    (folder / "splits").mkdir()
    (folder / "classes.txt").write_text("\ufeffcytoplasm\nnucleus\n\n")  # a BOM and a trailing blank line
    rng = np.random.default_rng(2)
    expected = {}
    for i in range(5):
        name = f"cell_{i}"
        if i == 4:
            wide = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
            Image.fromarray(wide).save(folder / "images" / f"{name}.png")  # 16-bit grayscale PNG
            image = ((wide.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
        else:
            image = rng.integers(0, 256, (20, 30), dtype=np.uint8)
            Image.fromarray(image).save(folder / "images" / f"{name}.png")
        mask = random_mask(rng, 2)
        palette_png(mask, folder / "masks" / f"{name}.png")
        expected[name] = (image[..., None], mask)
    (folder / "splits/train.txt").write_text("cell_3\ncell_0.png\n\ncell_1\n")  # order kept, extension allowed
    (folder / "splits/val.txt").write_text("cell_2\n")
    (folder / "splits/test.txt").write_text("cell_4\n")
    root = tmp_path / "tfds"
    sdata.prepare_segmentation(folder, "cells", root, quiet=True)
    info = sdata.segmentation_info("cells", root)
    assert info["channels"] == 1 and info["background"] is None
    assert info["class_names"] == ["cytoplasm", "nucleus"]
    assert info["splits"] == {"train": 3, "val": 1, "test": 1}
    for split, order in (("train", ["cell_3", "cell_0", "cell_1"]), ("val", ["cell_2"]), ("test", ["cell_4"])):
        for (image, label), name in zip(sdata.load_segmentation("cells", split, root), order, strict=True):
            np.testing.assert_array_equal(image, expected[name][0])
            np.testing.assert_array_equal(label, expected[name][1])


def test_voc_folder_keeps_palette_indices_and_voc_class_names(tmp_path):
    written = write_voc(tmp_path / "VOC2012")
    with Image.open(next((tmp_path / "VOC2012/SegmentationClass").iterdir())) as mask:
        assert mask.mode == "P" and mask.getpalette()[:6] == [0, 0, 0, 128, 0, 0]  # a real VOC palette PNG
    root = tmp_path / "tfds"
    sdata.prepare_segmentation(tmp_path / "VOC2012", "voc_small", root, quiet=True)
    info = sdata.segmentation_info("voc_small", root)
    assert info["class_names"] == VOC_NAMES and info["num_classes"] == 21 and info["background"] == 0
    assert info["splits"] == {"train": 3, "val": 1} and info["channels"] == 3
    ids = list(written)
    for split, order in (("train", ids[:3]), ("val", ids[3:])):
        for (image, label), id_ in zip(sdata.load_segmentation("voc_small", split, root), order, strict=True):
            np.testing.assert_array_equal(image, pillow_rgb(written[id_][0]))  # Pillow's decode of the JPEG
            np.testing.assert_array_equal(label, written[id_][1])
    # classes.txt beside the VOC folders replaces VOC's names.
    (tmp_path / "VOC2012/classes.txt").write_text("\n".join(f"class{i}" for i in range(21)))
    assert sdata.scan_folder(tmp_path / "VOC2012").class_names == tuple(f"class{i}" for i in range(21))


def test_force_replaces_a_prepared_data_set(tmp_path):
    root = tmp_path / "tfds"
    write_pairs(tmp_path / "a", count=3, seed=0)
    written = write_pairs(tmp_path / "b", count=4, seed=9)
    sdata.prepare_segmentation(tmp_path / "a", "mine", root, quiet=True)
    with pytest.raises(ValueError, match="already holds the prepared data set mine; pass --force"):
        sdata.prepare_segmentation(tmp_path / "b", "mine", root, quiet=True)
    assert sdata.segmentation_info("mine", root)["splits"] == {"train": 2, "val": 1}
    sdata.prepare_segmentation(tmp_path / "b", "mine", root, force=True, quiet=True)
    assert sdata.segmentation_info("mine", root)["splits"] == {"train": 3, "val": 1}
    ((_, label),) = sdata.load_segmentation("mine", "val", root)
    np.testing.assert_array_equal(label, written["img03"][1])
    assert sorted(p.name for p in root.iterdir()) == ["mine"]  # no staging directory left


# ---------------------------------------------------------------------------------------------
# Refusals: one line naming the file, nothing written


def _size_mismatch(folder):
    Image.fromarray(np.zeros((20, 31), np.uint8)).save(folder / "masks/img01.png")
    return r"masks/img01.png is 31x20 but its image .*img01.png is 30x20"


def _class_out_of_range(folder):
    mask = np.zeros((20, 30), np.uint8)
    mask[3, 4] = 3  # classes.txt names 3 classes: 0, 1, 2 (255 is void)
    Image.fromarray(mask).save(folder / "masks/img02.png")
    return r"masks/img02.png holds class value 3, but .*classes.txt has only 3 classes"


def _image_without_mask(folder):
    (folder / "masks/img04.png").unlink()
    return r"images/img04.png has no mask .*masks/img04.png"


def _mask_without_image(folder):
    (folder / "images/img04.png").unlink()
    return r"masks/img04.png has no image"


def _unreadable_image(folder):
    (folder / "images/img00.png").write_bytes(b"not an image at all")
    return r"images/img00.png is not a readable image"


def _truncated_image(folder):  # decoded only while TFDS writes: the staging directory must go too
    path = folder / "images/img05.png"
    path.unlink()
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "images/img05.jpg").write_bytes(buffer.getvalue()[:-100])  # the header survives
    return r"images/img05.jpg cannot be decoded"


def _empty_split(folder):
    (folder / "splits").mkdir()
    (folder / "splits/train.txt").write_text("img00\nimg01\n")
    (folder / "splits/val.txt").write_text("\n")
    return r"splits/val.txt lists no images"


def _rgb_mask(folder):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(folder / "masks/img01.png")
    return r"masks/img01.png is a RGB image; a mask is a single-channel PNG"


def _no_classes(folder):
    (folder / "classes.txt").unlink()
    return r"classes.txt is missing"


def _neither_layout(folder):
    (folder / "images").rename(folder / "pictures")
    (folder / "masks").rename(folder / "labels")
    return r"is neither a PASCAL VOC folder .* nor an image/mask folder"


@pytest.mark.parametrize("break_it", [_size_mismatch, _class_out_of_range, _image_without_mask, _mask_without_image,
                                      _unreadable_image, _truncated_image, _empty_split, _rgb_mask, _no_classes,
                                      _neither_layout])
def test_bad_folders_are_refused_and_nothing_is_written(tmp_path, break_it):
    folder = tmp_path / "folder"
    write_pairs(folder)
    message = break_it(folder)
    root = tmp_path / "tfds"
    with pytest.raises(ValueError, match=message) as refused:
        sdata.prepare_segmentation(folder, "broken", root, quiet=True)
    assert "\n" not in str(refused.value)
    assert not root.exists(), f"left behind: {sorted(map(str, root.rglob('*')))}"
    assert not sdata.is_prepared("broken", root)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "digit_scenes"])
def test_built_in_names_are_refused(tmp_path, name):
    write_pairs(tmp_path / "folder", count=2)
    with pytest.raises(ValueError, match=f"{name} is a built-in data set"):
        sdata.prepare_segmentation(tmp_path / "folder", name, tmp_path / "tfds", force=True, quiet=True)
    assert not (tmp_path / "tfds").exists()


def test_voc_refusals_name_the_file(tmp_path):
    folder = tmp_path / "VOC2012"
    written = write_voc(folder)
    first = next(iter(written))
    (folder / "SegmentationClass" / f"{first}.png").unlink()
    with pytest.raises(ValueError, match=f"JPEGImages/{first}.jpg has no mask .*SegmentationClass/{first}.png"):
        sdata.prepare_segmentation(folder, "voc_broken", tmp_path / "tfds", quiet=True)
    (folder / "ImageSets/Segmentation/train.txt").unlink()
    (folder / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(ValueError, match="ImageSets/Segmentation/train.txt is missing"):
        sdata.prepare_segmentation(folder, "voc_broken", tmp_path / "tfds", quiet=True)
    assert not (tmp_path / "tfds").exists()


def test_command_line_prepares_and_refuses_in_one_line(tmp_path):
    import argparse

    from train import cli

    parser = argparse.ArgumentParser(prog="zoo")  # only `zoo data`: the other commands are not under test here
    cli.add_commands(parser.add_subparsers(dest="command"))
    write_pairs(tmp_path / "folder", count=3)
    root = tmp_path / "tfds"
    argv = ["data", "prepare-segmentation", str(tmp_path / "folder"), "--name", "cli_set", "--data-dir", str(root)]
    args = parser.parse_args([*argv, "--quiet"])
    assert args.func(args) == 0
    assert sdata.segmentation_info("cli_set", root)["splits"] == {"train": 2, "val": 1}
    args = parser.parse_args(argv)
    with pytest.raises(ValueError, match="pass --force") as refused:  # zoo.cli.main prints it as one line
        args.func(args)
    assert "\n" not in str(refused.value)


def test_not_prepared_says_which_command_prepares_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="zoo data prepare-segmentation DIR --name voc"):
        sdata.load_segmentation("voc", "train", tmp_path)
    with pytest.raises(FileNotFoundError, match="zoo data prepare-segmentation DIR --name voc"):
        sdata.segmentation_info("voc", tmp_path)
    assert not sdata.is_segmentation_dataset("voc", tmp_path) and not sdata.is_segmentation_dataset("mnist")
    with pytest.raises(ValueError, match="classification data set"):
        sdata.load_segmentation("mnist", "train")
    with pytest.raises(ValueError, match="prepare-segmentation"):
        data.get_source("voc", tmp_path)


# ---------------------------------------------------------------------------------------------
# digit_scenes, one data set among them


def test_digit_scenes_is_served_and_built_on_first_use(tmp_path, monkeypatch):
    if not data.is_prepared("mnist"):
        pytest.skip("mnist is not prepared (`zoo data prepare mnist`); digit_scenes is built from it")
    monkeypatch.setattr(digit_scenes, "DEFAULT_SIZES", {"train": 3, "test": 2})
    assert not digit_scenes.is_prepared(tmp_path)
    source = data.get_source("digit_scenes", tmp_path)
    assert (source.task, source.num_classes, source.image_shape) == ("segmentation", 11, (None, None, 1))
    for split, count in (("train", 3), ("test", 2)):
        scenes = sdata.load_segmentation("digit_scenes", split, tmp_path)  # the first call builds it
        assert len(scenes) == count
        for index, (image, label) in enumerate(scenes):
            scene = digit_scenes.generate_scene(split, index)
            assert image.shape == (*scene.image.shape, 1)
            np.testing.assert_array_equal(image[..., 0], scene.image)
            np.testing.assert_array_equal(label, scene.label)
    info = sdata.segmentation_info("digit_scenes", tmp_path)
    assert info["splits"] == {"train": 3, "test": 2} and info["background"] == 10 and info["channels"] == 1
    assert info["class_names"] == [*map(str, range(10)), "background"]
    assert data.prepare("digit_scenes", tmp_path, quiet=True) == digit_scenes.scenes_dir(tmp_path)
    assert "digit_scenes" in data.list_datasets(tmp_path) and data.list_datasets(tmp_path).count("digit_scenes") == 1
