"""Saved fully convolutional networks: data and safetensors, never pickle.

A saved FCN is a directory:

    fcn.json             {"format": "fcnzoo-fcn", "source": {model, kwargs, metadata},
                          "input_shape", "feature_shape", "pool", "head": [...], "geometry": {...}}
    weights.safetensors  backbone.* and head.* weights, keyed by dotted path

`load_fcn(dir)` rebuilds the backbone from the registry config of the source
model (the zoo's `features` of that variant) and the head from its description
as data, then fills both loudly through `zoo.saving.load_flat_into`. Neither the
classifier's head nor any user class is needed. An FCN converted from a Keras file
(`convert.keras_file`) keeps its backbone as data instead, in `source.kwargs.features`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import keras_file
from convert.fcn import FCN, ValidAvgPool, to_fcn
from zoo import saving
from zoo.layers import Activation
from zoo.stages import find_stages

FCN_FORMAT = "fcnzoo-fcn"
FCN_CONFIG = "fcn.json"


def save_fcn(fcn: FCN, directory: str | os.PathLike, *, source: dict) -> Path:
    """Save `fcn`, converted from the registry model described by `source` ({"model", "kwargs"}).

    Raises a ValueError when the head holds a function with no zoo name (it cannot be stored as data).
    """
    from safetensors.numpy import save

    spec = fcn.describe()
    unnamed = [s["name"] for s in spec if (s["op"] == "activation" and s["fn"] is None) or s["op"] == "per_position"]
    if unnamed:
        raise ValueError(f"head activation(s) {unnamed} are plain functions with no zoo.layers.ACTIVATIONS name and cannot be saved "
                         f"as data; use zoo.layers.Activation in the classifier")
    config = {
        "format": FCN_FORMAT,
        "source": {"model": source["model"], "kwargs": dict(source.get("kwargs", {})),
                   "metadata": dict(source.get("metadata", {}))},
        "input_shape": list(fcn.input_shape),
        "feature_shape": list(fcn.feature_shape),
        "pool": fcn.pool,
        "head": spec,
        "geometry": fcn.geometry.to_dict(),
    }
    weights = save({k: np.ascontiguousarray(v) for k, v in saving.flat_state(fcn).items()})
    config.update(saving.weights_digest(weights))
    directory = Path(directory)
    saving.write_files_atomically(directory, {saving.WEIGHTS_FILE: weights})
    saving.write_files_atomically(directory, {FCN_CONFIG: json.dumps(config, indent=2).encode()})
    return directory


def _head_from_spec(spec: list[dict], dtype) -> list[nnx.Module]:
    modules = []
    for step in spec[1:]:
        op = step["op"]
        if op == "conv":
            modules.append(nnx.Conv(step["in_features"], step["out_features"], kernel_size=tuple(step["kernel_size"]),
                                    padding="VALID", use_bias=step["use_bias"], dtype=dtype, rngs=nnx.Rngs(0)))
        elif op == "activation":
            modules.append(Activation(step["fn"]))
        elif op == "dropout":
            modules.append(nnx.Dropout(step["rate"], rngs=nnx.Rngs(dropout=0)))
        elif op == "avg_pool":
            modules.append(ValidAvgPool(window=tuple(step["window"]), strides=1, padding="VALID"))
        else:
            raise ValueError(f"unknown head step {step!r} in {FCN_CONFIG}; the file is damaged or newer than this code")
    return modules


def load_fcn(directory: str | os.PathLike, *, dtype=jnp.float32) -> FCN:
    """Rebuild an FCN saved by `save_fcn`, in eval mode."""
    import zoo

    directory = Path(directory)
    path = directory / FCN_CONFIG
    if not path.is_file():
        hint = " (it is a saved classifier: convert it with `zoo convert`)" if (directory / saving.CONFIG_FILE).is_file() else ""
        raise FileNotFoundError(f"{directory} is not a saved fcnzoo FCN: {FCN_CONFIG} is missing{hint}")
    config = saving.read_json_record(path, FCN_FORMAT, "FCN config")
    source = config["source"]
    kwargs = dict(source["kwargs"])
    if isinstance(kwargs.get("input_size"), list):
        kwargs["input_size"] = tuple(kwargs["input_size"])
    if source["model"] == keras_file.KERAS_SOURCE:
        features = keras_file.build_features(kwargs["features"])
        stages = find_stages(features, tuple(config["input_shape"]))
        name = source["metadata"].get("name", source["model"])
    else:
        features_model = zoo.create_model(source["model"], dtype=dtype, include_top=False, **kwargs)
        features, stages, name = features_model.features, features_model.stages, source["model"]
    fcn = FCN(features, _head_from_spec(config["head"], dtype), head_spec=config["head"],
              input_shape=config["input_shape"], feature_shape=config["feature_shape"], pool=config["pool"],
              source=name, stages=stages)
    weights_path = saving.check_weights_file(directory, config)
    saving.load_flat_into(fcn, saving.read_weights(weights_path), source=str(weights_path))
    fcn.eval()
    return fcn


def load_any(path: str | os.PathLike, *, dtype=jnp.float32) -> FCN:
    """An FCN from a saved FCN dir, a saved classifier dir or a Keras model file (converted now), or a registry name."""
    p = Path(path)
    if keras_file.is_keras_file(p):
        return keras_file.from_keras(p)
    if (p / FCN_CONFIG).is_file():
        return load_fcn(p, dtype=dtype)
    if (p / saving.CONFIG_FILE).is_file():
        return to_fcn(saving.load_model(p, dtype=dtype))
    if p.exists():
        raise ValueError(f"{p} is neither a saved classifier ({saving.CONFIG_FILE}) nor a saved FCN ({FCN_CONFIG})")
    import zoo

    model = zoo.create_model(str(path), dtype=dtype)
    model.eval()
    return to_fcn(model)


def convert_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                       force: bool = False) -> tuple[FCN, Path]:
    """Turn a saved classifier (zoo.saving format) or a Keras model file (.keras, full-model .h5) into a saved FCN.

    `out` must be new or empty, or hold an earlier saved FCN (replaced only with `force`): it is never
    a saved classifier or anything else (`zoo.saving.check_output_dir`), checked before anything is read.
    """
    saving.check_output_dir(out, owns={FCN_CONFIG, saving.WEIGHTS_FILE}, what="saved FCN", force=force)
    if keras_file.is_keras_file(checkpoint):
        model, spec = keras_file.keras_classifier(checkpoint)
        fcn = to_fcn(model)
        return fcn, save_fcn(fcn, out, source=keras_file.keras_source(spec))
    config = saving.read_config(checkpoint)
    model = saving.load_model(checkpoint)
    fcn = to_fcn(model)
    return fcn, save_fcn(fcn, out, source=config)
