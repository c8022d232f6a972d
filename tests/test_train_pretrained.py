"""Shipped weights: export from a saved model, sha256 verified on load, recorded preprocessing.

`test_shipped_weights_reach_their_recorded_accuracy` re-evaluates every file in zoo/weights/
on the real test split (none shipped yet: it then checks nothing and says so by skipping).
"""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from train import data
from zoo import pretrained, saving
from zoo.saving import save_model


@pytest.fixture
def shipped(tmp_path):
    """A LeNet-5 exported as tag "unit" into a temporary weights dir."""
    model = zoo.create_model("lenet5", num_classes=10, input_size=28, in_channels=1, input_padding=2, rngs=3)
    saved = save_model(model, tmp_path / "saved", model_name="lenet5",
                       kwargs={"num_classes": 10, "input_size": [28, 28], "in_channels": 1, "input_padding": 2},
                       metadata={"dataset": "mnist", "test_accuracy": 0.1, "input_shape": [28, 28, 1],
                                 "preprocessing": data.preprocessing_record("mnist")})
    weights_dir = tmp_path / "weights"
    pretrained.export(saved, "unit", weights_dir=weights_dir)
    return model, weights_dir


def test_export_then_load_gives_the_same_model(shipped):
    model, weights_dir = shipped
    assert pretrained.available_tags("lenet5", weights_dir) == ["unit"]
    assert pretrained.available_tags("lenet", weights_dir) == []
    loaded = zoo.load_pretrained("lenet5", "unit", weights_dir=weights_dir)
    x = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
    model.eval()
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)
    meta = pretrained.metadata("lenet5", "unit", weights_dir)
    assert meta["sha256"] == saving.sha256_file(weights_dir / "lenet5-unit.safetensors")
    assert meta["input_shape"] == [28, 28, 1] and meta["dataset"] == "mnist"


def test_a_changed_weights_file_is_refused(shipped):
    _, weights_dir = shipped
    path = weights_dir / "lenet5-unit.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256"):
        zoo.load_pretrained("lenet5", "unit", weights_dir=weights_dir)


def test_unknown_tag_lists_the_available_ones(shipped):
    _, weights_dir = shipped
    with pytest.raises(ValueError, match="available: unit"):
        zoo.load_pretrained("lenet5", "imagenet", weights_dir=weights_dir)


def test_preprocess_applies_the_recorded_formula():
    record = data.preprocessing_record("mnist")
    images = np.array([0, 128, 255], np.uint8).reshape(1, 1, 3, 1)
    expected = (np.array([0, 128, 255]) / 255 - 0.1307) / 0.3081  # written out by hand
    np.testing.assert_allclose(pretrained.preprocess(images, record).ravel(), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pretrained.preprocess(jnp.asarray(images), record)).ravel(), expected,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="N, H, W, C"):
        pretrained.preprocess(images[0], record)

# Every shipped weight file is re-evaluated on the real test split in tests/test_pretrained.py.
