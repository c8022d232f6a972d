"""Segmentation nets grown from any converted classifier: FCN-32s/16s/8s, the one predictor, the store.

Reference points from outside the code under test: `jax.image.resize` and a numpy tent filter
(bilinear interpolation), the converted classifier of `convert` (the score path must be it), the
input gradient of an output pixel (where the net looks must be where the pixel is: alignment), an
untiled run (tiles), and the mean IU recorded when the shipped weights were trained, re-measured on
regenerated test scenes with a numpy confusion matrix.
"""

from __future__ import annotations

import functools
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax
from PIL import Image

import convert
import zoo
from convert import segment as cs
from zoo import pretrained


def _tent_weights(length: int, factor: int) -> np.ndarray:
    """(length * factor, length): bilinear weights with half-pixel centres, zero outside the input."""
    coords = (np.arange(length * factor) + 0.5) / factor - 0.5
    return np.maximum(0.0, 1.0 - np.abs(coords[:, None] - np.arange(length)[None, :]))


def _tent_upsample(x: np.ndarray, factor: int) -> np.ndarray:
    rows, cols = _tent_weights(x.shape[1], factor), _tent_weights(x.shape[2], factor)
    return np.einsum("pi,qj,nijc->npqc", rows, cols, x.astype(np.float64))


@pytest.mark.parametrize("factor", [16, 32])
def test_large_factors_upsample_as_the_transposed_convolution(factor):
    # TransposedConv runs x16 and x32 on CPU in sub-pixel form; reference: lax's transposed
    # convolution (the dilated form) with a random (not bilinear) kernel, values and gradients.
    layer = cs.TransposedConv(3, factor)
    layer.kernel.set_value(jax.random.normal(jax.random.key(factor), layer.kernel[...].shape))
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 3))
    pad = 2 * factor - 1 - factor // 2

    def dilated(x, k):
        return lax.conv_general_dilated(x, k[::-1, ::-1], (1, 1), [(pad, pad)] * 2, lhs_dilation=(factor, factor),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    k = layer.kernel[...]
    jaxpr = str(jax.make_jaxpr(lambda x: layer(x))(x))
    assert f"lhs_dilation=({factor}, {factor})" not in jaxpr and "conv_bwd_data" not in jaxpr  # sub-pixel form
    np.testing.assert_allclose(layer(x), dilated(x, k), rtol=1e-4, atol=1e-4 * float(jnp.abs(dilated(x, k)).max()))
    ours = functools.partial(cs._subpixel_upsample, f=factor)  # what the layer runs, with k as an argument
    loss = lambda up: lambda x, k: jnp.sum(jnp.sin(up(x, k)))  # noqa: E731
    for got, want in zip(jax.value_and_grad(loss(ours), argnums=(0, 1))(x, k),
                         jax.value_and_grad(loss(dilated), argnums=(0, 1))(x, k)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("factor", [2, 4, 16])
def test_bilinear_transposed_conv_is_bilinear_interpolation(factor):
    x = np.random.default_rng(factor).standard_normal((2, 5, 7, 3)).astype(np.float32)
    up = np.asarray(cs.TransposedConv(3, factor)(jnp.asarray(x)))
    assert up.shape == (2, 5 * factor, 7 * factor, 3)
    np.testing.assert_allclose(up, _tent_upsample(x, factor), atol=1e-5)
    # Where no zero padding is involved, it equals jax.image.resize's bilinear (half-pixel centres).
    resized = np.asarray(jax.image.resize(jnp.asarray(x), (2, 5 * factor, 7 * factor, 3), "linear"))
    inner = slice(factor // 2, -(factor // 2))
    np.testing.assert_allclose(up[:, inner, inner], resized[:, inner, inner], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# every backbone


def _user_sequential():
    rngs = nnx.Rngs(0)
    pool = functools.partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2))
    return nnx.Sequential(
        nnx.Conv(3, 8, (3, 3), rngs=rngs), jax.nn.relu, pool,
        nnx.Conv(8, 16, (3, 3), rngs=rngs), jax.nn.relu, pool,
        nnx.Conv(16, 16, (3, 3), rngs=rngs), jax.nn.relu, pool,
        lambda x: x.reshape(x.shape[0], -1), nnx.Linear(4 * 4 * 16, 5, rngs=rngs))


# name -> create_model options; small inputs keep the suite quick. Xception grows too (its VALID stem
# sends it down the measured-geometry path: 40 s on this CPU, so it is left out of the suite).
BACKBONES = {
    "vgg16": dict(num_classes=7, input_size=32),
    "resnet18": dict(num_classes=7, input_size=64),
    "efficientnet_b0": dict(num_classes=7, input_size=64),
    "googlenet": dict(num_classes=7, input_size=64),
    "lenet5": dict(num_classes=10, input_size=32, in_channels=1),
    "mnistnet": dict(num_classes=10, in_channels=1),
}


@functools.cache
def _converted(name: str):
    if name == "user_sequential":
        return convert.to_fcn(_user_sequential(), input_shape=(32, 32, 3))
    model = zoo.create_model(name, rngs=1, **BACKBONES[name])
    model.eval()
    return convert.to_fcn(model)


@pytest.mark.parametrize("name", [*BACKBONES, "user_sequential"])
def test_every_backbone_grows_fcn8s_with_one_score_per_pixel(name):
    fcn = _converted(name)
    variant = "fcn8s" if len(fcn.stages) >= 3 else "fcn16s"
    net = cs.grow_segmentation(fcn, variant, num_classes=4)
    net.eval()
    channels = fcn.input_shape[-1]
    for size in ((37, 45), (64, 33)):
        out = jax.eval_shape(lambda x: net(x), jax.ShapeDtypeStruct((2, *size, channels), jnp.float32))
        assert out.shape == (2, *size, 4)
    # The skips read the stages of stride S/2 and S/4, as in the paper (pool4, pool3 for VGG-16).
    strides = net.output_strides
    assert strides["score"] == fcn.stages[-1].stride
    assert [strides[k] for k in strides if k.startswith("skip")] == [strides["score"] // 2, strides["score"] // 4][:net.skips]


def test_vgg16_fcn8s_is_the_papers_network_and_one_step_lowers_the_loss():
    fcn = _converted("vgg16")
    net = cs.grow_segmentation(fcn, "fcn8s", num_classes=5)
    assert [s.name for s in net.skip_stages] == ["pool4", "pool3"]
    assert net.output_strides == {"score": 32, "skip1": 16, "skip2": 8, "final_upsampling": 8}
    # fc6 (a 1x1 conv at this 32 px training size), fc7 and the new 5-class score conv, with dropout.
    convs = [m for m in net.score if isinstance(m, nnx.Conv)]
    assert [c.out_features for c in convs] == [4096, 4096, 5]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((2, 45, 53, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, (2, 45, 53)))
    net.eval()
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    tx = optax.sgd(1e-3, momentum=0.9)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params, rest)(x)
        assert logits.shape == (2, 45, 53, 5)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    params, opt_state, first = step(params, opt_state)
    _, _, second = step(params, opt_state)
    assert float(second) < float(first)


@pytest.mark.parametrize("name", ["mnistnet", "resnet18"])
def test_score_path_is_the_converted_classifier(name):
    """Inside the image, the coarse scores are the converted classifier's, shifted by fc6's half kernel."""
    fcn = _converted(name)
    net = cs.grow_segmentation(fcn, "fcn8s", num_classes=fcn.num_classes + 1)
    net.eval()
    s = fcn.stages[-1].stride
    h, w = (-(-(n + k * s) // s) * s for n, k in zip(fcn.input_shape[:2], (2, 3)))  # multiples of s
    x = np.random.default_rng(0).random((1, h, w, fcn.input_shape[-1])).astype(np.float32)
    coarse = np.asarray(net.coarse_scores(jnp.asarray(x)))
    if fcn.pool == "flatten":  # the VALID fc6 judges windows; the centred copy puts cell k at k + (K-1)/2
        reference = np.asarray(fcn(jnp.asarray(x)))
        k = fcn.feature_shape[0]
        inner = coarse[:, (k - 1) // 2:(k - 1) // 2 + reference.shape[1], (k - 1) // 2:(k - 1) // 2 + reference.shape[2]]
    else:  # avg heads: the Dense as a 1x1 conv on every cell of the last map
        reference, inner = np.asarray(fcn.score_map(jnp.asarray(x))), coarse
    np.testing.assert_allclose(inner[..., :fcn.num_classes], reference, atol=1e-4)
    assert np.all(coarse[..., fcn.num_classes] == 0)  # the new class's filter starts at zero
    assert all(np.all(np.asarray(k.kernel[...]) == 0) for k in net.skip_scores)  # skips start at zero


@pytest.mark.parametrize("name", ["lenet5", "mnistnet"])
@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s"])
def test_an_output_pixel_looks_where_it_is(name, variant):
    """Alignment (the paper's crops), from the input gradient: its centroid must sit on the pixel.

    LeNet-5 is VALID (its maps shrink and shift; the crops come from each stage's geometry), mnistnet
    SAME-padded. Skips get random weights so every path reaches the output.
    """
    fcn = _converted(name)
    net = cs.grow_segmentation(fcn, variant, num_classes=fcn.num_classes + 1)  # the class filters kept: live
    net.eval()
    rng = np.random.default_rng(2)
    for k in net.skip_scores:
        k.kernel.set_value(jnp.asarray(rng.standard_normal(k.kernel.shape) * 0.1, jnp.float32))
    x = jnp.asarray(rng.random((1, 96, 96, 1)), jnp.float32)
    for row, col in ((40, 50), (57, 33)):
        grad = jax.grad(lambda x: net(x)[0, row, col].sum())(x)[0, ..., 0]
        weight = np.abs(np.asarray(grad))
        ys, xs = np.mgrid[:96, :96]
        centroid = (float((weight * ys).sum() / weight.sum()), float((weight * xs).sum() / weight.sum()))
        assert abs(centroid[0] - row) < 2.0 and abs(centroid[1] - col) < 2.0, (name, variant, centroid)


def test_staged_growth_keeps_what_the_coarser_net_learned():
    fcn = _converted("mnistnet")
    net32 = cs.grow_segmentation(fcn, "fcn32s", num_classes=11)
    for leaf in jax.tree.leaves(nnx.state(net32.score, nnx.Param)):
        assert leaf is not None
    net32.score[-1].bias.set_value(net32.score[-1].bias[...] + 1.5)  # "training"
    net16 = cs.grow_from(net32, "fcn16s")
    net8 = cs.grow_from(net16, "fcn8s")
    np.testing.assert_array_equal(np.asarray(net16.score[-1].bias[...]), np.asarray(net32.score[-1].bias[...]))
    assert net8.variant == "fcn8s" and len(net8.skip_scores) == 2
    x = jnp.asarray(np.random.default_rng(3).random((1, 40, 44, 1)), jnp.float32)
    # Zero skips: FCN-16s's first answer is FCN-32s's, up to two bilinear steps against one.
    np.testing.assert_allclose(np.asarray(net16.coarse_scores(x)), np.asarray(net32.coarse_scores(x)), atol=1e-6)


def test_save_and_load_give_the_same_net(tmp_path):
    model = zoo.create_model("mnistnet", rngs=1, num_classes=10, in_channels=1)
    model.eval()
    net = cs.grow_segmentation(convert.to_fcn(model), "fcn16s", num_classes=11,
                               preprocessing={"scale": 1 / 255, "mean": [0.13], "std": [0.31]},
                               backbone={"model": "mnistnet", "kwargs": {"num_classes": 10, "in_channels": 1}})
    net.skip_scores[0].bias.set_value(jnp.arange(11, dtype=jnp.float32))
    cs.save_segmentation(net, tmp_path / "net", metadata={"class_names": list("abcdefghijk")})
    loaded = cs.load_segmentation(tmp_path / "net")
    x = jnp.asarray(np.random.default_rng(4).random((1, 50, 61, 1)), jnp.float32)
    net.eval()
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(net(x)), atol=1e-6)
    user = cs.grow_segmentation(_converted("user_sequential"), "fcn8s", num_classes=3)
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        cs.save_segmentation(user, tmp_path / "user")


def test_missing_skip_stages_are_refused():
    from zoo.stages import Stage

    stages = [Stage("a", 2, 3), Stage("b", 8, 4), Stage("c", 16, 5)]
    assert cs.pick_skip_stages(stages, 1) == [stages[1]]
    with pytest.raises(ValueError, match="fewer skips"):  # no stride-4 stage for the second skip
        cs.pick_skip_stages(stages, 2)


# ---------------------------------------------------------------------------------------------
# the one predictor


def test_tiles_give_the_untiled_answer():
    fcn = _converted("mnistnet")
    net = cs.grow_segmentation(fcn, "fcn8s", num_classes=11)
    rng = np.random.default_rng(1)
    for k in net.skip_scores:  # non-zero skips so every path reaches the output
        k.kernel.set_value(jnp.asarray(rng.standard_normal(k.kernel.shape) * 0.1, jnp.float32))
    net.eval()
    image = (rng.random((150, 230, 1)) > 0.8).astype(np.float32)
    predictor = convert.DensePredictor(net, tile=96)
    # The whole-image run: the net on the image padded with black to its bucket (160x240), cropped.
    rows, cols = predictor.bucket_for(150, 230)
    whole = np.asarray(net(jnp.asarray(np.pad(image, ((0, rows - 150), (0, cols - 230), (0, 0)))[None])))[0, :150, :230]
    tiled = predictor.predict(image)
    assert predictor.compilations == 1  # every tile runs at one bucket
    assert tiled.scores.shape == (150, 230, 11)
    np.testing.assert_allclose(tiled.scores, whole, atol=1e-3)
    small = convert.DensePredictor(net).predict(image[:70, :90])
    assert small.scores.shape == (70, 90, 11) and small.labels().shape == (70, 90)


def test_a_uint8_array_reaches_the_net_as_the_same_image_file_does(tmp_path):
    from convert.predict import read_image

    net = cs.grow_segmentation(_converted("mnistnet"), "fcn16s", num_classes=11)
    net.eval()
    pixels = (np.random.default_rng(5).random((40, 52)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    predictor = convert.DensePredictor(net)
    from_file = predictor.predict(read_image(tmp_path / "x.png", 1)[0]).scores
    np.testing.assert_allclose(predictor.predict(pixels).scores, from_file, atol=1e-6)
    with pytest.raises(ValueError, match="no known range"):
        predictor.predict(pixels.astype(np.int32))


# ---------------------------------------------------------------------------------------------
# the one weight store


SHIPPED = pretrained.shipped("segmentation")


def test_segmentation_nets_are_shipped_beside_the_classifiers():
    names = {name for name, _ in SHIPPED}
    assert {"mnistnet_fcn32s", "mnistnet_fcn16s", "mnistnet_fcn8s"} <= names
    for name, tag in SHIPPED:
        meta = pretrained.metadata(name, tag)
        assert meta["format"] == pretrained.FORMAT and meta["kind"] == "segmentation"
        data = (pretrained.WEIGHTS_DIR / meta["weights_file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"] and len(data) < 2**20
        assert len(meta["class_names"]) == meta["segmentation"]["num_classes"]


@pytest.mark.parametrize("name,tag", SHIPPED, ids=[f"{n}-{t}" for n, t in SHIPPED])
def test_shipped_nets_reproduce_their_recorded_mean_iou(name, tag):
    from train import digit_scenes, tasks

    meta = pretrained.metadata(name, tag)
    check = meta["check"]
    net = cs.load_shipped_segmentation(name, tag)
    predictor = convert.DensePredictor(net)
    matrix = np.zeros((net.num_classes, net.num_classes), np.int64)
    for index in range(check["images"]):
        scene = digit_scenes.generate_scene("test", index)
        labels = predictor.predict(scene.image[..., None] / 255.0).labels()
        matrix += tasks.confusion(scene.label, labels, net.num_classes)
    scores = tasks.scores_from_confusion(matrix)
    # Same scenes, same weights: only float summation order may differ between machines, flipping
    # the arg-max of a few near-tie pixels; 0.005 mean IU is about 250 pixels of the rarest class.
    assert scores["mean_iou"] == pytest.approx(check["mean_iou"], abs=0.005)
    assert scores["pixel_accuracy"] == pytest.approx(check["pixel_accuracy"], abs=0.001)


def test_damaged_segmentation_weights_are_refused(tmp_path):
    name, tag = SHIPPED[0]
    meta = pretrained.metadata(name, tag)
    for file in (f"{name}-{tag}.json", meta["weights_file"]):
        (tmp_path / file).write_bytes((pretrained.WEIGHTS_DIR / file).read_bytes())
    damaged = bytearray((tmp_path / meta["weights_file"]).read_bytes())
    damaged[-1] ^= 0xFF
    (tmp_path / meta["weights_file"]).write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="sha256"):
        cs.load_shipped_segmentation(name, tag, weights_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# reading images and `zoo segment` on bad input


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
    Image.fromarray((np.random.default_rng(0).random((100, 120)) * 255).astype(np.uint8)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    code, output = _zoo(["segment", str(cut)], capsys)
    assert code == 2 and "truncated" in output


def test_enormous_image_is_refused_before_decoding(tmp_path, capsys):
    path = tmp_path / "huge.png"
    Image.new("L", (9000, 8000)).save(path)  # 72 megapixels, mostly zeros: a small file
    code, output = _zoo(["segment", str(path)], capsys)
    assert code == 2 and "limit" in output and "megapixels" in output


def test_missing_file_no_input_and_unknown_model(tmp_path, capsys):
    code, output = _zoo(["segment", str(tmp_path / "nope.png")], capsys)
    assert code == 2 and "not found" in output
    code, output = _zoo(["segment"], capsys)
    assert code == 2 and "--scene" in output
    code, output = _zoo(["segment", "--scene", "100x80", "--model", "nonesuch_fcn8s"], capsys)
    assert code == 2 and "shipped" in output


def test_alpha_channel_becomes_background(tmp_path):
    from convert.predict import read_image

    ink = (np.random.default_rng(1).random((60, 90)) > 0.7).astype(np.uint8) * 255
    rgba = np.zeros((60, 90, 4), np.uint8)
    rgba[..., 0] = 200  # transparent pixels carry a colour that must not show
    rgba[..., 3] = ink  # white ink whose coverage is the alpha channel
    rgba[..., :3][ink > 0] = 255
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    array, notes = read_image(path, 1, invert=None)
    np.testing.assert_allclose(array[..., 0], ink / 255.0, atol=1 / 255)
    assert notes["alpha"] == "composited over black" and not notes["inverted"]
    # Dark ink on a transparent sheet: composited over white, then inverted to MNIST's polarity.
    rgba[..., :3] = 0
    Image.fromarray(rgba, "RGBA").save(path)
    array, notes = read_image(path, 1, invert=None)
    np.testing.assert_allclose(array[..., 0], ink / 255.0, atol=1 / 255)
    assert notes["alpha"] == "composited over white" and notes["inverted"]


def test_segment_a_scene_end_to_end(tmp_path, capsys):
    out = tmp_path / "scene.png"
    code, output = _zoo(["segment", "--scene", "200x120", "--seed", "1", "--out", str(out), "--json"], capsys)
    assert code == 0, output
    report = json.loads(output)
    assert report["mean_iou"] > 0.5 and report["compilations"] >= 1
    with Image.open(out) as picture:
        assert picture.size[0] > 400
