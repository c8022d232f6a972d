"""Segmentation: digit_scenes, the FCN decoders, the shipped weights, and `zoo segment` on bad input.

Reference points from outside the code under test: the raw MNIST arrays (which digits a scene
may hold), `jax.image.resize` and a numpy tent filter (bilinear interpolation), the converted
classifier of `convert` (the score layer), and the mean IU recorded when the weights were trained.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from train import segment as seg
from train import segment_data as sd
from train import segment_models as sm


@pytest.fixture(scope="module")
def mnist():
    from train import data

    try:
        data.prepare("mnist", quiet=True)
    except Exception as e:  # no installer access: say how to get the data
        pytest.skip(f"mnist is not prepared and could not be prepared here ({e}); run `zoo data prepare mnist`")
    return {split: sd.mnist_digits(split) for split in ("train", "test")}


@pytest.fixture(scope="module")
def converted():
    import zoo
    from convert.fcn import to_fcn

    classifier = zoo.create_model("mnistnet", rngs=3)
    classifier.eval()
    return to_fcn(classifier)


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


# ---------------------------------------------------------------------------------------------
# models


def _tent_weights(length: int, factor: int) -> np.ndarray:
    """(length * factor, length): bilinear weights with half-pixel centres, zero outside the input."""
    coords = (np.arange(length * factor) + 0.5) / factor - 0.5
    return np.maximum(0.0, 1.0 - np.abs(coords[:, None] - np.arange(length)[None, :]))


def _tent_upsample(x: np.ndarray, factor: int) -> np.ndarray:
    rows, cols = _tent_weights(x.shape[1], factor), _tent_weights(x.shape[2], factor)
    return np.einsum("pi,qj,nijc->npqc", rows, cols, x.astype(np.float64))


@pytest.mark.parametrize("factor", [2, 4])
def test_bilinear_transposed_conv_is_bilinear_interpolation(factor):
    x = np.random.default_rng(factor).standard_normal((2, 5, 7, 3)).astype(np.float32)
    up = np.asarray(sm.TransposedConv(3, factor)(jnp.asarray(x)))
    assert up.shape == (2, 5 * factor, 7 * factor, 3)
    np.testing.assert_allclose(up, _tent_upsample(x, factor), atol=1e-5)
    # Where no zero padding is involved, it equals jax.image.resize's bilinear (half-pixel centres).
    resized = np.asarray(jax.image.resize(jnp.asarray(x), (2, 5 * factor, 7 * factor, 3), "linear"))
    inner = slice(factor // 2, -(factor // 2))
    np.testing.assert_allclose(up[:, inner, inner], resized[:, inner, inner], atol=1e-5)


@pytest.mark.parametrize("variant", list(sm.VARIANTS))
@pytest.mark.parametrize("size", [(29, 31), (45, 67), (64, 33)])
def test_decoders_give_one_score_vector_per_pixel(converted, variant, size):
    model = sm.grow_from_classifier(converted, variant, mean=0.13, std=0.31)
    out = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((2, *size, 1), jnp.float32))
    assert out.shape == (2, *size, 11)


def test_output_strides_are_the_documented_ones(converted):
    strides = {v: sm.grow_from_classifier(converted, v, mean=0.0, std=1.0).output_strides for v in sm.VARIANTS}
    assert strides["fcn32s"] == {"score": 4, "final_upsampling": 4}
    assert strides["fcn16s"] == {"score": 4, "skip1": 2, "final_upsampling": 2}
    assert strides["fcn8s"] == {"score": 4, "skip1": 2, "skip2": 1, "final_upsampling": 1}


def test_score_layer_is_the_converted_classifier(converted):
    mean, std = 0.1307, 0.3081
    x = np.random.default_rng(0).random((1, 64, 80, 1)).astype(np.float32)
    reference = np.asarray(converted((x - mean) / std))            # VALID: one cell per 28x28 window
    baseline = np.asarray(sm.ConvertedClassifierScores(converted, mean=mean, std=std).coarse_scores(jnp.asarray(x)))
    np.testing.assert_allclose(baseline[:, 3:-3, 3:-3], reference, atol=1e-4)
    grown = sm.grow_from_classifier(converted, "fcn8s", mean=mean, std=std)
    coarse = np.asarray(grown.coarse_scores(jnp.asarray(x)))
    np.testing.assert_allclose(coarse[..., :10], baseline, atol=1e-5)
    assert np.all(coarse[..., 10] == 0)  # the background filter starts at zero
    # Skips start at zero (the paper's initialization): FCN-16s/8s add nothing to the coarse path yet.
    assert all(np.all(np.asarray(s.kernel[...]) == 0) for s in grown.skip_scores)


def test_metrics_against_a_hand_count():
    labels = np.array([[0, 0, 10, 255], [1, 1, 10, 10]])
    predicted = np.array([[0, 1, 10, 3], [1, 1, 0, 10]])
    scores = seg.scores_from(seg.confusion(labels, predicted))
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; background: tp 2, fn 1 -> 2/3
    assert scores["pixel_accuracy"] == pytest.approx(5 / 7)
    assert scores["mean_iou"] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)


def test_tiles_give_the_untiled_answer(converted, monkeypatch):
    model = sm.grow_from_classifier(converted, "fcn8s", mean=0.13, std=0.31)
    rng = np.random.default_rng(1)
    for s in model.skip_scores:  # non-zero skips so every path reaches the output
        s.kernel.set_value(jnp.asarray(rng.standard_normal(s.kernel.shape) * 0.1, jnp.float32))
    image = sd.generate_scene("test", 2, size=(150, 230)).image / 255.0
    # Tiles see black background beyond the image's edges (TILE_MARGIN of it): so does this run.
    m = seg.TILE_MARGIN
    framed = np.pad(image, m)[None, ..., None].astype(np.float32)
    whole = np.asarray(model(jnp.asarray(framed)))[0, m:-m, m:-m]
    monkeypatch.setattr(seg, "TILE", 96)
    predictor = seg.SegmentPredictor(model)
    tiled = predictor.predict(image)
    assert predictor.compilations == 1  # every tile runs at one bucket
    np.testing.assert_allclose(tiled, whole, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# shipped weights


SHIPPED = sorted(p for p in Path(seg._weights_paths("fcn8s", "x")[0]).parent.glob("fcn*s-*.json"))


def test_segmentation_weights_are_shipped():
    assert any(p.name == f"fcn8s-{seg.DEFAULT_TAG}.json" for p in SHIPPED), "no shipped FCN-8s weights"


@pytest.mark.parametrize("meta_path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_weights_reproduce_their_recorded_mean_iou(mnist, meta_path):
    meta = json.loads(meta_path.read_text())
    data = (meta_path.parent / meta["weights_file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == meta["sha256"] and len(data) < 2**20
    model = seg.load_shipped(meta["model"], meta["tag"])
    check = meta["check"]
    scenes = [sd.generate_scene("test", i) for i in range(check["scenes"])]
    scenes = [(s.image, s.label) for s in scenes]
    result = seg.evaluate(seg.fcn_labeler(seg.SegmentPredictor(model, ladder=tuple(check["ladder"]))), scenes)
    # Same scenes, same weights: only float summation order may differ between machines, flipping
    # the arg-max of a few near-tie pixels; 0.005 mean IU is about 250 pixels of the rarest class.
    assert result["mean_iou"] == pytest.approx(check["mean_iou"], abs=0.005)
    assert result["pixel_accuracy"] == pytest.approx(check["pixel_accuracy"], abs=0.001)


def test_damaged_segmentation_weights_are_refused(tmp_path):
    if not SHIPPED:
        pytest.skip("no shipped segmentation weights")
    meta = json.loads(SHIPPED[0].read_text())
    for name in (SHIPPED[0].name, meta["weights_file"]):
        (tmp_path / name).write_bytes((SHIPPED[0].parent / name).read_bytes())
    damaged = bytearray((tmp_path / meta["weights_file"]).read_bytes())
    damaged[-1] ^= 0xFF
    (tmp_path / meta["weights_file"]).write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="sha256"):
        seg.load_shipped(meta["model"], meta["tag"], weights_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# reading images and bad input


def _zoo(argv, capsys):
    from zoo.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_not_an_image(tmp_path, capsys):
    path = tmp_path / "notes.png"
    path.write_text("this is text, not a PNG")
    code, output = _zoo(["segment", str(path)], capsys)
    assert code == 2 and "not an image" in output and "Traceback" not in output


def test_truncated_image(tmp_path, capsys):
    full = tmp_path / "full.png"
    Image.fromarray(sd.generate_scene("test", 0, size=(100, 120)).image).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    code, output = _zoo(["segment", str(cut)], capsys)
    assert code == 2 and "truncated" in output


def test_tiny_image(tmp_path, capsys):
    path = tmp_path / "dot.png"
    Image.new("L", (1, 1), 255).save(path)
    code, output = _zoo(["segment", str(path)], capsys)
    assert code == 2 and "at least 28x28" in output


def test_enormous_image_is_refused_before_decoding(tmp_path, capsys):
    path = tmp_path / "huge.png"
    Image.new("L", (9000, 8000)).save(path)  # 72 megapixels, mostly zeros: a small file
    code, output = _zoo(["segment", str(path)], capsys)
    assert code == 2 and "limit" in output and "megapixels" in output


def test_missing_file_and_no_input(tmp_path, capsys):
    code, output = _zoo(["segment", str(tmp_path / "nope.png")], capsys)
    assert code == 2 and "not found" in output
    code, output = _zoo(["segment"], capsys)
    assert code == 2 and "--scene" in output


def test_alpha_channel_becomes_background(tmp_path):
    from train.segment_demo import read_image

    ink = sd.generate_scene("test", 1, size=(60, 90)).image
    rgba = np.zeros((60, 90, 4), np.uint8)
    rgba[..., 0] = 200  # transparent pixels carry a colour that must not show
    rgba[..., 3] = ink  # white ink whose coverage is the alpha channel
    rgba[..., :3][ink > 0] = 255
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    array, notes = read_image(path)
    np.testing.assert_allclose(array, ink / 255.0, atol=1 / 255)
    assert notes["alpha"] == "composited over black" and not notes["inverted"]
    # Dark ink on a transparent sheet: composited over white, then inverted to MNIST's polarity.
    rgba[..., :3] = 0
    Image.fromarray(rgba, "RGBA").save(path)
    array, notes = read_image(path)
    np.testing.assert_allclose(array, ink / 255.0, atol=1 / 255)
    assert notes["alpha"] == "composited over white" and notes["inverted"]


def test_dark_on_light_rgb_is_inverted(tmp_path):
    from train.segment_demo import read_image

    ink = sd.generate_scene("test", 1, size=(60, 90)).image
    path = tmp_path / "paper.jpg"
    Image.fromarray(np.repeat(255 - ink[..., None], 3, -1)).save(path, quality=95)
    array, notes = read_image(path)
    assert notes["inverted"] and np.abs(array - ink / 255.0).mean() < 0.02
