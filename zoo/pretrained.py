"""Pretrained weights shipped inside the package (zoo/weights/), loaded offline and verified.

    zoo/weights/<model>-<tag>.safetensors   the weights (safetensors: no code runs on load)
    zoo/weights/<model>-<tag>.json          metadata: how to rebuild the model, the data set,
                                            the measured test accuracy, the preprocessing,
                                            the input size and the sha256 of the weights file

    model = zoo.create_model("mnistnet", pretrained="mnist")       # eval mode, sha256 checked
    x = zoo.pretrained.preprocess_for("mnistnet", "mnist", uint8_images)  # (N, 28, 28, 1) float32
    logits = model(x)

`export(saved_model_dir, tag)` turns a directory written by `zoo.saving.save_model` (e.g. the
`model/` of a training run) into a shipped pair of files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from zoo.saving import (CONFIG_FILE, WEIGHTS_FILE, load_flat_into, read_config, read_json_record, read_weights,
                         sha256_file, write_files_atomically)

WEIGHTS_DIR = Path(__file__).parent / "weights"
FORMAT = "fcnzoo-pretrained"
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


def metadata(model_name: str, tag: str, weights_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The JSON metadata of shipped weights; a ValueError lists the tags that exist."""
    _, meta_path = _paths(model_name, tag, weights_dir)
    if tag not in available_tags(model_name, weights_dir):
        tags = available_tags(model_name, weights_dir)
        raise ValueError(
            f"no pretrained weights {tag!r} for {model_name}; "
            + (f"available: {', '.join(tags)}." if tags else "this model has none.")
            + " `zoo list` shows which models have weights.")
    return read_json_record(meta_path, FORMAT, "pretrained metadata")


def load(model_name: str, tag: str, *, dtype=None, weights_dir: str | os.PathLike | None = None, **options):
    """The model with shipped weights `tag`, in eval mode.

    Args:
        dtype: computation dtype (parameters stay float32); default float32.
        options: family options passed on to `zoo.create_model` (they must fit the weights).
    Raises:
        ValueError: unknown tag (lists those that exist), a weights file whose sha256 differs
            from the recorded one, or weights that do not fit the model (names every difference).
    """
    import jax.numpy as jnp

    from zoo.registry import create_model

    meta = metadata(model_name, tag, weights_dir)
    weights_path, meta_path = _paths(model_name, tag, weights_dir)
    digest = sha256_file(weights_path)
    if digest != meta["sha256"]:
        raise ValueError(
            f"{weights_path} has sha256 {digest}, but {meta_path.name} records {meta['sha256']}: the file is "
            f"damaged or was replaced. Reinstall fcnzoo (or re-export the weights with zoo.pretrained.export).")
    kwargs = dict(meta["kwargs"])
    if isinstance(kwargs.get("input_size"), list):
        kwargs["input_size"] = tuple(kwargs["input_size"])
    kwargs.update(options)
    model = create_model(model_name, dtype=dtype if dtype is not None else jnp.float32, **kwargs)
    load_flat_into(model, read_weights(weights_path), source=str(weights_path))
    model.eval()
    return model


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


def export(saved_model_dir: str | os.PathLike, tag: str, *, weights_dir: str | os.PathLike | None = None,
           extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Ship a model saved by `zoo.saving.save_model` (with train metadata) as `<model>-<tag>.*`.

    The saved metadata must hold "dataset", "test_accuracy", "preprocessing" and "input_shape"
    (the training loop writes them). Returns (weights path, metadata path).
    """
    if not TAG_PATTERN.match(tag):
        raise ValueError(f"tag {tag!r} must be lowercase letters, digits, '_' or '.', e.g. 'mnist'")
    saved_model_dir = Path(saved_model_dir)
    config = read_config(saved_model_dir)
    info = config.get("metadata", {})
    missing = [k for k in ("dataset", "test_accuracy", "preprocessing", "input_shape") if k not in info]
    if missing:
        raise ValueError(f"{saved_model_dir / CONFIG_FILE} lacks metadata {missing}; export a model saved by "
                         f"the training loop (train.loop.train), or add them")
    read_weights(saved_model_dir / WEIGHTS_FILE)  # refuse to ship an unreadable file
    weights_path, meta_path = _paths(config["model"], tag, weights_dir)
    data = (saved_model_dir / WEIGHTS_FILE).read_bytes()
    meta = {
        "format": FORMAT, "model": config["model"], "tag": tag, "kwargs": config["kwargs"],
        "dataset": info["dataset"], "test_accuracy": info["test_accuracy"],
        "preprocessing": info["preprocessing"], "input_shape": info["input_shape"],
        "weights_file": weights_path.name, "sha256": hashlib.sha256(data).hexdigest(),
        "train": {k: v for k, v in info.items()
                  if k not in ("dataset", "test_accuracy", "preprocessing", "input_shape")},
        **(extra or {}),
    }
    # Weights first, metadata last: an interrupted export leaves no metadata pointing at a partial file.
    write_files_atomically(weights_path.parent, {weights_path.name: data})
    write_files_atomically(meta_path.parent, {meta_path.name: (json.dumps(meta, indent=2) + "\n").encode()})
    return weights_path, meta_path
