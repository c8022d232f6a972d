"""The digit_scenes data set: scenes of real MNIST digits with a label for every pixel.

Reference points from outside the code under test: the raw MNIST arrays (which digits a scene
may hold, found by content) and the pixel intensities (which label each pixel must have).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from train import digit_scenes as sd


@pytest.fixture(scope="module")
def mnist():
    from train import data

    try:
        data.prepare("mnist", quiet=True)
    except Exception as e:  # no installer access: say how to get the data
        pytest.skip(f"mnist is not prepared and could not be prepared here ({e}); run `zoo data prepare mnist`")
    return {split: sd.mnist_digits(split) for split in ("train", "test")}


# ---------------------------------------------------------------------------------------------
# digit_scenes


def test_scenes_are_deterministic(mnist):
    a, b = sd.generate_scene("train", 7), sd.generate_scene("train", 7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label) and a.digits == b.digits
    other = sd.generate_scene("train", 7, seed=sd.DEFAULT_SEED + 1)
    assert a.image.shape != other.image.shape or not np.array_equal(a.image, other.image)
    assert not np.array_equal(sd.generate_scene("test", 7).image, sd.generate_scene("train", 7).image)


@pytest.mark.parametrize("split", ["train", "test"])
def test_scenes_hold_digits_of_their_own_split_only(mnist, split):
    # Unscaled digits are byte-exact copies of MNIST images: look each pasted 28x28 patch up among
    # the raw arrays of both splits, by content (the recorded MNIST index is not used).
    hashes = {s: {hashlib.sha1(np.ascontiguousarray(x).tobytes()).digest() for x in mnist[s][0]}
              for s in ("train", "test")}
    other = "test" if split == "train" else "train"
    found = 0
    for index in range(12):
        scene = sd.generate_scene(split, index, scale_range=(1.0, 1.0))
        inside = np.zeros(scene.image.shape, bool)
        for digit in scene.digits:
            top, left, h, w = digit["box"]
            assert (h, w) == (28, 28)
            patch = np.ascontiguousarray(scene.image[top:top + h, left:left + w])
            key = hashlib.sha1(patch.tobytes()).digest()
            assert key in hashes[split], f"scene {index}: a digit that is not in MNIST's {split} split"
            assert key not in hashes[other], f"scene {index}: a {split} scene holds a digit of the {other} split"
            inside[top:top + h, left:left + w] = True
            found += 1
        assert not scene.image[~inside].any(), "ink outside every recorded digit box"
    assert found > 50


def test_scene_labels_follow_the_ink(mnist):
    scene = sd.generate_scene("test", 3)
    ink = scene.image >= sd.INK_THRESHOLD
    assert np.all(scene.label[ink] < 10)
    assert np.all(scene.label[scene.image == 0] == sd.BACKGROUND)
    faint = (scene.image > 0) & ~ink
    assert np.all(scene.label[faint] == sd.VOID)
    for digit in scene.digits:  # the classes inside a box are its digit's
        top, left, h, w = digit["box"]
        box = scene.label[top:top + h, left:left + w]
        assert set(np.unique(box[box < 10]).tolist()) <= {digit["label"]}


def test_tfds_builder_stores_the_generated_scenes(mnist, tmp_path):
    sd.prepare_scenes(tmp_path, sizes={"train": 3, "test": 2}, quiet=True)
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(sd.scenes_dir(tmp_path)))
    assert builder.info.splits["test"].num_examples == 2
    for split, count in (("train", 3), ("test", 2)):
        stored = sd.load_scenes(split, tmp_path)
        assert len(stored) == count
        for index, (image, label) in enumerate(stored):
            scene = sd.generate_scene(split, index)
            assert np.array_equal(image, scene.image) and np.array_equal(label, scene.label)
    with pytest.raises(ValueError, match="delete"):
        sd.prepare_scenes(tmp_path, sizes={"train": 4, "test": 2}, quiet=True)


@pytest.mark.parametrize("text", ["777", "0x10", "axb", "20x20", "5000x64"])
def test_bad_scene_sizes_are_refused(text):
    with pytest.raises(ValueError):
        sd.parse_size(text)


def test_scene_size_is_width_by_height():
    assert sd.parse_size("777x333") == (333, 777)
