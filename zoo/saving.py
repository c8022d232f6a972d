"""Saving and loading model weights in a format that cannot run code.

A saved model is a directory:

    model.json          {"format": "fcnzoo-model", "model": NAME, "kwargs": {...}, "metadata": {...}}
    weights.safetensors every nnx.Param and BatchStat, keyed by its dotted path

`load_model(dir)` rebuilds the module from the registry (no pickle, no user
class needed) and fills it loudly: a weight the model lacks, a weight the file
lacks, or a shape that differs is reported by name (after big_vision's
`merge_params`), never silently dropped. The same machinery serves importers of
foreign checkpoints (`load_flat_into`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FORMAT = "fcnzoo-model"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "model.json"
# A saved segmentation net (`convert.save_segmentation`) has this config instead of model.json.
SEGMENTATION_FORMAT = "fcnzoo-segmentation"
SEGMENTATION_CONFIG = "segmentation.json"


# Files written before keys were cleaned ended each key with the Variable's ".value" attribute.
_LEGACY_SUFFIX = "..value"


def _path_key(path) -> str:
    """Dotted module-tree path of a state leaf, e.g. "features.stage1.0.conv1.kernel".

    Only dict keys and list indices count; the `.value` attribute entry that flax adds
    to Variable paths is left out.
    """
    return ".".join(str(p.key) if hasattr(p, "key") else str(p.idx)
                    for p in path if hasattr(p, "key") or hasattr(p, "idx"))


def flat_state(model: nnx.Module, filter=(nnx.Param, nnx.BatchStat)) -> dict[str, np.ndarray]:
    """{dotted path: numpy array} of the model's weights (Params and BatchNorm statistics)."""
    state = nnx.state(model, filter)
    leaves = jax.tree.leaves_with_path(state)
    return {_path_key(path): np.asarray(leaf) for path, leaf in leaves}


class WeightsMismatchError(ValueError):
    """Raised when a weights file does not fit the model; lists every difference by name."""


def load_flat_into(
    model: nnx.Module,
    weights: Mapping[str, np.ndarray],
    *,
    skip: Iterable[str] = (),
    filter=(nnx.Param, nnx.BatchStat),
    source: str = "the weights file",
) -> nnx.Module:
    """Copy `weights` into `model` in place and return it.

    Args:
        weights: {dotted path: array}, as `flat_state` produces.
        skip: path prefixes left as initialized and not expected in `weights` (a new head: "head.").
    Raises:
        WeightsMismatchError listing missing, unexpected and mismatched-shape weights.
    """
    skip = tuple(skip)
    state = nnx.state(model, filter)
    leaves = jax.tree.leaves_with_path(state)
    wanted = {_path_key(p): leaf for p, leaf in leaves}
    keep = lambda k: not any(k == s or k.startswith(s if s.endswith(".") else s + ".") for s in skip)  # noqa: E731
    missing = sorted(k for k in wanted if keep(k) and k not in weights)
    unexpected = sorted(k for k in weights if keep(k) and k not in wanted)
    mismatched = sorted(
        f"{k}: file {tuple(weights[k].shape)} vs model {tuple(wanted[k].shape)}"
        for k in wanted if keep(k) and k in weights and tuple(weights[k].shape) != tuple(wanted[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (("missing from the file", missing), ("not in the model", unexpected),
                             ("with a different shape", mismatched)):
            if items:
                shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
                parts.append(f"  {len(items)} weight(s) {title}:\n    {shown}")
        raise WeightsMismatchError(f"{source} does not fit the model:\n" + "\n".join(parts))
    new_leaves = [
        jnp.asarray(weights[k], dtype=leaf.dtype) if keep(k) else leaf
        for k, leaf in ((_path_key(p), leaf) for p, leaf in leaves)
    ]
    nnx.update(model, jax.tree.unflatten(jax.tree.structure(state), new_leaves))
    return model


def check_output_dir(directory: str | os.PathLike, *, owns: Iterable[str], what: str, force: bool = False,
                     force_flag: str = "--force to replace it") -> Path:
    """Refuse, before anything is written, a directory a command may not write its result into.

    A new or empty directory is fine. One that holds only files of `owns` (an earlier result of the
    same kind) is replaced, or continued, only with `force` (the command's `force_flag`). One that
    holds anything else (a saved classifier, a run, the user's files) is never written into.
    Returns the directory as a Path.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--out {directory} is a file, not a directory; choose another --out")
    held = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    others = [name for name in held if name not in set(owns) and not name.startswith(".")]
    if others:
        raise ValueError(f"--out {directory} holds {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}, "
                         f"which this command did not write; choose a new or empty directory. Nothing was written.")
    if held and not force:
        raise ValueError(f"--out {directory} already holds a {what}; pass {force_flag}, or choose another "
                         f"--out. Nothing was written.")
    return directory


def save_figure(fig, path: str | os.PathLike, **savefig_options) -> Path:
    """Write a matplotlib figure as a PNG atomically (a temporary name, then a rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png", **savefig_options)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_files_atomically(directory: Path, files: dict[str, bytes]) -> None:
    """Write files into `directory` so a crash never leaves a half-written model behind."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)


def save_model(model: nnx.Module, directory: str | os.PathLike, *, model_name: str,
               kwargs: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None) -> Path:
    """Save a registry model's weights and how to rebuild it.

    Args:
        model_name: the registry name (or another builder key known to `load_model`).
        kwargs: JSON-able keyword arguments of `zoo.create_model` (num_classes, input_size, ...).
        metadata: free JSON-able facts (dataset, accuracy, preprocessing, ...).
    """
    from safetensors.numpy import save

    directory = Path(directory)
    weights = save({k: np.ascontiguousarray(v) for k, v in flat_state(model).items()})
    config = {"format": FORMAT, "model": model_name, "kwargs": dict(kwargs or {}),
              "metadata": dict(metadata or {}), **weights_digest(weights)}
    # Weights first, config last: a directory with a config always has its weights.
    write_files_atomically(directory, {WEIGHTS_FILE: weights})
    write_files_atomically(directory, {CONFIG_FILE: json.dumps(config, indent=2).encode()})
    return directory


# The keys each record must hold, with their JSON types (a damaged or hand-edited file is refused by name).
REQUIRED_KEYS = {
    "fcnzoo-model": {"model": str, "kwargs": dict},
    "fcnzoo-pretrained": {"model": str, "tag": str, "weights_file": str, "sha256": str},
    "fcnzoo-fcn": {"source": dict, "input_shape": list, "feature_shape": list, "pool": str, "head": list},
    SEGMENTATION_FORMAT: {"variant": str, "num_classes": int, "backbone": dict, "normalization": dict},
}


def read_json_record(path: Path, expected_format: str, what: str) -> dict[str, Any]:
    """The JSON object at `path`, checked to carry `"format": expected_format` and its REQUIRED_KEYS.

    `what` names the record in errors ("saved model", ...): damaged JSON, another format, a missing
    key or a key of the wrong type gives a ValueError that says which file and what it should hold.
    """
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the {what} is damaged") from None
    if not isinstance(record, dict) or record.get("format") != expected_format:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path} is not an fcnzoo {what} (format={found!r}, expected {expected_format!r})")
    for key, kind in REQUIRED_KEYS.get(expected_format, {}).items():
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            problem = "lacks" if key not in record else f"has a {type(record[key]).__name__} for"
            raise ValueError(f"{path} {problem} {key!r} (a JSON {kind.__name__} is expected); the {what} is damaged "
                             f"or hand-edited: save it again")
    return record


def weights_digest(data: bytes) -> dict[str, str]:
    """{"weights_sha256": ...} for a saved directory's config: loading checks the weights file against it."""
    return {"weights_sha256": hashlib.sha256(data).hexdigest()}


def check_weights_file(directory: Path, config: Mapping[str, Any]) -> Path:
    """The weights file of a saved directory, after checking its sha256 against the config's (when recorded)."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found: the saved directory is incomplete")
    expected = config.get("weights_sha256")
    if expected is not None and sha256_file(path) != expected:
        raise ValueError(f"{path} does not match the sha256 its config records: the file is damaged or was "
                         f"replaced; save the model again")
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved fcnzoo model: {CONFIG_FILE} is missing")
    return read_json_record(path, FORMAT, "saved model")


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a safetensors file; a damaged file gives a ValueError naming it."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    try:
        weights = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated headers/data
        raise ValueError(f"cannot read weights from {path}: {e}. The file is truncated or not safetensors.") from None
    bad = sorted(k for k, v in weights.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all())
    if bad:
        raise ValueError(f"{path} holds NaN or infinite values in {len(bad)} tensor(s): {', '.join(bad[:10])}"
                         f"{' ...' if len(bad) > 10 else ''}; these weights are broken (a diverged run?)")
    return {k.removesuffix(_LEGACY_SUFFIX): v for k, v in weights.items()}


def load_model(directory: str | os.PathLike, *, dtype=jnp.float32) -> nnx.Module:
    """Rebuild a model saved by `save_model`, in eval mode."""
    import zoo

    directory = Path(directory)
    config = read_config(directory)
    kwargs = dict(config["kwargs"])
    if "input_size" in kwargs and isinstance(kwargs["input_size"], list):
        kwargs["input_size"] = tuple(kwargs["input_size"])
    model = zoo.create_model(config["model"], dtype=dtype, **kwargs)
    weights_path = check_weights_file(directory, config)
    load_flat_into(model, read_weights(weights_path), source=str(weights_path))
    model.eval()
    return model

