"""Tiled dense prediction against the whole image, lazy readers against Pillow, incremental writers.

References from outside the tiler: the network run directly on the whole image (`fcn(x)` /
`net(x)`), Pillow's own full decode of each file, numpy's own .npy reader.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import convert
import zoo
from convert import tiles
from zoo.layers import Activation, Flatten, MaxPool


@functools.cache
def valid_fcn():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(
        nnx.Conv(1, 8, (3, 3), padding="VALID", rngs=rngs), Activation("relu"), MaxPool(2),
        nnx.Conv(8, 8, (3, 3), padding="VALID", rngs=rngs), Activation("relu"), MaxPool(2),
        Flatten(), nnx.Linear(5 * 5 * 8, 10, rngs=rngs))
    return convert.to_fcn(model, (28, 28, 1))


@functools.cache
def pretrained_fcn(name: str):
    model = zoo.create_model(name, pretrained="mnist")
    model.eval()
    return convert.to_fcn(model)


@functools.cache
def shipped_net():
    return convert.load_shipped_segmentation("mnistnet_fcn8s", "digit_scenes")


def scene(height: int, width: int, index: int = 0) -> np.ndarray:
    from train import digit_scenes

    return digit_scenes.generate_scene("test", index, size=(height, width)).image[..., None].astype(np.float32) / 255


def assert_plan_tiles_the_output(plan, stride):
    for axis in (plan.rows, plan.cols):
        assert [k[0] for k in axis.keep] == [0] + [k[1] for k in axis.keep[:-1]]  # no gap, no overlap
        assert axis.keep[-1][1] == axis.cells
        assert all(s % stride == 0 for s in axis.starts)  # windows on the output grid


def assert_one_tile_shape(predictor):
    """Every tile of an image has one shape: one compilation, two when the last batch is smaller."""
    assert len({bucket[1:] for bucket in predictor.buckets}) == 1 and predictor.compilations <= 2


def test_valid_networks_tile_exactly_with_boundaries_on_the_output_grid():
    image = np.random.default_rng(0).random((203, 171, 1)).astype(np.float32)
    for fcn in (valid_fcn(), pretrained_fcn("lenet5")):  # VALID; LeNet-5 (padded input, VALID convolutions)
        whole = np.asarray(fcn(jnp.asarray(image)[None]))[0]  # the network itself, no predictor
        predictor = convert.DensePredictor(fcn, tile=60)
        plan = predictor.plan(*image.shape[:2])
        assert len(plan) >= 9 and plan.output_size == whole.shape[:2]
        assert_plan_tiles_the_output(plan, fcn.geometry.stride[0])
        tiled = predictor.predict(image).scores
        np.testing.assert_allclose(tiled, whole, rtol=0, atol=2e-6)
        assert_one_tile_shape(predictor)
    # For a VALID net the windows overlap by exactly R - S pixels: no cell is computed twice.
    plan = convert.DensePredictor(valid_fcn(), tile=60).plan(400, 400)
    g = valid_fcn().geometry
    assert np.diff(plan.rows.starts[:-1]).tolist() == [plan.rows.window - g.receptive_field[0] + g.stride[0]] * (
        len(plan.rows.starts) - 2)


def test_same_padded_network_needs_its_halo():
    fcn = pretrained_fcn("mnistnet")  # SAME convolutions: field 46, stride 4
    image = scene(181, 203, 1)  # odd sides: SAME layers pad one more pixel before
    whole = np.asarray(fcn(jnp.asarray(image)[None]))[0]
    exact = convert.DensePredictor(fcn, tile=64)
    assert exact.halo == 21  # (46 - 4) / 2
    np.testing.assert_allclose(exact.predict(image).scores, whole, rtol=0, atol=2e-5)
    assert len(exact.plan(181, 203)) > 4
    assert_one_tile_shape(exact)
    cheap = convert.DensePredictor(fcn, tile=64, halo=8).predict(image).scores
    assert np.abs(cheap - whole).max() > 0.01  # a halo below the field's reach is visibly wrong


def test_segmentation_net_tiles_match_the_whole_image():
    net = shipped_net()
    image = scene(300, 420, 2)
    whole = convert.DensePredictor(net, tile=4096).predict(image)
    predictor = convert.DensePredictor(net, tile=100)
    plan = predictor.plan(300, 420)
    assert plan.window == (128, 128) and len(plan) >= 12
    assert_plan_tiles_the_output(plan, net.total_stride)
    tiled = predictor.predict(image)
    np.testing.assert_allclose(tiled.scores, whole.scores, rtol=0, atol=1e-3)
    assert (tiled.labels() == whole.labels()).all()
    assert_one_tile_shape(predictor)
    # The halo is what makes it equal: without it the tile borders show.
    assert np.abs(convert.DensePredictor(net, tile=100, halo=4).predict(image).scores - whole.scores).max() > 1


def test_plan_rejects_tiles_too_small_for_their_halo():
    with pytest.raises(ValueError, match="too small for the halo|keep no exact cells"):
        convert.DensePredictor(shipped_net(), tile=32, halo=40).plan(500, 500)


def test_batch_of_same_bucket_images_equals_one_by_one():
    net = shipped_net()
    predictor = convert.DensePredictor(net, batch=4)
    images = [scene(h, w, i) for i, (h, w) in enumerate([(90, 100), (85, 110), (96, 128), (81, 97)])]
    batched = predictor.predict_batch(images)
    single = convert.DensePredictor(net)
    for image, result in zip(images, batched):
        np.testing.assert_allclose(result.scores, single.predict(image).scores, rtol=0, atol=1e-4)
    assert predictor.buckets == [(4, 96, 128)]
    with pytest.raises(ValueError, match="one bucket"):
        predictor.predict_batch([scene(90, 100), scene(300, 300)])


# ---------------------------------------------------------------------------------------------
# lazy readers


def _pixels(rng, shape):
    return (rng.random(shape) * 255).astype(np.uint8)


@pytest.mark.parametrize("suffix,mode,options", [
    (".pgm", "L", {}), (".ppm", "RGB", {}), (".bmp", "L", {}), (".bmp", "RGB", {}),
    (".tif", "L", {"tiffinfo": {278: 7}}),  # uncompressed, 7 rows per strip
    (".tif", "RGB", {}),
])
def test_uncompressed_images_are_read_by_rows_as_pillow_decodes_them(tmp_path, suffix, mode, options):
    rng = np.random.default_rng(5)
    pixels = _pixels(rng, (53, 61) if mode == "L" else (53, 61, 3))
    path = tmp_path / f"image{suffix}"
    Image.fromarray(pixels, mode).save(path, **options)
    for channels in (1, 3):
        source = tiles.open_image_source(path, channels)
        assert source.lazy
        reference = convert.predict.read_image(path, channels)[0]  # Pillow's full decode
        np.testing.assert_allclose(source.read_all(), reference, atol=1e-6)
        window = source.read(40, 50, 20, 20)  # beyond the edge reads black
        np.testing.assert_allclose(window[:13, :11], reference[40:, 50:], atol=1e-6)
        assert not window[13:].any() and not window[:, 11:].any()


def test_npy_is_read_by_rows_and_compressed_formats_whole(tmp_path):
    rng = np.random.default_rng(6)
    pixels = _pixels(rng, (40, 30))
    np.save(tmp_path / "gray.npy", pixels)
    source = tiles.open_image_source(tmp_path / "gray.npy", 1)
    assert source.lazy and source.notes["format"] == "npy"
    np.testing.assert_allclose(source.read(5, 7, 10, 9)[..., 0], pixels[5:15, 7:16] / 255.0, atol=1e-7)
    colour = rng.random((20, 25, 3)).astype(np.float32)
    np.save(tmp_path / "colour.npy", colour)
    gray = tiles.open_image_source(tmp_path / "colour.npy", 1).read_all()[..., 0]
    np.testing.assert_allclose(gray, colour @ np.array([0.299, 0.587, 0.114], np.float32), atol=1e-6)
    assert tiles.open_image_source(tmp_path / "gray.npy", 1, invert=True).read(0, 0, 1, 1)[0, 0, 0] == \
        pytest.approx(1 - pixels[0, 0] / 255.0)
    Image.fromarray(pixels).save(tmp_path / "gray.png")
    assert not tiles.open_image_source(tmp_path / "gray.png", 1).lazy  # PNG: one deflate stream, decoded whole


def test_huge_uncompressed_images_open_without_decoding(tmp_path):
    # 15000 x 16000 = 240 megapixels: above Pillow's decompression-bomb limit and read_image's; the
    # file is sparse, so it costs no disk. Only the rows of a window are ever read.
    path = tmp_path / "huge.pgm"
    header = b"P5\n16000 15000\n255\n"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + 15000 * 16000)
        f.seek(len(header) + 14000 * 16000 + 9000)
        f.write(bytes([255, 128]))
    source = tiles.open_image_source(path, 1)
    assert source.lazy and (source.height, source.width) == (15000, 16000)
    window = source.read(13990, 8990, 20, 20)[..., 0]
    assert window[10, 10] == 1.0 and window[10, 11] == pytest.approx(128 / 255) and window.sum() < 1.6
    with pytest.raises(ValueError, match="megapixels"):  # decoded whole, it would be refused
        convert.predict.read_image(path, 1)


@pytest.mark.parametrize("name,damage,match", [
    ("cut.npy", lambda data: data[:-100], "truncated"),
    ("cut.pgm", lambda data: data[:-100], "truncated"),
    ("cut.png", lambda data: data[:len(data) // 2], "truncated"),
    ("junk.npy", lambda data: b"not an array at all", "not a readable .npy"),
])
def test_damaged_files_are_clear_errors(tmp_path, name, damage, match):
    pixels = _pixels(np.random.default_rng(7), (50, 60))
    path = tmp_path / name
    if path.suffix == ".npy":
        np.save(path, pixels)
    else:
        Image.fromarray(pixels).save(path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=match):
        tiles.open_image_source(path, 1).read_all()


def test_npy_sink_writes_blocks_and_appears_only_when_committed(tmp_path):
    final = tmp_path / "out.npy"
    sink = tiles.NpyFileSink(final, (7, 9, 2), np.float32)
    expected = np.arange(7 * 9 * 2, dtype=np.float32).reshape(7, 9, 2)
    sink.write(0, 0, expected[:3])          # whole rows: one write
    sink.write(3, 0, expected[3:, :4])      # a block: row by row
    sink.write(3, 4, expected[3:, 4:])
    assert not final.exists() and sink.path.exists() and sink.path.name.startswith(".out.npy.partial-")
    sink.commit()
    np.testing.assert_array_equal(np.load(final), expected)
    assert not sink.path.exists()
    other = tiles.NpyFileSink(tmp_path / "gone.npy", (3, 3), np.uint8)
    other.abort()
    assert list(tmp_path.iterdir()) == [final]
