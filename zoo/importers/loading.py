"""Shared machinery of the importers: build a zoo model without initializing it, fill it loudly.

Both importers turn a foreign checkpoint into {clean dotted path: numpy array},
e.g. "features.stem.conv.kernel", then call `fill_model`. Building the model
abstractly (`nnx.eval_shape`) and filling it skips the random initialization,
which on a CPU compiles one small XLA program per parameter shape and takes
longer than reading the file. Weights are copied in by
`zoo.saving.load_flat_into`, so a file that does not fit is reported weight by
weight: missing, unexpected, mismatched shapes.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import zoo
from zoo import saving

WEIGHTS = (nnx.Param, nnx.BatchStat)


@dataclasses.dataclass
class Imported:
    """A zoo model holding imported weights, and what it takes to rebuild it.

    Attributes:
        model: the `zoo.classifier.Classifier`, in eval mode.
        model_name: its registry name, e.g. "resnet50".
        kwargs: `zoo.create_model` keyword arguments that rebuild the architecture
            (num_classes, input_size, include_top and the family options the source needs).
        metadata: where the weights came from and how to preprocess images for them.
    """

    model: nnx.Module
    model_name: str
    kwargs: dict[str, Any]
    metadata: dict[str, Any]

    def save(self, directory: str | os.PathLike) -> Path:
        """Save as an fcnzoo model directory; `zoo.saving.load_model(directory)` reads it back."""
        return saving.save_model(self.model, directory, model_name=self.model_name, kwargs=self.kwargs,
                                 metadata=self.metadata)


def _clean_key(path) -> str:
    # Only the module-tree part of a path (dict keys and list indices); the Variable's
    # `.value` attribute that some flax versions add to state paths is left out.
    return ".".join(str(p.key) if hasattr(p, "key") else str(p.idx)
                    for p in path if hasattr(p, "key") or hasattr(p, "idx"))


def weight_keys(model: nnx.Module) -> dict[str, str]:
    """{clean dotted path: the key `zoo.saving` uses} for every Param and BatchStat of `model`."""
    leaves = jax.tree.leaves_with_path(nnx.state(model, WEIGHTS))
    return {_clean_key(path): saving._path_key(path) for path, _ in leaves}


def weight_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """{clean dotted path: shape} of every Param and BatchStat; works on abstract models."""
    leaves = jax.tree.leaves_with_path(nnx.state(model, WEIGHTS))
    return {_clean_key(path): tuple(leaf.shape) for path, leaf in leaves}


def head_dense_paths(model: nnx.Module) -> list[str]:
    """Paths of the head's Dense layers in order, e.g. ["head.layers.0", "head.layers.3", "head.layers.6"]."""
    head = getattr(model, "head", None)
    if head is None:
        return []
    return [f"head.layers.{i}" for i, layer in enumerate(head.layers) if isinstance(layer, nnx.Linear)]


def build_abstract(name: str, **kwargs) -> nnx.Module:
    """The registry model `name` with every array a ShapeDtypeStruct (nothing initialized)."""
    return zoo.create_model(name, abstract=True, **kwargs)


def _initialize_leftovers(model: nnx.Module, reinitialize: list[str], seed: int) -> None:
    """Give concrete values to what the file did not provide.

    Dense layers under `reinitialize` get Flax's default initialization (LeCun-normal
    kernel, zero bias): a new classifier for a new set of classes. Random-stream
    state (dropout, stochastic depth) gets fresh keys and zero counters.
    """
    key = jax.random.key(seed)
    for i, path in enumerate(reinitialize):
        layer = model
        for part in path.split("."):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        fresh = nnx.Linear(layer.in_features, layer.out_features, use_bias=layer.use_bias,
                           rngs=nnx.Rngs(params=jax.random.fold_in(key, i)))
        layer.kernel.set_value(fresh.kernel.get_value())
        if layer.use_bias:
            layer.bias.set_value(fresh.bias.get_value())
    _, state = nnx.split(model)
    streams = itertools.count(len(reinitialize))

    def concrete(leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.fold_in(key, next(streams))
        return jnp.zeros(leaf.shape, leaf.dtype)  # counters of random streams

    nnx.update(model, jax.tree.map(concrete, state))


def fill_model(
    model: nnx.Module,
    weights: Mapping[str, np.ndarray],
    *,
    skip: Iterable[str] = (),
    source: str,
    seed: int = 0,
) -> nnx.Module:
    """Load `weights` ({clean path: array}) into an abstract or concrete `model`, in eval mode.

    Args:
        skip: prefixes of Dense layers not taken from the file (e.g. "head.layers.6" for a
            new number of classes); they are freshly initialized instead.
        source: names the file in error messages.
    Raises:
        zoo.saving.WeightsMismatchError listing missing, unexpected and mismatched weights.
    """
    keys = weight_keys(model)
    translated = {keys.get(k, k): np.asarray(v) for k, v in weights.items()}
    skip = tuple(skip)
    # Skip prefixes name modules, so they match the saving keys as they match the clean paths.
    saving.load_flat_into(model, translated, skip=skip, source=source)
    dense = [p for p in _dense_paths(model) if any(p == s or p.startswith(s + ".") for s in skip)]
    _initialize_leftovers(model, dense, seed)
    model.eval()
    return model


def _dense_paths(model: nnx.Module) -> list[str]:
    return [".".join(str(p) for p in path) for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Linear)]
