"""The FCN paper's path: an imported Keras VGG-16 turned into a fully convolutional network.

Long, Shelhamer & Darrell 2015 (https://arxiv.org/abs/1411.4038) start from an
ImageNet VGG-16 and cast its Dense layers into convolutions. Here VGG-16 is
built by Keras with random weights for 32x32 inputs (its Flatten head then sees
a 1x1x512 map), imported, converted by `convert.to_fcn`, and run on a larger,
non-square image. The reference is computed outside our code: Keras's own VGG-16
backbone on the large image, then the three Dense layers applied at every
position with NumPy.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":  # pragma: no cover
    pytest.skip("these reference runs need KERAS_BACKEND=jax", allow_module_level=True)

convert = pytest.importorskip("convert")

from zoo.importers import import_keras, preprocess_input  # noqa: E402
from zoo.importers.reference import keras_application, randomize_keras_weights, relative_error  # noqa: E402


def test_imported_vgg16_runs_fully_convolutionally_on_a_large_image(tmp_path):
    classifier = keras_application("VGG16", input_shape=(32, 32, 3), classifier_activation=None)
    randomize_keras_weights(classifier, 0)
    path = tmp_path / "vgg16.weights.h5"
    classifier.save_weights(path)
    fcn = convert.to_fcn(import_keras("vgg16", path).model)
    forward = nnx.jit(lambda m, x: m(x))
    rng = np.random.default_rng(0)

    # At the training size the FCN is the classifier: one cell, Keras's logits.
    small = preprocess_input(rng.uniform(0, 255, (1, 32, 32, 3)), "caffe")
    one_cell = np.asarray(forward(fcn, small))
    assert one_cell.shape == (1, 1, 1, 1000)
    assert relative_error(one_cell[:, 0, 0], classifier.predict(small, verbose=0)) < 1e-4

    # On a 160x224 image: a 5x7 grid of class scores, stride 32.
    large = preprocess_input(rng.uniform(0, 255, (1, 160, 224, 3)), "caffe")
    scores = np.asarray(forward(fcn, large))
    assert scores.shape == (1, 5, 7, 1000)
    assert fcn.geometry.stride == (32, 32)
    backbone = keras_application("VGG16", include_top=False, input_shape=(160, 224, 3))
    for layer in backbone.layers:
        if layer.weights:
            layer.set_weights(classifier.get_layer(layer.name).get_weights())
    features = backbone.predict(large, verbose=0)  # (1, 5, 7, 512)
    hidden = features
    for name in ("fc1", "fc2"):
        kernel, bias = classifier.get_layer(name).get_weights()
        hidden = np.maximum(hidden @ kernel + bias, 0)
    kernel, bias = classifier.get_layer("predictions").get_weights()
    assert relative_error(scores, hidden @ kernel + bias) < 1e-4
