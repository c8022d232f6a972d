"""The one protocol every zoo classifier follows: `features` then `head`.

    Classifier(x) = head(features(x))
    features: (N, H, W, C) -> (N, h, w, c)      convolutional backbone
    head:     (N, h, w, c) -> (N, num_classes)  pool step, then Dense layers

The head is data: `Head.pool` is "flatten" (LeNet-5, AlexNet, VGG) or "avg"
(global average pooling: GoogLeNet, ResNet, SENet, Xception, EfficientNet),
and `Head.layers` is a sequence of `nnx.Linear`, `zoo.layers.Activation` and
`nnx.Dropout` only. `convert` reads exactly this, and nothing of a family's
file, to turn the head into convolutions. `Head.describe()` gives the same
facts as plain dicts for tools and JSON.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.layers import Activation

if TYPE_CHECKING:
    from zoo.stages import Stage

HEAD_POOLS = ("flatten", "avg")


class Head(nnx.Module):
    """Pool step plus Dense/activation/dropout layers.

    Args:
        pool: "flatten" or "avg".
        layers: `nnx.Linear`, `Activation` or `nnx.Dropout` modules, applied in order.
    x: (N, h, w, c) -> (N, num_classes)
    """

    def __init__(self, pool: str, layers: Sequence[nnx.Module]):
        if pool not in HEAD_POOLS:
            raise ValueError(f"head pool must be one of {HEAD_POOLS}, got {pool!r}")
        for layer in layers:
            if not isinstance(layer, (nnx.Linear, Activation, nnx.Dropout)):
                raise TypeError(
                    f"a Head holds only nnx.Linear, Activation and nnx.Dropout layers, got {type(layer).__name__}"
                )
        self.pool = pool
        self.layers = nnx.List(layers)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1) if self.pool == "flatten" else x.mean(axis=(1, 2))
        for layer in self.layers:
            x = layer(x)
        return x

    def describe(self) -> list[dict]:
        """The head as plain data, one dict per step (the pool step first)."""
        steps: list[dict] = [{"op": self.pool}]
        for i, layer in enumerate(self.layers):
            if isinstance(layer, nnx.Linear):
                steps.append({"op": "dense", "name": f"layers.{i}",
                              "in_features": layer.in_features, "out_features": layer.out_features})
            elif isinstance(layer, Activation):
                steps.append({"op": "activation", "name": f"layers.{i}", "fn": layer.name})
            else:
                steps.append({"op": "dropout", "name": f"layers.{i}", "rate": layer.rate})
        return steps


def dense_head(
    pool: str,
    in_features: int,
    num_classes: int,
    *,
    hidden: Sequence[int] = (),
    activation: str = "relu",
    dropout: float = 0.0,
    dropout_first: bool = False,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> Head:
    """The usual head: [Dropout] Dense -> act -> Dropout -> ... -> Dense(num_classes).

    `hidden` lists the widths of the hidden Dense layers (VGG: (4096, 4096)).
    `dropout_first` puts a dropout before the first Dense (GoogLeNet, EfficientNet).
    """
    layers: list[nnx.Module] = []
    if dropout_first and dropout > 0:
        layers.append(nnx.Dropout(dropout, rngs=rngs))
    width = in_features
    for h in hidden:
        layers += [nnx.Linear(width, h, dtype=dtype, rngs=rngs), Activation(activation)]
        if dropout > 0:
            layers.append(nnx.Dropout(dropout, rngs=rngs))
        width = h
    layers.append(nnx.Linear(width, num_classes, dtype=dtype, rngs=rngs))
    return Head(pool, layers)


def check_images(x, *, channels: int, min_size: tuple[int, int], name: str) -> None:
    """Raise a ValueError that says what to do when `x` is not a valid image batch.

    x: (N, H, W, channels) with H >= min_size[0] and W >= min_size[1].
    Runs on static shapes, so it fires before anything is traced or compiled.
    """
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 4:
        hint = " Add a batch axis, e.g. x[None]." if len(shape) == 3 else ""
        raise ValueError(
            f"{name} expects a batch of images shaped (N, H, W, {channels}) (NHWC); got shape {shape}.{hint}"
        )
    if shape[-1] != channels:
        raise ValueError(
            f"{name} expects {channels} channel(s) in the last axis (NHWC), got {shape[-1]} "
            f"(input shape {shape}). Pass images as (N, H, W, {channels}), or create the model "
            f"with in_channels={shape[-1]}."
        )
    if shape[1] < min_size[0] or shape[2] < min_size[1]:
        raise ValueError(
            f"{name} needs images of at least {min_size[0]}x{min_size[1]} pixels (HxW); "
            f"got {shape[1]}x{shape[2]}. Resize or pad the input."
        )


class Classifier(nnx.Module):
    """A convolutional classifier: `head(features(x))`; `head` is None for feature extraction.

    Args:
        features: backbone, (N, H, W, C) -> (N, h, w, c).
        head: a `Head`, or None (`include_top=False`): the model then returns the feature map.
        input_shape: (H, W, C) the model was built for (the Flatten head fixes h, w).
        min_size: smallest (H, W) the backbone accepts.
        name: used in error messages.
        stages: the backbone's multi-scale maps (`zoo.stages.Stage`), strides increasing, the
            last one the backbone's output; declared by each family from its variant's data.
    """

    def __init__(self, features: nnx.Module, head: Head | None, *, input_shape, min_size, name: str,
                 stages: Sequence[Stage] = ()):
        self.features = features
        self.head = head
        self.input_shape = tuple(input_shape)
        self.min_size = tuple(min_size)
        self.name = name
        self.stages = tuple(stages)

    def __call__(self, x):
        check_images(x, channels=self.input_shape[-1], min_size=self.min_size, name=self.name)
        y = self.features(x)
        if self.head is None:
            return y
        if self.head.pool == "flatten":
            expected = next(layer for layer in self.head.layers if isinstance(layer, nnx.Linear))
            got = y.shape[1] * y.shape[2] * y.shape[3]
            if got != expected.in_features:
                raise ValueError(
                    f"{self.name}'s Flatten head was built for {self.input_shape[0]}x{self.input_shape[1]} "
                    f"inputs ({expected.in_features} features); a {x.shape[1]}x{x.shape[2]} input gives a "
                    f"{y.shape[1]}x{y.shape[2]}x{y.shape[3]} map ({got} features). Create the model with "
                    f"input_size=({x.shape[1]}, {x.shape[2]}), or run it fully convolutionally with "
                    f"convert.to_fcn for dense prediction on any size."
                )
        return self.head(y)


@contextlib.contextmanager
def cheap_tracer_error_messages():
    """Make tracing large models under `nnx.eval_shape` linear-time again.

    With flax 0.12.8 / jax 0.10.2, every RNG draw while tracing probes a tracer's
    `sharding`, which raises an AttributeError whose message JAX builds by scanning
    the whole trace so far (`_origin_msg`): quadratic in model size (resnet152:
    25 s instead of 4.6 s). flax catches and discards that message, so we skip
    building it for the duration of the trace.
    """
    from jax._src.interpreters import partial_eval

    tracer = partial_eval.DynamicJaxprTracer
    original = tracer._origin_msg
    tracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        tracer._origin_msg = original


def output_shape(module: nnx.Module, input_shape: Sequence[int], dtype=jnp.float32) -> tuple[int, ...]:
    """Shape of `module(x)` for x of `input_shape`, computed abstractly (nothing is run).

    The module is not modified (BatchNorm statistics, RNG counters stay as they were).
    """
    graphdef, state = nnx.split(module)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    with cheap_tracer_error_messages():
        out = jax.eval_shape(apply, state, jax.ShapeDtypeStruct(tuple(input_shape), dtype))
    return tuple(out.shape)
