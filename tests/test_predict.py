"""Dense prediction: bucketed, padded, cropped results against the unpadded FCN run directly."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import zoo
from convert import DensePredictor, to_fcn
from convert.predict import bucket_ladder
from zoo.layers import Activation, Flatten, MaxPool


@functools.lru_cache(maxsize=None)
def mnist_fcn():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(
        nnx.Conv(1, 8, (3, 3), padding="VALID", rngs=rngs), Activation("relu"), MaxPool(2),
        nnx.Conv(8, 8, (3, 3), padding="VALID", rngs=rngs), Activation("relu"), MaxPool(2),
        Flatten(), nnx.Linear(5 * 5 * 8, 16, rngs=rngs), Activation("relu"), nnx.Linear(16, 10, rngs=rngs))
    return to_fcn(model, (28, 28, 1))


def same_fcn():
    rngs = nnx.Rngs(1)
    features = nnx.Sequential(nnx.Conv(3, 4, (3, 3), padding="SAME", rngs=rngs), Activation("relu"),
                              nnx.Conv(4, 6, (3, 3), strides=2, padding="SAME", rngs=rngs))
    head = zoo.dense_head("avg", 6, 3, rngs=rngs)
    return to_fcn(zoo.Classifier(features, head, input_shape=(16, 16, 3), min_size=(16, 16), name="same"))


def test_bucketed_result_equals_the_unpadded_computation_exactly():
    fcn = mnist_fcn()
    predictor = DensePredictor(fcn, ratio=1.5)
    assert predictor.bucketing  # VALID network
    rng = np.random.default_rng(0)
    sizes = [(28, 28), (29, 41), (57, 30), (64, 64), (63, 66), (100, 31), (31, 100)]
    for h, w in sizes:
        image = rng.random((h, w, 1)).astype(np.float32)
        result = predictor.predict(image)
        direct = np.asarray(fcn(jnp.asarray(image)[None]))[0]
        assert result.scores.shape == direct.shape
        # Same windows, no padding seen; only XLA's summation order may differ between shapes.
        np.testing.assert_allclose(result.scores, direct, rtol=0, atol=1e-6)
        assert result.bucket[0] >= h - 3 and result.bucket[1] >= w - 3
    touched = {predictor.bucket_for(*predictor.used_size(h, w)) for h, w in sizes}
    assert predictor.compilations == len(touched) < len(sizes)
    before = predictor.compilations
    predictor.predict(rng.random((30, 29, 1)).astype(np.float32))  # same bucket as (29, 41)? reuses any seen one
    assert predictor.compilations <= before + 1


def test_bucket_ladder_is_geometric_and_stride_aligned():
    ladder = bucket_ladder(28, 4, 1024, 1.25)
    assert ladder[0] == 28 and ladder[-1] >= 1024
    assert all((s - 28) % 4 == 0 for s in ladder)
    assert len(ladder) < 25
    ratios = [b / a for a, b in zip(ladder[5:], ladder[6:])]
    assert max(ratios) < 1.3


def test_same_padded_networks_are_not_bucketed_by_default():
    fcn = same_fcn()
    assert not fcn.geometry.valid
    predictor = DensePredictor(fcn)
    assert not predictor.bucketing
    image = np.random.default_rng(1).random((21, 19, 3)).astype(np.float32)
    result = predictor.predict(image)
    np.testing.assert_allclose(result.scores, np.asarray(fcn(jnp.asarray(image)[None]))[0], rtol=0, atol=1e-6)
    assert result.bucket == (21, 19)
    score_map = DensePredictor(fcn, score_map=True).predict(image)
    assert score_map.scores.shape[:2] == (11, 10)  # one cell per backbone position (SAME, stride 2)


@pytest.mark.parametrize("bad,match", [
    (np.full((30, 30, 1), np.nan, np.float32), "NaN or infinite"),
    (np.ones((30, 30, 3), np.float32), "expects 1 channel"),
    (np.ones((20, 40, 1), np.float32), "at least 26x26"),  # 28 -> 26 -> 13 -> 11 -> 5 leaves 2 rows unused
    (np.array([["a"]]), "numeric"),
])
def test_bad_images_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        DensePredictor(mnist_fcn()).predict(bad)


def test_heatmap_png_and_cli(tmp_path, capsys):
    from zoo import saving
    from zoo.cli import main

    model = zoo.create_model("lenet5", num_classes=10, rngs=0)
    saving.save_model(model, tmp_path / "clf", model_name="lenet5", kwargs={"num_classes": 10})
    pixels = (np.random.default_rng(0).random((70, 90)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "digits.png")
    out = tmp_path / "heat.png"
    assert main(["predict-dense", str(tmp_path / "clf"), str(tmp_path / "digits.png"), "--out", str(out),
                 "--class", "3"]) == 0
    text = capsys.readouterr().out
    assert "70x90 px" in text and "compilation" in text
    with Image.open(out) as img:
        assert img.size[0] > 200 and img.size[1] > 100
    # The same through a converted checkpoint.
    assert main(["convert", str(tmp_path / "clf"), "--out", str(tmp_path / "fcn")]) == 0
    assert main(["predict-dense", str(tmp_path / "fcn"), str(tmp_path / "digits.png"), "--json"]) == 0
    assert '"compilations": 1' in capsys.readouterr().out


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from zoo.cli import main

    (tmp_path / "notes.png").write_text("not an image")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(small)
    cases = [(tmp_path / "notes.png", "not an image"), (small, "at least 32x32"), (tmp_path / "missing.png", "not found")]
    for path, message in cases:
        assert main(["predict-dense", "lenet5", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith("warning: lenet5 is a registry name")
        assert len(err) == 2 and message in err[1], err
    # An RGB image for a grayscale model reaches it as gray (the one image reader), not refused.
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(rgb)
    assert main(["predict-dense", "lenet5", str(rgb), "--json"]) == 0
    assert '"image_size": [\n    40,\n    40\n  ]' in capsys.readouterr().out


def test_persistent_compilation_cache_writes_executables(tmp_path):
    import subprocess
    import sys

    code = ("import convert, jax, jax.numpy as jnp; convert.enable_compilation_cache(%r); "
            "jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()" % str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert any((tmp_path / "cache").iterdir())


GRAY = np.linspace(0, 1, 48 * 40).reshape(40, 48).astype(np.float32)


def _image_in_mode(mode: str):
    from PIL import Image

    g8 = np.round(GRAY * 255).astype(np.uint8)
    if mode == "I;16":
        return Image.fromarray(np.round(GRAY * 65535).astype(np.uint16))  # mode I;16
    if mode == "F":
        return Image.fromarray(GRAY, "F")
    if mode == "I":
        return Image.fromarray(np.round(GRAY * 65535).astype(np.int32), "I")
    gray = Image.fromarray(g8, "L")
    if mode in ("RGBA", "LA"):
        return gray.convert(mode)  # opaque
    return gray.convert(mode)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_image_mode_reaches_the_network_with_the_same_values(mode, tmp_path):
    """The one reader gives the same [0, 1] gray for the same picture stored in any mode Pillow writes."""
    from convert.predict import read_image

    path = tmp_path / f"x.{'tiff' if mode in ('I;16', 'I', 'F', 'CMYK') else 'png'}"
    _image_in_mode(mode).save(path)
    array, notes = read_image(path, 1)
    assert array.shape == (40, 48, 1) and array.dtype == np.float32, notes
    np.testing.assert_allclose(array[..., 0], GRAY, atol=1.01 / 255)
    rgb, _ = read_image(path, 3)
    assert rgb.shape == (40, 48, 3)


def test_a_multi_frame_file_gives_its_first_frame(tmp_path):
    from PIL import Image

    from convert.predict import read_image

    frames = [Image.fromarray(np.full((20, 30), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "two.tiff", save_all=True, append_images=frames[1:])
    array, notes = read_image(tmp_path / "two.tiff", 1)
    assert notes["frames"] == "first of 2" and np.allclose(array, 10 / 255)
