"""Reading a classifier as an ordered list of steps, without knowing its class.

Three ways a classifier can be written, all read here:

- the zoo protocol (`zoo.classifier.Classifier`): `features`, then a `Head` that is data;
- `nnx.Sequential(...)`: its `layers`, which may be modules or plain callables
  (`jax.nn.relu`, `functools.partial(nnx.max_pool, ...)`, a reshape lambda);
- a small `nnx.Module` whose `__call__` chains its submodules: the call order is
  recorded while tracing abstractly, and checked to be a plain chain (each call
  takes exactly the previous call's output).

Plain callables are identified by what they do on probe inputs, never by name:
rank 4 -> rank 2 with h*w*c features equal to a row-major reshape is a flatten,
with c features equal to the spatial mean a global average pool; a callable that
keeps the shape and commutes with any permutation of the elements is element-wise
(an activation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.layers import ACTIVATIONS, Activation, Flatten, GlobalAvgPool


class ConversionError(ValueError):
    """A classifier that cannot be turned into a fully convolutional network; says which layer and why."""


@dataclasses.dataclass
class Step:
    """One call in a classifier's forward pass.

    name: path of the layer inside the model (e.g. "layers.3", "fc1").
    layer: the module or plain callable.
    in_shape, out_shape: abstract shapes seen at the training input size.
    """

    name: str
    layer: Callable
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


def layer_label(name: str, layer: Any) -> str:
    kind = type(layer).__name__
    if kind == "function":
        kind = getattr(layer, "__name__", "function")
    elif kind == "partial":
        kind = f"partial({getattr(layer.func, '__name__', layer.func)})"
    return f"layer {name!r} ({kind})"


def _shape_of(fn: Callable, shape: tuple[int, ...], dtype=jnp.float32) -> tuple[int, ...]:
    """Abstract output shape of fn on an input of `shape`; modules are not modified."""
    if isinstance(fn, nnx.Module):
        graphdef, state = nnx.split(fn)
        out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct(shape, dtype))
    else:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, dtype))
    return tuple(getattr(out, "shape", ()))


def _probe(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, *shape[1:])).astype(np.float32)


def is_elementwise(fn: Callable, shape: tuple[int, ...]) -> bool:
    """True when fn keeps the shape and commutes with a random permutation of all elements."""
    x = _probe(shape)
    try:
        y = np.asarray(fn(jnp.asarray(x)))
    except Exception:
        return False
    if y.shape != x.shape:
        return False
    perm = np.random.default_rng(1).permutation(x.size)
    y_perm = np.asarray(fn(jnp.asarray(x.reshape(-1)[perm].reshape(x.shape))))
    return np.allclose(y_perm, y.reshape(-1)[perm].reshape(x.shape), rtol=1e-6, atol=1e-6, equal_nan=True)


def is_per_position(fn: Callable, width: int) -> bool:
    """True when fn maps (N, width) rows independently (softmax over classes, feature slicing, ...)."""
    x = _probe((2, width), seed=3)
    try:
        y = np.asarray(fn(jnp.asarray(x)))
        single = np.asarray(fn(jnp.asarray(x[1:])))
    except Exception:
        return False
    return y.ndim == 2 and y.shape[0] == 2 and np.allclose(y[1:], single, rtol=1e-6, atol=1e-6)


def activation_name(fn: Callable) -> str | None:
    """The `zoo.layers.ACTIVATIONS` name of an element-wise callable, found by comparing outputs."""
    if isinstance(fn, Activation):
        return fn.name
    x = np.linspace(-4, 4, 97, dtype=np.float32)
    try:
        y = np.asarray(fn(jnp.asarray(x)))
    except Exception:
        return None
    for name, reference in ACTIVATIONS.items():
        if np.allclose(y, np.asarray(reference(jnp.asarray(x))), rtol=1e-6, atol=1e-6):
            return name
    return None


def pool_kind(fn: Callable, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> str | None:
    """"flatten" or "avg" for a (N, h, w, c) -> (N, k) callable, checked numerically; else None."""
    if isinstance(fn, Flatten):
        return "flatten"
    if isinstance(fn, GlobalAvgPool):
        return "avg"
    if len(in_shape) != 4 or len(out_shape) != 2:
        return None
    _, h, w, c = in_shape
    x = _probe(in_shape, seed=2)
    y = np.asarray(fn(jnp.asarray(x)))
    if out_shape[1] == h * w * c and np.array_equal(y, x.reshape(x.shape[0], -1)):
        return "flatten"
    if out_shape[1] == c and np.allclose(y, x.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6):
        return "avg"
    return None


def _direct_layers(module: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """(name, submodule) for each public attribute that is a module, with lists of modules
    (`nnx.List`, e.g. a ResNet stage) opened into "stage1.0", "stage1.1", ..."""
    layers = []
    for name, child in vars(module).items():
        if name.startswith("_"):
            continue
        if isinstance(child, (nnx.List, list, tuple)):
            layers += [(f"{name}.{i}", c) for i, c in enumerate(child) if isinstance(c, nnx.Module)]
        elif isinstance(child, nnx.Module):
            layers.append((name, child))
    return layers


def _record_chain(module: nnx.Module, in_shape: tuple[int, ...], dtype) -> list[Step]:
    """The submodules `module.__call__` calls, in order, checked to form a plain chain.

    The module is traced abstractly on a merged copy whose direct submodules are
    swapped for recording subclasses; the model itself is never touched.
    """
    graphdef, state = nnx.split(module)
    calls: list[tuple[str, Any, Any]] = []
    model_io: dict[str, Any] = {}

    def recording(name: str, cls: type):
        def call(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            calls.append((name, args, kwargs, out))
            return out

        return type(f"Recording{cls.__name__}", (cls,), {"__call__": call})

    def run(state, x):
        copy = nnx.merge(graphdef, state)
        for name, child in _direct_layers(copy):
            child.__class__ = recording(name, type(child))
        model_io["in"] = x
        y = copy(x)
        model_io["out"] = y
        return y

    jax.eval_shape(run, state, jax.ShapeDtypeStruct(in_shape, dtype))
    how = ("Write the whole forward pass as a chain of layers (`nnx.Sequential`, or submodules each "
           "called on the previous one's output, using zoo.layers.Activation / Flatten for functions), "
           "or follow the zoo protocol: expose `features` (the backbone) and `head` (zoo.classifier.Head).")
    layers = dict(_direct_layers(module))
    steps: list[Step] = []
    current = model_io["in"]
    for name, args, kwargs, out in calls:
        if len(args) != 1 or kwargs or args[0] is not current:
            raise ConversionError(
                f"cannot read {type(module).__name__} as a chain of layers: submodule {name!r} is not called on "
                f"the previous layer's output (something else happens between the layers, e.g. a plain "
                f"function call or a skip connection). {how}")
        steps.append(Step(name, layers[name], tuple(current.shape), tuple(out.shape)))
        current = out
    if current is not model_io["out"]:
        raise ConversionError(
            f"cannot read {type(module).__name__} as a chain of layers: its output is not the last "
            f"submodule's output (a plain function is applied after it). {how}")
    return steps


def forward_steps(module: Callable, in_shape: tuple[int, ...], *, dtype=jnp.float32, prefix: str = "") -> list[Step]:
    """The forward pass of `module` as an ordered list of steps (see the module docstring).

    Composite steps are not expanded here; `expand` does that for the step that holds the head.
    """
    if isinstance(module, nnx.Sequential):
        steps, shape = [], tuple(in_shape)
        for i, layer in enumerate(module.layers):
            try:
                out = _shape_of(layer, shape, dtype)
            except Exception as e:
                raise ConversionError(
                    f"{layer_label(f'{prefix}layers.{i}', layer)} fails on the shape {shape} it receives "
                    f"({type(e).__name__}: {str(e).splitlines()[0]}); pass the input_shape the model was "
                    f"trained on") from None
            steps.append(Step(f"{prefix}layers.{i}", layer, shape, out))
            shape = out
        return steps
    steps = _record_chain(module, tuple(in_shape), dtype)
    for s in steps:
        s.name = prefix + s.name
    return steps


LEAF_TYPES = (nnx.Linear, nnx.Conv, nnx.Dropout, nnx.BatchNorm, nnx.LayerNorm)


def is_composite(layer: Any) -> bool:
    """A module made of other modules that is not a known single layer."""
    if not isinstance(layer, nnx.Module) or isinstance(layer, LEAF_TYPES):
        return False
    return any(isinstance(v, nnx.Module) for _, v in nnx.iter_graph(layer) if v is not layer)
