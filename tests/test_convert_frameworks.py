"""Classifiers as people write them, converted: any NNX forward pass, Flax Linen, Keras files.

The reference is always the source framework running its own model: the NNX module's
`__call__`, `linen_module.apply(variables, x)`, Keras's `predict` (JAX backend). At the
training size the FCN's one cell equals the classifier's output; for VALID networks every
cell of a larger image equals the classifier run on the training-size window at
(i * stride, j * stride). SAME networks differ at the window borders (the classifier sees
zero padding where the FCN sees the neighbouring pixels); that difference is reported, as
in docs/BENCHMARKS.md's border study, not asserted away.
"""

from __future__ import annotations

import json
import os
import zipfile
from functools import partial

os.environ.setdefault("KERAS_BACKEND", "jax")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import convert  # noqa: E402
from convert import ConversionError, to_fcn  # noqa: E402

TOL = 1e-5


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def images(shape, n=2, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, *shape))


def training_windows(fcn, x, size):
    """(cells (M, K), windows (M, H, W, C)): every cell whose training-size window at (i*S, j*S) fits in x."""
    out = np.asarray(fcn(x))
    stride = fcn.geometry.stride
    cells, windows = [], []
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            top, left = i * stride[0], j * stride[1]
            if top + size[0] <= x.shape[1] and left + size[1] <= x.shape[2]:
                cells.append(out[0, i, j])
                windows.append(np.asarray(x[0, top:top + size[0], left:left + size[1]]))
    return np.stack(cells), np.stack(windows)


# ---------------------------------------------------------------- Flax NNX: any __call__
class TutorialCNN(nnx.Module):
    """The CNN of Flax's NNX MNIST tutorial, narrower; `pool="mean"` swaps the flatten for a global average."""

    def __init__(self, *, padding="SAME", pool="flatten", rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), padding=padding, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), padding=padding, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        side = 7 if padding == "SAME" else 5
        self.linear1 = nnx.Linear(side * side * 16 if pool == "flatten" else 16, 32, rngs=rngs)
        self.linear2 = nnx.Linear(32, 10, rngs=rngs)
        self.pool = pool

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.conv1(x)))
        x = self.avg_pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1) if self.pool == "flatten" else x.mean(axis=(1, 2))
        x = nnx.relu(self.linear1(x))
        return self.linear2(x)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("pool", ["flatten", "mean"])
def test_tutorial_cnn_converts_unchanged(padding, pool):
    model = TutorialCNN(padding=padding, pool=pool, rngs=nnx.Rngs(0))
    fcn = to_fcn(model, (28, 28, 1))
    x = images((28, 28, 1))
    assert fcn(x).shape == (2, 1, 1, 10)
    assert max_diff(fcn(x)[:, 0, 0], model(x)) <= TOL
    ops = [s["op"] for s in fcn.describe()]
    assert ops[0] == ("flatten_head" if pool == "flatten" else "avg_head") and ops.count("conv") == 2
    if padding == "VALID":
        big = images((28 + 2 * 4 + 1, 28 + 3 * 4 + 2, 1), n=1, seed=2)
        cells, windows = training_windows(fcn, big, (28, 28))
        assert len(cells) == 3 * 4 and fcn.geometry.valid and fcn.geometry.offset == (0, 0)
        assert max_diff(cells, model(jnp.asarray(windows))) <= TOL


def test_same_tutorial_cnn_geometry_and_border_difference():
    """SAME: stride and field by hand; cells differ from cut-out windows only through the border padding."""
    model = TutorialCNN(padding="SAME", rngs=nnx.Rngs(0))
    fcn = to_fcn(model, (28, 28, 1))
    g = fcn.geometry
    # conv 3: r 3, a -1; pool 2: r 4, j 2; conv 3: r 8, a -1 - 2 = -3; pool 2: r 10, j 4;
    # linear1 as a 7x7 conv at stride 4: r 10 + 6 * 4 = 34.
    assert (g.stride, g.receptive_field, g.offset, g.valid) == ((4, 4), (34, 34), (-3, -3), False)
    big = images((28 + 3 * 4, 28 + 3 * 4, 1), n=1, seed=3)
    cells, windows = training_windows(fcn, big, (28, 28))
    reference = np.asarray(model(jnp.asarray(windows)))
    diff = np.abs(cells - reference)
    agree = float(np.mean(cells.argmax(-1) == reference.argmax(-1)))
    print(f"\nNNX tutorial CNN (SAME), 28 px, {len(cells)} cells on 40x40: max |diff| {diff.max():.3g}, "
          f"mean {diff.mean():.3g}, max/std {diff.max() / reference.std():.3f}, argmax agree {agree:.0%}")
    assert diff.max() > 1e-4  # the border padding matters: the cells are not cut-out windows


def test_traced_backbone_jits_and_trains():
    """The backbone is the user's code on the user's weights: jit gives the same numbers, gradients reach it."""
    model = TutorialCNN(padding="VALID", rngs=nnx.Rngs(1))
    fcn = to_fcn(model, (28, 28, 1))
    x = images((33, 37, 1), n=1)
    expected = np.asarray(fcn(x))
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(fcn, x)), expected, atol=1e-6)
    grads = nnx.grad(lambda m: m(x).sum())(fcn)
    conv1 = [float(jnp.abs(g).sum()) for path, g in jax.tree_util.tree_leaves_with_path(grads)
             if "'conv1'" in jax.tree_util.keystr(path) and "'kernel'" in jax.tree_util.keystr(path)]
    assert len(conv1) == 1 and conv1[0] > 0
    model.conv1.kernel.set_value(model.conv1.kernel.get_value() * 0)  # the FCN holds a copy
    np.testing.assert_array_equal(np.asarray(fcn(x)), expected)


class Net(nnx.Module):
    """A convolution and a Dense, with the code between them given as `forward(self, map)`."""

    def __init__(self, forward, *, width=6 * 6 * 4, seed=0):
        rngs = nnx.Rngs(seed)
        self.conv = nnx.Conv(1, 4, (3, 3), padding="VALID", rngs=rngs)
        self.fc = nnx.Linear(width, 3, rngs=rngs)
        self.forward = forward

    def __call__(self, x):
        return self.forward(self, jax.nn.relu(self.conv(x)))


@pytest.mark.parametrize("forward, message", [
    (lambda m, x: m.fc(x.reshape(x.shape[0], -1)[:, ::-1]), r"\[:, ::-1\].*mixes the positions"),
    (lambda m, x: m.fc(x.max(axis=(1, 2))), r"reduce_max.*neither a row-major flatten nor a global average pool"),
    (lambda m, x: m.fc(x.reshape(x.shape[0], -1) - x.reshape(x.shape[0], -1).mean(axis=0)), "mixes the images"),
    (lambda m, x: x.mean(axis=(1, 2)), r"no Dense layer .*x\.mean\(axis=\(1, 2\)\)"),
    (lambda m, x: x, "is not a classifier"),
], ids=["positions", "max", "batch", "no_dense", "no_logits"])
def test_unconvertible_forward_passes_name_the_operation_and_line(forward, message):
    width = 4 if "max" in message else 6 * 6 * 4
    with pytest.raises(ConversionError, match=message):
        to_fcn(Net(forward, width=width), (8, 8, 1))


# ---------------------------------------------------------------- Flax Linen
class LinenCNN(nn.Module):
    """The CNN of Flax's Linen MNIST example (examples/mnist/train.py), narrower."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=8, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=16, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(features=32)(x)
        x = nn.relu(x)
        return nn.Dense(features=10)(x)


class LinenBatchNormCNN(nn.Module):
    """VALID convolutions, BatchNorm with a `train` argument, global average pool."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(features=8, kernel_size=(3, 3), padding="VALID")(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=12, kernel_size=(3, 3), padding="VALID")(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(features=4)(x)


def test_linen_mnist_cnn_converts():
    module = LinenCNN()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    fcn = to_fcn(module, variables, input_shape=(28, 28, 1))
    x = images((28, 28, 1))
    assert max_diff(fcn(x)[:, 0, 0], module.apply(variables, x)) <= TOL
    assert fcn.geometry.stride == (4, 4) and not fcn.geometry.valid


def test_linen_batchnorm_cnn_every_cell_is_its_window():
    module = LinenBatchNormCNN()
    variables = module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, jnp.zeros((1, 16, 16, 3)))
    rng = np.random.default_rng(0)
    variables = {"params": variables["params"],  # statistics that make eval-mode BatchNorm matter
                 "batch_stats": jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32),
                                             variables["batch_stats"])}
    fcn = to_fcn(module, variables, input_shape=(16, 16, 3))
    apply = partial(module.apply, variables, train=False)
    x = images((16, 16, 3))
    assert max_diff(fcn(x)[:, 0, 0], apply(x)) <= TOL
    assert fcn.geometry.valid and fcn.geometry.stride == (2, 2)
    big = images((16 + 2 * 2 + 1, 16 + 3 * 2, 3), n=1, seed=4)
    cells, windows = training_windows(fcn, big, (16, 16))
    assert len(cells) == 3 * 4
    assert max_diff(cells, apply(jnp.asarray(windows))) <= TOL


def test_linen_without_variables_is_one_clear_error():
    with pytest.raises(ValueError, match="Linen module, which holds no weights: pass its variables"):
        to_fcn(LinenCNN(), input_shape=(28, 28, 1))
    with pytest.raises(ValueError, match="'params' collection"):
        to_fcn(LinenCNN(), {"weights": {}}, input_shape=(28, 28, 1))


# ---------------------------------------------------------------- Keras files
@pytest.fixture(scope="module")
def keras():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":  # pragma: no cover
        pytest.skip("the Keras reference runs need KERAS_BACKEND=jax")
    return keras


@pytest.fixture(scope="module")
def trained_keras_mnist(keras, tmp_path_factory):
    """A HOML-style MNIST CNN (VALID), trained 2 epochs on 512 real MNIST digits, saved as .keras."""
    from train.data import load_arrays

    digits, labels = load_arrays("mnist", "train[:512]")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.layers.Input(shape=(28, 28, 1)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(8, 3, activation="relu", kernel_initializer="he_normal"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(16, 3, activation="relu", kernel_initializer="he_normal"),
        keras.layers.BatchNormalization(),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu", kernel_initializer="he_normal"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    history = model.fit(digits.astype(np.float32), labels, batch_size=32, epochs=2, verbose=0)  # 32 steps
    path = tmp_path_factory.mktemp("keras") / "mnist_cnn.keras"
    model.save(path)
    return model, path, digits.astype(np.float32), history.history["loss"]


def softmax(x):
    return np.asarray(jax.nn.softmax(jnp.asarray(x), axis=-1))


def test_trained_keras_mnist_cnn_converts_exactly(keras, trained_keras_mnist, tmp_path):
    model, path, digits, losses = trained_keras_mnist
    assert losses[-1] < losses[0]  # trained: the weights are not their initialization
    fcn = convert.from_keras(path)
    g = fcn.geometry
    assert g.valid and g.stride == (4, 4) and g.offset == (0, 0)
    # A page of four digits side by side, plus a few pixels: its 28x28 windows at stride 4.
    page = np.concatenate([digits[:2], digits[2:4]], axis=2)[:1]  # (1, 28, 56, 1)
    page = np.pad(page, ((0, 0), (0, 5), (0, 2), (0, 0)))
    cells, windows = training_windows(fcn, jnp.asarray(page), (28, 28))
    batch = np.concatenate([digits[:8], windows])  # one predict for both checks
    predicted = model.predict(batch, batch_size=len(batch), verbose=0)
    features = keras.Model(model.inputs, model.layers[-2].output).predict(batch, batch_size=len(batch), verbose=0)
    kernel, bias = model.layers[-1].get_weights()
    logits = features @ kernel + bias  # Keras's last Dense before its softmax, in NumPy

    one_cell = np.asarray(fcn(jnp.asarray(digits[:8])))[:, 0, 0]
    assert max_diff(softmax(one_cell), predicted[:8]) <= TOL
    assert max_diff(one_cell, logits[:8]) <= TOL * max(1.0, float(np.abs(logits).max()))
    assert len(cells) == 2 * 8
    assert max_diff(softmax(cells), predicted[8:]) <= TOL
    assert max_diff(cells, logits[8:]) <= TOL * max(1.0, float(np.abs(logits).max()))

    # The command line writes a saved FCN that loads without the Keras file.
    from zoo.cli import main

    assert main(["convert", str(path), "--out", str(tmp_path / "fcn")]) == 0
    loaded = convert.load_fcn(tmp_path / "fcn")
    np.testing.assert_allclose(np.asarray(loaded(jnp.asarray(page))), np.asarray(fcn(jnp.asarray(page))), atol=1e-6)
    assert json.loads((tmp_path / "fcn" / "fcn.json").read_text())["source"]["metadata"]["notes"] == ["softmax"]


def randomized(keras_model, seed=0):
    """Random weights, BatchNorm statistics and biases included, so that none of them is an identity."""
    rng = np.random.default_rng(seed)
    for layer in keras_model.layers:
        weights = layer.get_weights()
        if weights:
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) if "variance" in v.path
                               else rng.normal(0, 0.5, w.shape).astype(np.float32)
                               for w, v in zip(weights, layer.weights)])
    return keras_model


@pytest.mark.parametrize("file_format", ["keras", "h5"])
def test_keras_functional_chain_of_every_supported_layer(keras, tmp_path, file_format):
    layers = keras.layers
    inputs = keras.Input((18, 18, 3))
    x = layers.ZeroPadding2D(((1, 0), (2, 1)))(inputs)
    x = layers.Conv2D(6, 3, strides=2, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(max_value=6.0)(x)
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="elu")(x)
    x = layers.SeparableConv2D(8, 3, padding="same", activation="gelu")(x)
    x = layers.AveragePooling2D(2, padding="same")(x)
    x = layers.Dense(5, activation="tanh")(x)  # per position on a map
    x = layers.LeakyReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(7)(x)
    x = layers.BatchNormalization()(x)  # folded into the Dense before it
    x = layers.Activation("relu")(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(3, activation="softmax")(x)
    model = randomized(keras.Model(inputs, outputs), seed=1)
    path = tmp_path / f"model.{file_format}"
    model.save(path)
    fcn = convert.from_keras(path)
    x = np.random.default_rng(0).normal(size=(4, 18, 18, 3)).astype(np.float32)
    assert max_diff(softmax(np.asarray(fcn(jnp.asarray(x)))[:, 0, 0]), model.predict(x, verbose=0)) <= TOL


def test_keras_global_max_pool_slides_exactly(keras, tmp_path):
    layers = keras.layers
    model = randomized(keras.Sequential([
        keras.Input((12, 12, 2)), layers.Conv2D(4, 3, activation="relu"), layers.DepthwiseConv2D(3),
        layers.GlobalMaxPooling2D(), layers.Dense(3)]), seed=2)
    model.save(tmp_path / "max.keras")
    fcn = convert.from_keras(tmp_path / "max.keras")
    big = images((12 + 3, 12 + 2, 2), n=1, seed=5)
    cells, windows = training_windows(fcn, big, (12, 12))
    assert fcn.geometry.valid and len(cells) == 4 * 3
    assert max_diff(cells, model.predict(windows, verbose=0)) <= TOL


def rewritten(path, out, name, edit):
    """A copy of the .keras archive `path` at `out` with the JSON member `name` edited."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == name:
                data = json.dumps(edit(json.loads(data))).encode()
            dst.writestr(item, data)
    return out


def test_bad_keras_files_are_one_line_errors(keras, trained_keras_mnist, tmp_path, capsys):
    from zoo.cli import main

    _, path, _, _ = trained_keras_mnist
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a model" * 10)
    no_config = tmp_path / "no_config.keras"
    with zipfile.ZipFile(no_config, "w") as z:
        z.writestr("metadata.json", "{}")
    future = rewritten(path, tmp_path / "future.keras", "metadata.json", lambda m: {**m, "keras_version": "4.0.0"})

    def with_lambda(config):
        layer = {"class_name": "Lambda", "config": {"name": "evil", "function": {"code": "print('ran')"}}}
        config["config"]["layers"].insert(2, layer)
        return config

    lam = rewritten(path, tmp_path / "lambda.keras", "config.json", with_lambda)
    cut = tmp_path / "cut.keras"
    cut.write_bytes(path.read_bytes()[:200])
    convolutional = tmp_path / "fully_conv.keras"
    keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3)]).save(convolutional)
    cases = [
        (garbage, "neither a .keras archive"), (cut, "neither a .keras archive"),
        (no_config, "without config.json, model.weights.h5"), (future, "Keras 4.0.0; this reader knows"),
        (lam, r"'evil' \(Lambda\) holds Python code"), (convolutional, "not a classifier: it has no Flatten"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            convert.from_keras(bad)
        assert main(["convert", str(bad), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("zoo convert: error:"), err
    assert not (tmp_path / "out").exists()
