"""Keras Applications weights imported into zoo models compute what Keras computes.

The reference is Keras 3 itself (JAX backend): each test builds
`keras.applications.X(weights=None)` with random weights (BatchNorm statistics
and biases randomized too), saves them the way Keras does, imports the file,
and runs both models on the same random batch in eval mode. Logits must agree
to 1e-4 relative to their scale. Numeric checks run on small inputs (the
parameters do not depend on the input size, except VGG's Flatten head, built
here for 32x32); the deepest variants are checked for a complete mapping
against abstract zoo models instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":  # pragma: no cover
    pytest.skip("these reference runs need KERAS_BACKEND=jax", allow_module_level=True)

import zoo  # noqa: E402
from zoo.importers import import_keras, preprocess_input, read_keras_weights  # noqa: E402
from zoo.importers.keras import IMAGENET_STDDEV_RGB, keras_layout, keras_to_zoo  # noqa: E402
from zoo.importers.loading import build_abstract, head_dense_paths, weight_shapes  # noqa: E402
from zoo.importers.reference import keras_application, randomize_keras_weights, relative_error  # noqa: E402
from zoo.saving import WeightsMismatchError  # noqa: E402

TOLERANCE = 1e-4


def random_images(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, size=shape).astype(np.float32)


def keras_logits(model, x):
    return np.asarray(model.predict(x, batch_size=len(x), verbose=0))


def run(model, x):
    """Our model on x, compiled once (op-by-op dispatch compiles every op separately: slower on CPU)."""
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, x))


def reference(tmp_path_factory, keras_name, *, seed=0, **kwargs):
    """A random-weight Keras model and its Keras 3 weights file."""
    model = keras_application(keras_name, seed=seed, **kwargs)
    randomize_keras_weights(model, seed)
    path = tmp_path_factory.mktemp(keras_name) / f"{keras_name}.weights.h5"
    model.save_weights(path)
    return model, path


def write_tf_keras_weights(model, path):
    """A weights-only file in the layout of the legacy tf.keras `save_weights` / Keras's ImageNet files.

    Written with h5py from the model's layers: root attribute `layer_names`, one group per
    layer with attribute `weight_names` ("conv1_conv/kernel:0", ...), datasets under them.
    """
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.4.0"
        for layer in model.layers:
            group = f.create_group(layer.name)
            names = [f"{layer.name}/{v.path.rsplit('/', 1)[-1]}:0" for v in layer.weights]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for name, variable in zip(names, layer.weights):
                group.create_dataset(name, data=np.asarray(variable))
    return path


def normalization_layer(model):
    # Keras numbers automatic names per session ("normalization_1" in a second model).
    return next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("module,mode", [
    ("vgg16", "caffe"), ("vgg19", "caffe"), ("resnet50", "caffe"), ("resnet", "caffe"),
    ("xception", "tf"), ("efficientnet", "none"), ("densenet", "torch"),  # DenseNet: Keras's "torch" mode
])
def test_preprocess_input_matches_keras(module, mode):
    images = np.random.default_rng(1).integers(0, 256, size=(3, 9, 7, 3), dtype=np.uint8)
    theirs = getattr(keras.applications, module).preprocess_input(images.astype(np.float32).copy())
    np.testing.assert_allclose(preprocess_input(images, mode), np.asarray(theirs), rtol=1e-6, atol=1e-5)


def test_preprocess_input_refuses_channels_first():
    with pytest.raises(ValueError, match="channels last"):
        preprocess_input(np.zeros((1, 3, 8, 8)), "caffe")


# --------------------------------------------------------------------------- VGG


@pytest.fixture(scope="module")
def vgg16(tmp_path_factory):
    return reference(tmp_path_factory, "VGG16", input_shape=(32, 32, 3), classifier_activation=None)


def test_vgg16_full_classifier_matches_keras(vgg16):
    keras_model, path = vgg16
    imported = import_keras("vgg16", path)
    assert imported.kwargs["input_size"] == (32, 32)  # read from fc1's width
    x = preprocess_input(random_images((2, 32, 32, 3)), "caffe")
    ours = run(imported.model, x)
    assert ours.shape == (2, 1000)
    assert relative_error(ours, keras_logits(keras_model, x)) < TOLERANCE


def test_legacy_h5_files_give_the_same_model(vgg16, tmp_path):
    keras_model, path = vgg16
    legacy = tmp_path / "vgg16_legacy.h5"
    keras_model.save(legacy)  # Keras's own legacy HDF5 writer (model_weights/<layer>/<layer>/kernel)
    tf_keras = write_tf_keras_weights(keras_model, tmp_path / "vgg16_tf_keras.h5")
    x = preprocess_input(random_images((1, 32, 32, 3), seed=2), "caffe")
    expected = keras_logits(keras_model, x)
    for file in (legacy, tf_keras):
        assert read_keras_weights(file).format == "legacy"
        assert relative_error(run(import_keras("vgg16", file).model, x), expected) < TOLERANCE


def test_new_number_of_classes_keeps_every_other_weight(vgg16):
    keras_model, path = vgg16
    full = import_keras("vgg16", path).model
    tuned = import_keras("vgg16", path, num_classes=10)
    assert tuned.metadata["new_head"] == ["head.layers.6"]
    x = preprocess_input(random_images((1, 32, 32, 3), seed=3), "caffe")
    np.testing.assert_array_equal(run(tuned.model.features, x), run(full.features, x))
    for i in (0, 3):  # fc1, fc2 come from the file
        np.testing.assert_array_equal(np.asarray(tuned.model.head.layers[i].kernel[...]),
                                      np.asarray(keras_model.get_layer(f"fc{i // 3 + 1}").kernel))
    assert run(tuned.model, x).shape == (1, 10)


def test_feature_extractor_from_a_full_file(vgg16):
    keras_model, path = vgg16
    imported = import_keras("vgg16", path, include_top=False)
    x = preprocess_input(random_images((1, 32, 32, 3), seed=4), "caffe")
    features = keras.Model(keras_model.input, keras_model.get_layer("block5_pool").output)
    assert relative_error(run(imported.model, x), keras_logits(features, x)) < TOLERANCE


def test_vgg19_matches_keras(tmp_path_factory):
    keras_model, path = reference(tmp_path_factory, "VGG19", input_shape=(32, 32, 3), classifier_activation=None)
    x = preprocess_input(random_images((2, 32, 32, 3), seed=5), "caffe")
    assert relative_error(run(import_keras("VGG19", path).model, x), keras_logits(keras_model, x)) < TOLERANCE


# --------------------------------------------------------------------------- ResNet


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
    return reference(tmp_path_factory, "ResNet50", input_shape=(32, 32, 3), classifier_activation=None)


def test_resnet50_matches_keras(resnet50):
    keras_model, path = resnet50
    imported = import_keras("resnet50", path)
    assert imported.kwargs["stride_in"] == "1x1" and imported.kwargs["conv_bias"] is True
    x = preprocess_input(random_images((2, 32, 32, 3), seed=6), "caffe")
    assert relative_error(run(imported.model, x), keras_logits(keras_model, x)) < TOLERANCE


@pytest.mark.parametrize("keras_name", ["ResNet101", pytest.param("ResNet152", marks=pytest.mark.slow)])
def test_deep_resnets_map_every_weight(tmp_path_factory, keras_name):
    keras_model, path = reference(tmp_path_factory, keras_name, input_shape=(32, 32, 3))
    name = keras_name.lower()
    abstract = build_abstract(name, stride_in="1x1", conv_bias=True)
    flat, _ = keras_to_zoo(name, read_keras_weights(path), head_dense_paths(abstract))
    assert {k: v.shape for k, v in flat.items()} == weight_shapes(abstract)
    assert sum(v.size for v in flat.values()) == keras_model.count_params()


def test_layout_follows_keras_layer_order(resnet50):
    keras_model, _ = resnet50
    ours = [layer.name for layer in keras_layout("resnet50")]
    assert ours == [layer.name for layer in keras_model.layers if layer.weights]


# --------------------------------------------------------------------------- Xception


def test_xception_matches_keras(tmp_path_factory):
    keras_model, path = reference(tmp_path_factory, "Xception", input_shape=(71, 71, 3),
                                  classifier_activation=None)
    x = preprocess_input(random_images((2, 71, 71, 3), seed=7), "tf")
    assert relative_error(run(import_keras("xception", path).model, x), keras_logits(keras_model, x)) < TOLERANCE
    # Xception's shortcut convs have automatic names in Keras; the legacy reader matches them by order.
    anonymous = [layer.name for layer in keras_model.layers if layer.weights and not layer.name.startswith(
        ("block", "predictions"))]
    assert len(anonymous) == 8 and all(n.startswith(("conv2d", "batch_normalization")) for n in anonymous)


# --------------------------------------------------------------------------- EfficientNet


@pytest.fixture(scope="module")
def efficientnet_b0(tmp_path_factory):
    return reference(tmp_path_factory, "EfficientNetB0", input_shape=(32, 32, 3), classifier_activation=None)


def test_efficientnet_b0_matches_keras(efficientnet_b0):
    keras_model, path = efficientnet_b0
    # Keras normalizes inside the model; give its Normalization layer non-trivial statistics.
    normalization_layer(keras_model).set_weights(
        [np.array([0.4, 0.5, 0.6], np.float32), np.array([0.05, 0.06, 0.07], np.float32), np.array(10)])
    keras_model.save_weights(path)
    keras_model.load_weights(path)  # Keras's Normalization computes with what loading finalizes
    imported = import_keras("efficientnet_b0", path)
    assert imported.metadata["imagenet_rescale"] is False
    x = random_images((2, 32, 32, 3), seed=8)  # EfficientNet takes raw pixels
    assert relative_error(run(imported.model, x), keras_logits(keras_model, x)) < TOLERANCE


def test_efficientnet_imagenet_normalization_through_keras_own_loader(tmp_path, monkeypatch):
    """Keras adds a Rescaling by 1/sqrt(stddev) only for weights="imagenet"; run that very code path.

    A legacy file holding Keras's ImageNet normalization values (the standard deviations
    stored as variances) stands in for the download: Keras builds its ImageNet model and
    loads the file by its own legacy reader; the importer must fold the same rescaling in.
    """
    source = keras_application("EfficientNetB0", include_top=False, input_shape=(32, 32, 3), seed=3)
    randomize_keras_weights(source, 3)
    normalization_layer(source).set_weights(
        [np.array([0.485, 0.456, 0.406], np.float32), np.array(IMAGENET_STDDEV_RGB, np.float32), np.array(0)])
    path = write_tf_keras_weights(source, tmp_path / "efficientnetb0_notop.h5")
    from keras.src.applications import efficientnet as keras_efficientnet

    monkeypatch.setattr(keras_efficientnet.file_utils, "get_file", lambda *args, **kwargs: str(path))
    imagenet = keras_application("EfficientNetB0", weights="imagenet", include_top=False,
                                 input_shape=(32, 32, 3))
    assert sum("rescaling" in layer.name for layer in imagenet.layers) == 2  # Keras's ImageNet-only step
    imported = import_keras("efficientnet_b0", path)
    assert imported.metadata["imagenet_rescale"] is True and imported.kwargs["include_top"] is False
    x = random_images((2, 32, 32, 3), seed=9)
    assert relative_error(run(imported.model, x), keras_logits(imagenet, x)) < TOLERANCE


@pytest.mark.parametrize("variant", [3, pytest.param(7, marks=pytest.mark.slow)])
def test_scaled_efficientnets_map_every_weight(tmp_path_factory, variant):
    keras_model, path = reference(tmp_path_factory, f"EfficientNetB{variant}", input_shape=(32, 32, 3))
    name = f"efficientnet_b{variant}"
    automatic = keras.layers.Normalization  # its name depends on what the session built before
    assert [layer.name for layer in keras_layout(name)] == [
        None if isinstance(layer, automatic) else layer.name for layer in keras_model.layers if layer.weights]
    abstract = build_abstract(name)
    flat, normalization = keras_to_zoo(name, read_keras_weights(path), head_dense_paths(abstract))
    assert {k: v.shape for k, v in flat.items()} == weight_shapes(abstract)
    assert sum(v.size for v in flat.values()) + sum(v.size for v in normalization.values()) == \
        keras_model.count_params()


# --------------------------------------------------------------------------- loud failures


def test_a_file_of_another_architecture_is_reported_weight_by_weight(resnet50):
    _, path = resnet50
    with pytest.raises(WeightsMismatchError) as error:
        import_keras("resnet101", path)
    message = str(error.value)
    assert "missing from the file" in message and "features.stage3.6" in message


def test_unclaimed_and_misshapen_weights_are_named(resnet50, tmp_path):
    keras_model, path = resnet50
    damaged = tmp_path / "extra.weights.h5"
    with h5py.File(path) as source, h5py.File(damaged, "w") as f:
        for key in source:
            source.copy(key, f)
        del f["layers/conv2d_1/vars/0"]
        f.create_dataset("layers/conv2d_1/vars/0", data=np.zeros((1, 1, 64, 65), np.float32))
        f.create_dataset("layers/dense_7/vars/0", data=np.zeros((3, 3), np.float32))
    with pytest.raises(WeightsMismatchError) as error:
        import_keras("resnet50", damaged)
    message = str(error.value)
    assert "keras:dense_7/vars/0" in message and "not in the model" in message
    assert "features.stage1.0.conv1.kernel" in message and "(1, 1, 64, 65)" in message


def test_unknown_architecture_and_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="supported"):
        import_keras("alexnet", tmp_path / "x.h5")
    with pytest.raises(FileNotFoundError):
        import_keras("resnet50", tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match="HDF5"):
        import_keras("resnet50", junk)


def test_keras_names_are_accepted():
    assert keras_layout("ResNet50") == keras_layout("resnet50")
    assert zoo.get_spec("efficientnet_b3").family == "efficientnet"
