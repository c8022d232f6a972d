"""Turning a trained classifier into a fully convolutional network, weights unchanged.

Long, Shelhamer & Darrell 2015, "Fully Convolutional Networks for Semantic
Segmentation", https://arxiv.org/abs/1411.4038 (sec. 3.1: a Dense layer is a
convolution whose kernel covers its whole input region), and Sermanet et al.
2014, "OverFeat", https://arxiv.org/abs/1312.6229 (dense sliding-window
evaluation by running the classifier convolutionally).

    classifier: (N, H, W, C) -> (N, K)
    to_fcn(classifier): (N, H', W', C) -> (N, h', w', K), cell (i, j) = the classifier's
        answer for the input window `fcn.geometry.window(i, j)`.

Flatten heads: the first Dense after the Flatten becomes a VALID conv whose
kernel covers the training feature map, its (h*w*c, n) kernel reshaped to
(h, w, c, n) in the row-major order Flatten uses; later Dense layers become 1x1
convs. Average-pool heads: mean-then-affine equals affine-then-mean, so the Dense
layers up to the first nonlinearity become 1x1 convs applied before the pool,
and the global mean becomes an average pool with window = the training feature
map, stride 1; layers after the first nonlinearity run as 1x1 convs on the
pooled map. Nothing here imports an architecture file: the model is read from
the `zoo.classifier` protocol, as a chain of layers, or from the trace of its
forward pass (`convert.trace`; Flax Linen modules through `convert.linen`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.geometry import Geometry, walk_geometry
from convert.trace import (ConversionError, NotAChain, Step, _shape_of, activation_name, forward_steps,
                           is_composite, is_elementwise, is_per_position, layer_label, pool_kind, read_traced)
from zoo import cpu_conv
from zoo.classifier import check_images
from zoo.layers import Activation, AvgPool
from zoo.stages import Stage, find_stages


class Elementwise(nnx.Module):
    """An element-wise function kept as it was (a user's activation with no zoo name)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class ValidAvgPool(AvgPool):
    """`zoo.layers.AvgPool` for VALID padding, without counting the pixels of each window.

    With VALID padding every window is full, so the mean is sum / window size. Counting
    (count_include_pad=False) builds an all-ones image as large as the input that XLA then
    constant-folds at every compilation: seconds per shape bucket on a large image.
    x: (N, H, W, C) -> (N, H', W', C)
    """

    def __call__(self, x):
        return nnx.avg_pool(x, self.window, strides=self.strides, padding="VALID", count_include_pad=True)


def use_fast_valid_pools(module: nnx.Module) -> None:
    """Swap every VALID `AvgPool` inside `module` (which we own) for the equivalent `ValidAvgPool`."""
    for _, node in nnx.iter_graph(module):
        if type(node) is AvgPool and isinstance(node.padding, str) and node.padding.upper() == "VALID":
            node.__class__ = ValidAvgPool


class PerPosition(nnx.Module):
    """A function of one feature vector (e.g. softmax over classes) applied at every position.

    x: (N, h, w, c) -> (N, h, w, c')
    """

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, x):
        y = self.fn(x.reshape(-1, x.shape[-1]))
        return y.reshape(*x.shape[:-1], y.shape[-1])


class FCN(nnx.Module):
    """A classifier run fully convolutionally: backbone, then the head as convolutions.

    Args:
        backbone: the classifier's convolutional part (a copy, weights shared with nothing).
        head: modules applied in order (nnx.Conv, Activation, nnx.Dropout, AvgPool).
        head_spec: the head as data, one dict per module (see `describe`).
        input_shape: (H, W, C) the classifier was trained on.
        feature_shape: (h, w, c) of the backbone at that size.
        pool: "flatten" or "avg", the source head's pool step.
        source: the source model's name.
        stages: the backbone's stages (`zoo.stages.Stage`), what the segmentation decoders read.
    x: (N, H', W', C) -> (N, h', w', K)
    """

    def __init__(self, backbone: Callable, head: Sequence[nnx.Module], *, head_spec: list[dict],
                 input_shape, feature_shape, pool: str, source: str, stages: Sequence[Stage] = ()):
        if isinstance(backbone, nnx.Module):
            use_fast_valid_pools(backbone)
        self.backbone = backbone
        self.head = nnx.List(head)
        self.head_spec_json = json.dumps(head_spec)
        self.input_shape = tuple(input_shape)
        self.feature_shape = tuple(feature_shape)
        self.pool = pool
        self.source = source
        self.stages_json = json.dumps([s.to_dict() for s in stages])
        self._geometry: tuple | None = None
        cpu_conv.use_cpu_conv(self)  # the head's new convolutions (fc6 as a conv) too; zoo/cpu_conv.py

    @property
    def stages(self) -> list[Stage]:
        """The backbone's stages (name, stride, channels), coarsest last."""
        return [Stage(**d) for d in json.loads(self.stages_json)]

    # -- geometry -------------------------------------------------------------------------------
    def backbone_geometry(self) -> Geometry:
        """Geometry of the backbone's feature map (walked once, then cached)."""
        if self._geometry is None:
            g = walk_geometry(self.backbone, self.input_shape)
            self._geometry = tuple(sorted(g.to_dict().items()))
        d = dict(self._geometry)
        return Geometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def geometry(self) -> Geometry:
        """Geometry of the output grid: stride, receptive field, offset of cell (0, 0)'s window."""
        return self.backbone_geometry().then(self.feature_shape[:2])

    @property
    def score_map_geometry(self) -> Geometry:
        """Geometry of `score_map` (avg heads: one cell per feature-map position)."""
        return self.backbone_geometry() if self.pool == "avg" else self.geometry

    @property
    def min_size(self) -> tuple[int, int]:
        """Smallest (H, W) giving one output cell: the receptive field for VALID nets, else the training size."""
        g = self.geometry
        if g.valid:
            return tuple(int(r) for r in g.receptive_field)
        return self.input_shape[:2]

    @property
    def num_classes(self) -> int:
        return [s for s in self.describe() if s["op"] == "conv"][-1]["out_features"]

    def describe(self) -> list[dict]:
        """The converted head as plain data, one dict per module."""
        return json.loads(self.head_spec_json)

    # -- forward --------------------------------------------------------------------------------
    def _features(self, x):
        """Backbone map of x, with a clear error when x is too small for even one output cell."""
        check_images(x, channels=self.input_shape[-1], min_size=(1, 1), name=f"FCN({self.source})")
        try:
            y = self.backbone(x)
        except Exception:
            y = None
        if y is None or y.shape[1] < self.feature_shape[0] or y.shape[2] < self.feature_shape[1]:
            h, w = self.min_size
            raise ValueError(
                f"FCN({self.source}) needs images of at least {h}x{w} pixels (HxW) for one output cell "
                f"(the window the classifier judges); got {x.shape[1]}x{x.shape[2]}. Pad or resize the image.")
        return y

    def __call__(self, x):
        """x: (N, H, W, C) -> (N, h', w', K): one classifier answer per window."""
        y = self._features(x)
        for layer in self.head:
            y = layer(y)
        return y

    def score_map(self, x):
        """x: (N, H, W, C) -> the raw per-position scores (N, h, w, K) without the head's average pool.

        For avg heads every backbone position gets its own answer (finer than `__call__`);
        for flatten heads it is the same as `__call__`.
        """
        check_images(x, channels=self.input_shape[-1], min_size=(1, 1), name=f"FCN({self.source})")
        y = self.backbone(x)
        for layer in self.head:
            if not isinstance(layer, AvgPool):
                y = layer(y)
        return y


def _as_conv(dense: nnx.Linear, kernel_hw: tuple[int, int], in_channels: int, label: str) -> nnx.Conv:
    kh, kw = kernel_hw
    kernel = np.asarray(dense.kernel.get_value())
    if kernel.shape[0] != kh * kw * in_channels:
        raise ConversionError(
            f"{label} expects {kernel.shape[0]} input features but the map feeding it is "
            f"{kh}x{kw}x{in_channels} = {kh * kw * in_channels}; pass the input_shape the model was trained on")
    conv = nnx.Conv(in_channels, dense.out_features, kernel_size=(kh, kw), padding="VALID",
                    use_bias=dense.use_bias, dtype=dense.dtype, param_dtype=dense.param_dtype,
                    precision=dense.precision, rngs=nnx.Rngs(0))
    # Flatten is row-major over (h, w, c), so row (y*w + x)*c + ch of the Dense kernel is tap (y, x, ch).
    conv.kernel.set_value(jnp.asarray(kernel.reshape(kh, kw, in_channels, dense.out_features)))
    if dense.use_bias:
        conv.bias.set_value(jnp.asarray(dense.bias.get_value()))
    return conv


def convert_head(pool: str, layers: Sequence[tuple[str, Callable]], feature_shape) -> tuple[list, list[dict]]:
    """Head layers (after the pool step) -> (conv modules, head spec).

    layers: (name, layer) pairs, each an nnx.Linear, an nnx.Dropout or an element-wise callable.
    feature_shape: (h, w, c) of the map the pool step reads at the training size.
    """
    h, w, c = feature_shape
    modules, spec = [], []
    width = h * w * c if pool == "flatten" else c
    seen_dense, pooled = False, pool == "flatten"

    def add_pool():
        modules.append(ValidAvgPool(window=(h, w), strides=1, padding="VALID"))
        spec.append({"op": "avg_pool", "window": [h, w]})

    for name, layer in layers:
        label = layer_label(name, layer)
        if isinstance(layer, nnx.Linear):
            if layer.in_features != width:
                raise ConversionError(f"{label} expects {layer.in_features} features but receives {width}")
            flatten_kernel = pool == "flatten" and not seen_dense
            kernel_hw = (h, w) if flatten_kernel else (1, 1)
            modules.append(_as_conv(layer, kernel_hw, c if flatten_kernel else width, label))
            spec.append({"op": "conv", "name": name, "kernel_size": list(kernel_hw),
                         "in_features": modules[-1].in_features, "out_features": layer.out_features,
                         "use_bias": bool(layer.use_bias)})
            width, seen_dense = layer.out_features, True
        elif isinstance(layer, nnx.Dropout):
            modules.append(nnx.Dropout(layer.rate, rngs=nnx.Rngs(dropout=0)))
            spec.append({"op": "dropout", "name": name, "rate": float(layer.rate)})
        elif isinstance(layer, Activation) or is_elementwise(layer, (2, width)):
            fn_name = activation_name(layer)
            if not pooled and fn_name != "identity":
                add_pool()  # the mean must come before the first nonlinearity
                pooled = True
            modules.append(Activation(fn_name) if fn_name else Elementwise(layer))
            spec.append({"op": "activation", "name": name, "fn": fn_name})
        elif not isinstance(layer, nnx.Module) and is_per_position(layer, width):
            if not pooled:
                add_pool()
                pooled = True
            width = _shape_of(layer, (1, width))[-1]
            modules.append(PerPosition(layer))
            spec.append({"op": "per_position", "name": name, "fn": getattr(layer, "__name__", repr(layer))})
        else:
            raise ConversionError(
                f"{label} follows the head's {pool} step but is not a Dense (nnx.Linear), an element-wise "
                f"activation or a dropout, so it has no convolutional equivalent. Move it into the backbone "
                f"(before the {pool}) or replace it.")
    if not seen_dense:
        raise ConversionError("the head has no Dense (nnx.Linear) layer after its pool step: nothing to convert")
    if not pooled:
        add_pool()
    return modules, spec


def _split_chain(model: Callable, input_shape) -> tuple[list[Step], Step, list[Step]]:
    """Backbone steps, the pool step, head steps of a model written as a chain of layers."""
    steps = forward_steps(model, (1, *input_shape))
    k = 0
    while True:
        k = next((i for i, s in enumerate(steps) if len(s.out_shape) != 4), None)
        if k is None:
            raise ConversionError(
                f"no layer of {type(model).__name__} turns the (N, H, W, C) feature map into (N, features): "
                f"there is no Flatten or global average pool to convert (already fully convolutional?)")
        if is_composite(steps[k].layer):
            inner = forward_steps(steps[k].layer, steps[k].in_shape, prefix=steps[k].name + ".")
            steps = steps[:k] + inner + steps[k + 1:]
            continue
        break
    pool_step = steps[k]
    if pool_kind(pool_step.layer, pool_step.in_shape, pool_step.out_shape) is None:
        raise ConversionError(
            f"{layer_label(pool_step.name, pool_step.layer)} maps the feature map {pool_step.in_shape} to "
            f"{pool_step.out_shape} but is neither a row-major flatten nor a global average pool (checked on "
            f"probe inputs); use zoo.layers.Flatten or zoo.layers.GlobalAvgPool")
    head: list[Step] = []
    for s in steps[k + 1:]:
        head += forward_steps(s.layer, s.in_shape, prefix=s.name + ".") if is_composite(s.layer) else [s]
    for s in head:
        if len(s.out_shape) != 2:
            raise ConversionError(
                f"{layer_label(s.name, s.layer)} turns the flattened features back into a {len(s.out_shape)}-D "
                f"array {s.out_shape}: the Dense layers before it mix every position of the feature map, so "
                f"there is a Dense inside the convolutional part and the network cannot slide over larger "
                f"images. Only Dense, activation and dropout layers may follow the {pool_step.name} step.")
    return steps[:k], pool_step, head


def _is_linen(model) -> bool:
    try:
        import flax.linen as nn
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, nn.Module)


def to_fcn(model: Callable, variables=None, input_shape: Sequence[int] | None = None, *, name: str | None = None,
           apply_kwargs: dict | None = None) -> FCN:
    """Convert a classifier into a fully convolutional network with the same weights.

    Args:
        model: a `zoo.classifier.Classifier`, an `nnx.Sequential`, any nnx.Module classifier (its
            `__call__` may mix submodules and functions freely: it is read from its trace), or a
            Flax Linen module (then pass its `variables`).
        variables: a Linen module's variables ({"params": ..., "batch_stats": ...}). For NNX models
            the second positional argument is the input shape: `to_fcn(model, (28, 28, 1))`.
        input_shape: (H, W, C) the classifier was trained on (default: `model.input_shape`).
        name: used in messages and saved files (default: the model's name or class).
        apply_kwargs: Linen only: keyword arguments of an inference call (default: found from the
            signature, e.g. train=False); see `convert.linen`.
    Returns:
        an `FCN` in eval mode: (N, H', W', C) -> (N, h', w', K); at the training size
        the output is (N, 1, 1, K) and equals the classifier's logits.
    Raises:
        ConversionError (a ValueError) naming the layer, or the line of the forward pass, that cannot
        be converted and why.
    """
    linen = _is_linen(model)
    if not linen and variables is not None:
        if input_shape is not None or isinstance(variables, dict):
            raise ValueError(f"variables are for Flax Linen modules; {type(model).__name__} holds its own weights: "
                             f"to_fcn(model, input_shape=(H, W, C))")
        input_shape, variables = variables, None
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError("pass input_shape=(H, W, C), the image size the classifier was trained on")
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C), got {input_shape}")
    name = name or getattr(model, "name", None) or type(model).__name__
    if linen:
        from convert.linen import read_linen

        backbone, pool, head_layers = read_linen(model, variables, input_shape, apply_kwargs=apply_kwargs)
        return _assemble(backbone, pool, head_layers, input_shape, name, stages=())
    head_obj = getattr(model, "head", None)
    if hasattr(model, "features") and head_obj is not None and hasattr(head_obj, "pool"):
        backbone = nnx.clone(model.features)
        pool = head_obj.pool
        head_layers = [(f"head.layers.{i}", layer) for i, layer in enumerate(head_obj.layers)]
        stages = tuple(getattr(model, "stages", ()))
    elif hasattr(model, "features") and hasattr(model, "head") and head_obj is None:
        raise ConversionError(f"{name} has no head (include_top=False): it is already fully convolutional")
    else:
        try:
            before, pool_step, head = _split_chain(model, input_shape)
        except NotAChain:
            if not isinstance(model, nnx.Module):
                raise
            before = None
        if before is None:  # not a chain of layers: read what the forward pass computes from its trace
            copy = nnx.clone(model)
            copy.eval()
            backbone, pool, head_layers = read_traced(copy, input_shape, name=name)
        else:
            pool = pool_kind(pool_step.layer, pool_step.in_shape, pool_step.out_shape)
            backbone = nnx.clone(nnx.Sequential(*[s.layer for s in before]))
            head_layers = [(s.name, s.layer) for s in head]
        stages = ()
    return _assemble(backbone, pool, head_layers, input_shape, name, stages)


def _assemble(backbone, pool: str, head_layers, input_shape, name: str, stages) -> FCN:
    feature_shape = _shape_of(backbone, (1, *input_shape))
    if len(feature_shape) != 4:
        raise ConversionError(f"the backbone of {name} returns shape {feature_shape}, not a (N, h, w, c) map")
    modules, spec = convert_head(pool, head_layers, feature_shape[1:])
    if not stages:
        try:
            stages = find_stages(backbone, input_shape)
        except ValueError:  # no integer stride per stage (upsampling...): converts, but grows no decoder
            stages = ()
    fcn = FCN(backbone, modules, head_spec=[{"op": pool + "_head"}, *spec], input_shape=input_shape,
              feature_shape=feature_shape[1:], pool=pool, source=name, stages=stages)
    fcn.eval()
    return fcn
