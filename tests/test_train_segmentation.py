"""Segmentation through the one training loop: `train.loop.train` on digit_scenes.

A short real run (FCN-32s on the shipped mnistnet, a few scenes, small crops) must lower the loss,
record a mean IU that a numpy confusion matrix of the returned model's predictions on the same
test images reproduces, keep BatchNorm's statistics, resume to the weights of an uninterrupted
run, and feed a second stage (FCN-16s from the saved FCN-32s). Options of the other task are
refused before anything is loaded or compiled.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import data, digit_scenes, loop, tasks
from train.config import TrainConfig

pytestmark = pytest.mark.skipif(not data.is_prepared("mnist"),
                                reason="mnist is not prepared (`zoo data prepare mnist`)")

# 2 steps per epoch (6 training scenes, batches of 3), 3 epochs; crops of 40 pixels, smaller than
# some scenes' sides (64..512) and larger than none of the arrays (padded to at least one crop).
BASE = dict(model="mnistnet", dataset="digit_scenes", variant="fcn32s", pretrained="mnist", train_examples=6,
            test_examples=3, batch_size=3, crop_size=40, epochs=3, learning_rate=2e-3, schedule="cosine",
            warmup_epochs=0.05, progress=False, fast_compile=True)


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    digit_scenes.prepare_scenes(directory, sizes={"train": 8, "test": 4}, mnist_data_dir=data.default_data_dir(),
                                quiet=True)
    return str(directory)


def config(scenes_dir, **changes) -> TrainConfig:
    return TrainConfig(**{**BASE, "data_dir": scenes_dir, **changes})


@pytest.fixture(scope="module")
def run(scenes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "fcn32s"
    return loop.train(config(scenes_dir, out_dir=str(out)))


def numpy_mean_iou(labels: list[np.ndarray], predictions: list[np.ndarray], num_classes: int, void: int) -> dict:
    """The paper's metrics (sec. 5) from scratch: n_ij pixels of class i predicted j, void left out."""
    n = np.zeros((num_classes, num_classes), np.int64)
    for label, prediction in zip(labels, predictions):
        keep = label != void
        np.add.at(n, (label[keep].astype(np.int64), prediction[keep].astype(np.int64)), 1)
    t = n.sum(1)
    ious = [n[i, i] / (t[i] + n[:, i].sum() - n[i, i]) for i in range(num_classes) if t[i] + n[:, i].sum() > 0]
    return {"mean_iou": float(np.mean(ious)), "pixel_accuracy": float(np.trace(n) / n.sum())}


def test_a_short_run_learns_and_its_mean_iou_is_a_numpy_confusion_matrix_of_its_model(run, scenes_dir):
    losses = [r["train_loss"] for r in run.history]
    assert [r["step"] for r in run.history] == [2, 4, 6] and run.steps == 6
    assert losses[-1] < losses[0], losses
    records = [json.loads(line) for line in (run.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert records == json.loads(json.dumps(run.history))
    assert {"train_pixel_accuracy", "test_loss", "test_pixel_accuracy", "test_mean_iou", "test_class_iou",
            "selection_mean_iou"} <= records[0].keys()
    assert run.metric == "mean_iou" and (run.out_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # The returned model is the best epoch's; evaluate it on the same test images, padded to their
    # common size with black (as the loop evaluates whole images), one image at a time.
    best = next(r for r in records if r["step"] == run.best_step)
    test = digit_scenes.load_scenes("test", scenes_dir, limit=3)
    height, width = max(i.shape[0] for i, _ in test), max(i.shape[1] for i, _ in test)
    predictions = []
    for image, label in test:
        padded = np.zeros((1, height, width, 1), np.float32)
        padded[0, :image.shape[0], :image.shape[1], 0] = image / 255.0
        predictions.append(np.asarray(run.model(jnp.asarray(padded)))[0, :label.shape[0], :label.shape[1]].argmax(-1))
    mine = numpy_mean_iou([label for _, label in test], predictions, digit_scenes.NUM_CLASSES, digit_scenes.VOID)
    assert mine["mean_iou"] == pytest.approx(best["test_mean_iou"], abs=1e-6)
    assert mine["pixel_accuracy"] == pytest.approx(best["test_pixel_accuracy"], abs=1e-6)
    assert run.test_metrics["mean_iou"] == pytest.approx(mine["mean_iou"], abs=1e-6)

    # model/ holds the net (convert.save_segmentation) with the metrics it was saved with.
    from convert.segment import read_segmentation_config

    saved = read_segmentation_config(run.model_dir)
    assert saved["variant"] == "fcn32s" and saved["metadata"]["dataset"] == "digit_scenes"
    assert saved["metadata"]["test_mean_iou"] == pytest.approx(mine["mean_iou"], abs=1e-6)
    assert saved["metadata"]["class_names"] == list(digit_scenes.CLASS_NAMES)


def test_batchnorm_keeps_the_classifiers_statistics(run, scenes_dir):
    start = tasks.make_task(config(scenes_dir)).build()
    initial = loop._flat({"other": loop.split_model(start)[4]})
    final = {k: v for k, v in run.final_weights.items() if k.startswith("other.")}
    assert final.keys() == initial.keys() and len(final) >= 8  # mean and var of each of mnistnet's 4 BatchNorms
    for key in final:
        np.testing.assert_array_equal(final[key], initial[key], err_msg=key)
    moved = loop._flat({"params": loop.split_model(start)[1]})
    assert any(not np.allclose(moved[k], run.final_weights[k]) for k in moved)


def test_an_interrupted_run_resumes_to_the_weights_of_the_whole_run(run, scenes_dir, tmp_path):
    first = loop.train(config(scenes_dir, out_dir=str(tmp_path), max_steps=3))  # stops mid-epoch 2
    assert first.steps == 3
    resumed = loop.train(config(scenes_dir, out_dir=str(tmp_path), resume=True))
    assert resumed.steps == 6 and [r["step"] for r in resumed.history] == [2, 3, 4, 6]
    for key, value in run.final_weights.items():
        np.testing.assert_allclose(resumed.final_weights[key], value, rtol=0, atol=1e-6, err_msg=key)


def test_fcn16s_grows_from_the_saved_fcn32s(run, scenes_dir):
    import convert

    stage = config(scenes_dir, variant="fcn16s", pretrained=None, init_from=str(run.model_dir), max_steps=1)
    start = tasks.make_task(stage).build()
    assert start.variant == "fcn16s"
    # Everything the two nets share starts from the trained FCN-32s (a new skip starts at zero).
    coarse = convert.load_segmentation(run.model_dir)
    from zoo.saving import flat_state

    theirs, mine = flat_state(coarse), flat_state(start)
    shared = [k for k in theirs if k.startswith(("backbone.", "score."))]
    assert shared and all(np.array_equal(theirs[k], mine[k]) for k in shared)
    assert loop.train(stage).steps == 1


def test_random_crops_are_windows_of_the_examples_padded_with_void():
    rng = np.random.default_rng(0)
    examples = [(rng.integers(0, 256, (h, w, 1), dtype=np.uint8), rng.integers(0, 11, (h, w), dtype=np.uint8))
                for h, w in [(50, 70), (20, 30), (40, 41)]]
    images, labels, sizes = tasks.pad_examples(examples, min_size=40)
    assert images.shape == (3, 50, 70, 1) and labels.shape == (3, 50, 70) and sizes.tolist() == [[50, 70], [20, 30],
                                                                                                  [40, 41]]
    keys = jax.random.split(jax.random.key(1), 3)
    for trial in range(4):
        x, y = map(np.asarray, tasks.random_crops(images, labels, sizes, jax.random.split(keys[trial % 3], 3), 40))
        assert x.shape == (3, 40, 40, 1) and y.shape == (3, 40, 40)
        for (image, label), xi, yi in zip(examples, x, y):
            h, w = label.shape
            found = [(top, left) for top in range(max(h - 40, 0) + 1) for left in range(max(w - 40, 0) + 1)
                     if np.array_equal(xi[:min(h, 40), :min(w, 40)], image[top:top + 40, left:left + 40])
                     and np.array_equal(yi[:min(h, 40), :min(w, 40)], label[top:top + 40, left:left + 40])]
            assert found, "the crop is no window of its example"
            assert (xi[h:] == 0).all() and (xi[:, w:] == 0).all()  # beyond a small example: black, void
            assert (yi[h:] == 255).all() and (yi[:, w:] == 255).all()


def test_pixel_loss_and_metrics_ignore_void():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 6, 4))
    labels = np.asarray(jax.random.randint(jax.random.key(1), (2, 5, 6), 0, 4), np.uint8)
    labels[0, :2] = 255
    keep = labels != 255
    log_p = np.asarray(jax.nn.log_softmax(logits))
    want = -np.mean(np.take_along_axis(log_p, labels.astype(np.int64)[..., None] % 4, -1)[..., 0][keep])
    assert float(tasks.pixel_loss(logits, jnp.asarray(labels))) == pytest.approx(want, rel=1e-6)
    predictions = np.asarray(logits).argmax(-1)
    matrix = np.asarray(tasks.confusion_matrix(jnp.asarray(labels), jnp.asarray(predictions), jnp.asarray(keep), 4))
    assert matrix.sum() == keep.sum()
    np.testing.assert_array_equal(matrix, tasks.confusion(labels, predictions, 4))
    assert tasks.scores_from_confusion(matrix)["mean_iou"] == pytest.approx(
        numpy_mean_iou([labels], [predictions], 4, 255)["mean_iou"])


@pytest.mark.parametrize("changes, message", [
    (dict(variant=None), "'digit_scenes' is a segmentation data set: choose the network with variant="),
    (dict(augment_rotate=10.0), "augment_rotate is a classification option"),
    (dict(label_smoothing=0.1, augment_flip=True), "augment_flip, label_smoothing are classification options"),
    (dict(init_from="runs/x/model"), "give pretrained .* or init_from .*, not both"),
    (dict(pretrained="imagenet"), "no pretrained weights 'imagenet' for mnistnet"),
    (dict(dataset="mnist"), "variant, pretrained, crop_size apply to segmentation data sets; 'mnist' is a "
                            "classification data set"),
    (dict(dataset="mnist", variant=None, pretrained=None, crop_size=96, freeze_batchnorm=True, model="lenet5"),
     None),
])
def test_options_of_the_other_task_are_refused_before_anything_loads(monkeypatch, tmp_path, changes, message):
    def nothing(*args, **kwargs):
        raise AssertionError("loaded data or built the model before checking the settings")

    if "init_from" in changes:  # a saved classifier directory, so that only the pair is wrong
        (tmp_path / "model.json").write_text(json.dumps({"format": "fcnzoo-model", "model": "mnistnet", "kwargs": {}}))
        changes = {**changes, "init_from": str(tmp_path)}
    monkeypatch.setattr(tasks.Segmentation, "load", nothing)
    monkeypatch.setattr(tasks.Classification, "load", nothing)
    monkeypatch.setattr(loop, "init_model", nothing)
    cfg = TrainConfig(**{**BASE, "crop_size": 64, **changes})
    if message is None:  # freeze_batchnorm is an option of both tasks
        with pytest.raises(AssertionError, match="loaded data"):
            loop.train(cfg)
        return
    with pytest.raises(ValueError, match=message):
        loop.train(cfg)


def test_cli_trains_a_segmentation_net(scenes_dir, tmp_path, capsys):
    from zoo.cli import main

    out = tmp_path / "cli"
    code = main(["train", "mnistnet", "--dataset", "digit_scenes", "--data-dir", scenes_dir, "--variant", "fcn32s",
                 "--pretrained", "mnist", "--max-steps", "1", "--crop-size", "32", "--batch-size", "2",
                 "--train-examples", "2", "--test-examples", "1", "--schedule", "cosine", "--out", str(out),
                 "--no-progress", "--fast-compile"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "best test mean IU" in printed and "pixel accuracy" in printed
    assert (out / "model" / "segmentation.json").is_file()
