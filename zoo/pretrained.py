"""The one store of shipped weights (zoo/weights/): classifiers and segmentation nets, offline, verified.

    zoo/weights/<name>-<tag>.safetensors   the weights (safetensors: no code runs on load)
    zoo/weights/<name>-<tag>.json          metadata: "kind" ("classifier" or "segmentation"), how to
                                           rebuild the network, the data set, the measured result
                                           (test accuracy, or mean IU and pixel accuracy), the
                                           preprocessing and the sha256 of the weights file

    model = zoo.create_model("mnistnet", pretrained="mnist")       # eval mode, sha256 checked
    x = zoo.pretrained.preprocess_for("mnistnet", "mnist", uint8_images)  # (N, 28, 28, 1) float32
    net = convert.load_shipped_segmentation("mnistnet_fcn8s", "digit_scenes")
    zoo.pretrained.shipped()                                       # every (name, tag) in the store

Classifiers are named by their registry name; segmentation nets `<backbone>_<variant>`
("mnistnet_fcn8s"). `export(saved_dir, tag)` turns a directory written by `zoo.saving.save_model`
or `convert.save_segmentation` (the `model/` of a training run) into a shipped pair of files.
This module reads and writes files only: the registry builds classifiers from what `verified`
returns, `convert` builds segmentation nets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from zoo.saving import (CONFIG_FILE, SEGMENTATION_CONFIG, SEGMENTATION_FORMAT, WEIGHTS_FILE, read_config,
                         read_json_record, read_weights, sha256_file, write_files_atomically)

WEIGHTS_DIR = Path(__file__).parent / "weights"
FORMAT = "fcnzoo-pretrained"
KINDS = ("classifier", "segmentation")
TAG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.]*$")


def _paths(model_name: str, tag: str, weights_dir: Path | None = None) -> tuple[Path, Path]:
    directory = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    return directory / f"{model_name}-{tag}.safetensors", directory / f"{model_name}-{tag}.json"


def available_tags(model_name: str, weights_dir: str | os.PathLike | None = None) -> list[str]:
    """Tags of the weights shipped for `model_name` (both files present), sorted."""
    directory = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    if not directory.is_dir():
        return []
    tags = []
    for meta in directory.glob(f"{model_name}-*.json"):
        tag = meta.name[len(model_name) + 1: -len(".json")]
        # "resnet18-x" must not be listed for "resnet1": the tag itself has no "-"
        if TAG_PATTERN.match(tag) and meta.with_suffix(".safetensors").is_file():
            tags.append(tag)
    return sorted(tags)


def kind_of(meta: dict[str, Any]) -> str:
    """"classifier" or "segmentation" (files written before segmentation nets joined the store are classifiers)."""
    return meta.get("kind", "classifier")


def metadata(model_name: str, tag: str, weights_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The JSON metadata of shipped weights; a ValueError lists the tags that exist."""
    _, meta_path = _paths(model_name, tag, weights_dir)
    if tag not in available_tags(model_name, weights_dir):
        tags = available_tags(model_name, weights_dir)
        raise ValueError(
            f"no pretrained weights {tag!r} for {model_name}; "
            + (f"available: {', '.join(tags)}." if tags else "this model has none.")
            + " `zoo list` shows every shipped file.")
    meta = read_json_record(meta_path, FORMAT, "pretrained metadata")
    if kind_of(meta) not in KINDS:
        raise ValueError(f"{meta_path} has kind {meta['kind']!r}, not one of {KINDS}; the file is damaged or newer")
    return meta


def shipped(kind: str | None = None, weights_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """Every (name, tag) in the store, sorted; `kind` keeps one kind only."""
    directory = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    found = []
    for meta_path in sorted(directory.glob("*-*.json")):
        name, _, tag = meta_path.stem.partition("-")
        if not (TAG_PATTERN.match(tag) and meta_path.with_suffix(".safetensors").is_file()):
            continue
        if kind is None or kind_of(metadata(name, tag, weights_dir)) == kind:
            found.append((name, tag))
    return found


def verified(name: str, tag: str, weights_dir: str | os.PathLike | None = None,
             kind: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, {dotted path: array}) of shipped weights whose sha256 matches the record.

    Raises:
        ValueError: unknown tag (lists those that exist), another kind than `kind`, or a weights
            file whose sha256 differs from the recorded one.
    """
    meta = metadata(name, tag, weights_dir)
    if kind is not None and kind_of(meta) != kind:
        raise ValueError(f"{name}-{tag} is a shipped {kind_of(meta)}, not a {kind}")
    weights_path, meta_path = _paths(name, tag, weights_dir)
    digest = sha256_file(weights_path)
    if digest != meta["sha256"]:
        raise ValueError(
            f"{weights_path} has sha256 {digest}, but {meta_path.name} records {meta['sha256']}: the file is "
            f"damaged or was replaced. Reinstall fcnzoo (or re-export the weights with zoo.pretrained.export).")
    return meta, read_weights(weights_path)


def result_line(meta: dict[str, Any]) -> str:
    """The measured result a record carries, for listings: "99.75% test accuracy" or "mean IU 0.803"."""
    if kind_of(meta) == "segmentation":
        return f"mean IU {meta['test_mean_iou']:.3f}, pixel acc. {meta['test_pixel_accuracy']:.3f}"
    return f"{100 * meta['test_accuracy']:.2f}% test accuracy"


def preprocess(images, preprocessing: dict[str, Any]):
    """Apply a recorded preprocessing to uint8 images: x = (images * scale - mean) / std, per channel.

    Args:
        images: (N, H, W, C) uint8 (numpy or jax; a float array of 0..255 values works too).
        preprocessing: the "preprocessing" dict of the weights' metadata.
    Returns:
        (N, H, W, C) float32, same array library as the input.
    """
    if getattr(images, "ndim", 0) != 4:
        raise ValueError(f"preprocess expects a batch of images (N, H, W, C), got shape {getattr(images, 'shape', None)}")
    mean = np.asarray(preprocessing["mean"], np.float32)
    std = np.asarray(preprocessing["std"], np.float32)
    if images.shape[-1] != mean.shape[0]:
        raise ValueError(f"the preprocessing is for {mean.shape[0]} channel(s); the images have {images.shape[-1]}")
    return (images.astype(np.float32) * np.float32(preprocessing["scale"]) - mean) / std


def preprocess_for(model_name: str, tag: str, images):
    """`preprocess` with the preprocessing recorded for the shipped weights (model_name, tag)."""
    return preprocess(images, metadata(model_name, tag)["preprocessing"])


# What a saved directory's metadata must hold to be shipped, per kind (the training loop writes them).
REQUIRED_METADATA = {"classifier": ("dataset", "test_accuracy", "preprocessing", "input_shape"),
                     "segmentation": ("dataset", "test_mean_iou", "test_pixel_accuracy", "class_names")}


def export(saved_model_dir: str | os.PathLike, tag: str, *, weights_dir: str | os.PathLike | None = None,
           extra: dict[str, Any] | None = None, name: str | None = None) -> tuple[Path, Path]:
    """Ship a saved classifier (`zoo.saving.save_model`) or segmentation net (`convert.save_segmentation`).

    The files are `<name>-<tag>.*`, name = the registry name of a classifier, `<backbone>_<variant>`
    of a segmentation net (or `name`). The saved metadata must hold REQUIRED_METADATA[kind].
    Returns (weights path, metadata path).
    """
    if not TAG_PATTERN.match(tag):
        raise ValueError(f"tag {tag!r} must be lowercase letters, digits, '_' or '.', e.g. 'mnist'")
    saved_model_dir = Path(saved_model_dir)
    if (saved_model_dir / SEGMENTATION_CONFIG).is_file():
        kind, config_file = "segmentation", SEGMENTATION_CONFIG
        config = read_json_record(saved_model_dir / SEGMENTATION_CONFIG, SEGMENTATION_FORMAT, "segmentation net")
        name = name or f"{config['backbone']['model']}_{config['variant']}"
    else:
        kind, config_file = "classifier", CONFIG_FILE
        config = read_config(saved_model_dir)
        name = name or config["model"]
    if not TAG_PATTERN.match(name) or "-" in name:
        raise ValueError(f"name {name!r} must be lowercase letters, digits, '_' or '.'")
    info = config.get("metadata", {})
    missing = [k for k in REQUIRED_METADATA[kind] if k not in info]
    if missing:
        raise ValueError(f"{saved_model_dir / config_file} lacks metadata {missing}; export a model saved by "
                         f"the training loop (train.loop.train), or add them")
    read_weights(saved_model_dir / WEIGHTS_FILE)  # refuse to ship an unreadable file
    weights_path, meta_path = _paths(name, tag, weights_dir)
    data = (saved_model_dir / WEIGHTS_FILE).read_bytes()
    meta = {"format": FORMAT, "kind": kind, "model": name, "tag": tag}
    if kind == "classifier":
        meta["kwargs"] = config["kwargs"]
    else:
        meta["segmentation"] = {k: v for k, v in config.items() if k not in ("format", "metadata")}
    meta.update({k: info[k] for k in REQUIRED_METADATA[kind]})
    meta.update({
        "weights_file": weights_path.name, "sha256": hashlib.sha256(data).hexdigest(),
        "train": {k: v for k, v in info.items() if k not in REQUIRED_METADATA[kind]},
        **(extra or {}),
    })
    # Weights first, metadata last: an interrupted export leaves no metadata pointing at a partial file.
    write_files_atomically(weights_path.parent, {weights_path.name: data})
    write_files_atomically(meta_path.parent, {meta_path.name: (json.dumps(meta, indent=2) + "\n").encode()})
    return weights_path, meta_path
