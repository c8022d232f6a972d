"""Every shipped classifier weight file, re-evaluated on the real test split.

For each zoo/weights/<model>-<tag>.json of format "fcnzoo-pretrained" the weights are loaded the way users load them
(`zoo.create_model(NAME, pretrained=TAG)`, which checks the sha256), the recorded
preprocessing is applied to the test split's uint8 images, and the measured accuracy must
match the accuracy recorded at training time (up to float summation order: a couple of
images at most) and the target of its recipe. The test split comes from `train.data`
(prepared offline from sha256-checked sources), not from anything saved with the weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest

import zoo
from zoo import pretrained

WEIGHTS_DIR = Path(pretrained.__file__).parent / "weights"


def _is_classifier_weights(meta_path: Path) -> bool:
    # The store also holds segmentation nets (kind "segmentation", re-measured in tests/test_segment.py).
    return pretrained.kind_of(json.loads(meta_path.read_text())) == "classifier"


SHIPPED = sorted(p for p in WEIGHTS_DIR.glob("*.json") if _is_classifier_weights(p))


def _target_key(meta_path: Path):
    meta = json.loads(meta_path.read_text())
    return meta["model"], meta["dataset"]


# The issue's targets (test accuracy) per (model, dataset); shipped weights must meet them.
# The small mnistnet has none: it is the segmentation backbone, not the best MNIST CNN.
# Weights for a pair not listed here have no target and are only checked against their record.
TARGETS = {
    ("mnistnet_wide", "mnist"): 0.9975,
    ("lenet5", "mnist"): 0.990,
    ("mnistnet_large", "fashion_mnist"): 0.945,
}
# Re-evaluating on another machine or jax version may flip an image whose top two logits are
# within rounding of each other; more than this many is a real difference.
ALLOWED_FLIPS = 2


def _test_split(dataset: str):
    from train import data

    try:
        data.prepare(dataset, quiet=True)
    except Exception as e:  # no installer access: say how to get the data, do not pass silently
        pytest.skip(f"{dataset} is not prepared and could not be prepared here ({e}); run `zoo data prepare {dataset}`")
    return data.load_arrays(dataset, "test")


def test_weights_are_shipped():
    # The issue's must-ship weights: exercise 9's best CNN and LeNet-5, both on MNIST; the small
    # mnistnet too, because the shipped segmentation FCNs were grown from it.
    shipped = {_target_key(p) for p in SHIPPED}
    required = {("mnistnet_wide", "mnist"), ("lenet5", "mnist"), ("mnistnet", "mnist")}
    assert required <= shipped, f"missing shipped weights: {sorted(required - shipped)}"
    for meta_path in SHIPPED:
        meta = json.loads(meta_path.read_text())
        assert meta["tag"] in pretrained.available_tags(meta["model"])
        assert {"dataset", "test_accuracy", "preprocessing", "input_shape", "sha256"} <= set(meta)
        # sha256 recorded in the metadata is the file's, computed independently here
        data = (WEIGHTS_DIR / meta["weights_file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"]
        assert len(data) < 4 * 2**20, "shipped weights must stay small"


@pytest.mark.parametrize("meta_path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_weights_reach_their_recorded_test_accuracy(meta_path):
    meta = json.loads(meta_path.read_text())
    model = zoo.create_model(meta["model"], pretrained=meta["tag"])
    images, labels = _test_split(meta["dataset"])
    assert images.shape[1:] == tuple(meta["input_shape"])
    x = pretrained.preprocess_for(meta["model"], meta["tag"], images)
    # The recorded preprocessing, recomputed by hand: x = (uint8 * scale - mean) / std.
    p = meta["preprocessing"]
    by_hand = (images[:100].astype(np.float64) * p["scale"] - p["mean"][0]) / p["std"][0]
    np.testing.assert_allclose(np.asarray(x[:100]), by_hand, rtol=1e-5, atol=1e-5)

    forward = jax.jit(lambda batch: model(batch).argmax(-1))
    predictions = np.concatenate([np.asarray(forward(x[i:i + 1000])) for i in range(0, len(x), 1000)])
    correct = int((predictions == labels).sum())
    recorded = round(meta["test_accuracy"] * len(labels))
    assert abs(correct - recorded) <= ALLOWED_FLIPS, (
        f"{meta_path.name}: {correct}/{len(labels)} correct now, {recorded} recorded")


@pytest.mark.parametrize("meta_path", [p for p in SHIPPED if _target_key(p) in TARGETS], ids=lambda p: p.stem)
def test_shipped_weights_meet_the_issue_target(meta_path):
    # The recorded accuracy is checked against a re-evaluation above; here against the goal.
    meta = json.loads(meta_path.read_text())
    target = TARGETS[_target_key(meta_path)]
    if meta["test_accuracy"] < target:
        # Reported as XFAIL, never as a pass: the accuracy target of issue 4 is still open.
        pytest.xfail(f"{meta_path.name} reaches {100 * meta['test_accuracy']:.2f}% test accuracy; the target is "
                     f"{100 * target:.2f}% (docs/BENCHMARKS.md, training results: what the targets asked)")
    assert meta["test_accuracy"] >= target


def test_unknown_tag_lists_what_exists():
    meta = json.loads(SHIPPED[0].read_text()) if SHIPPED else None
    if meta is None:
        pytest.skip("no shipped weights")
    with pytest.raises(ValueError, match=meta["tag"]):
        zoo.create_model(meta["model"], pretrained="no_such_tag")


def test_damaged_weights_file_is_refused(tmp_path):
    if not SHIPPED:
        pytest.skip("no shipped weights")
    meta = json.loads(SHIPPED[0].read_text())
    for path in (WEIGHTS_DIR / meta["weights_file"], SHIPPED[0]):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    damaged = bytearray((tmp_path / meta["weights_file"]).read_bytes())
    damaged[-1] ^= 0xFF
    (tmp_path / meta["weights_file"]).write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="sha256"):
        zoo.load_pretrained(meta["model"], meta["tag"], weights_dir=tmp_path)
