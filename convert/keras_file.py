"""Keras classifiers, read from their files as data, into fully convolutional networks.

    fcn = convert.from_keras("model.keras")     # or a legacy full-model .h5, or a keras.Model in memory
    $ zoo convert model.keras --out model-fcn

A Keras 3 `.keras` file is a zip archive: `config.json` (the architecture, the JSON of
`keras.saving.serialize_keras_object`), `metadata.json` (the Keras version) and
`model.weights.h5` (each layer's variables under `layers/<class in snake case>[_k]/vars/<i>`,
numbered by class in `model.layers` order). The legacy `.h5` full-model file holds the same
architecture JSON in its `model_config` attribute and the weights under
`model_weights/<layer name>/`. Both are read here with `zipfile`, `json` and `h5py` only:
nothing in the file is executed, Keras is not imported, and a `Lambda` layer (code) is
refused by name.

The model must be a chain: a `Sequential`, or a functional model whose every layer takes
the previous one's output. Supported layers: InputLayer, Conv2D, DepthwiseConv2D,
SeparableConv2D, Dense (per position before the pool: a 1x1 convolution), MaxPooling2D,
AveragePooling2D, GlobalAveragePooling2D, GlobalMaxPooling2D, BatchNormalization, Dropout
(and SpatialDropout2D, GaussianNoise, GaussianDropout, AlphaDropout and the Random*
augmentation layers, which do nothing at inference), Flatten, Activation, ReLU,
LeakyReLU, ELU, Rescaling and ZeroPadding2D, channels-last. They become a zoo
`Classifier` (features: one step per Keras layer, named after it; head: pool, Dense,
activation, dropout) that computes what Keras's `predict` computes, except:

- a final softmax is left out: the classifier and its FCN return logits, as every zoo model
  does (softmax of the output is Keras's `predict`);
- a BatchNormalization after the pool is folded into the Dense layer beside it (exact at
  inference, which is what a converted network is for);
- GlobalMaxPooling2D becomes a max pool whose window is the training-size feature map,
  stride 1, then a flatten: the same at the training size, one maximum per training-size
  window on larger images.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo import saving
from zoo.classifier import Classifier, Head
from zoo.layers import Activation, AvgPool, MaxPool, NamedSequential

KERAS_SOURCE = "keras-file"  # the `source.model` of an FCN saved from a Keras file
KNOWN_MAJOR_VERSIONS = (2, 3)

# Keras activation names -> (function of x and the layer's parameters). Keras on JAX calls jax.nn.
KERAS_ACTIVATIONS = {
    "linear": lambda x: x,
    "relu": lambda x, negative_slope=0.0, max_value=None, threshold=0.0: _keras_relu(x, negative_slope, max_value,
                                                                                      threshold),
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x, negative_slope=0.2: jax.nn.leaky_relu(x, negative_slope),
    "elu": lambda x, alpha=1.0: jax.nn.elu(x, alpha),
    "selu": jax.nn.selu,
    "gelu": lambda x, approximate=False: jax.nn.gelu(x, approximate=approximate),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "softplus": jax.nn.softplus,
    "softsign": jax.nn.soft_sign,
    "hard_sigmoid": jax.nn.hard_sigmoid,
    "hard_silu": jax.nn.hard_silu,
    "hard_swish": jax.nn.hard_silu,
    "exponential": jnp.exp,
}
# Keras names computed exactly by a zoo.layers activation (walkable by the geometry, storable as data).
ZOO_NAMES = {"linear": "identity", "relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "silu": "silu",
             "swish": "silu"}
# Layers that do nothing at inference.
INFERENCE_IDENTITY = {"SpatialDropout1D", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
                      "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast",
                      "RandomBrightness", "ActivityRegularization"}


def _keras_relu(x, negative_slope=0.0, max_value=None, threshold=0.0):
    """keras.activations.relu with its parameters (as keras/src/activations/activations.py computes it)."""
    if negative_slope != 0.0 and max_value is None and threshold == 0:
        return jax.nn.leaky_relu(x, negative_slope)
    negative = jax.nn.relu(-x + threshold) if negative_slope != 0.0 else 0.0
    x = x * (x > threshold).astype(x.dtype) if threshold != 0 else jax.nn.relu(x)
    if max_value is not None:
        x = jnp.clip(x, 0.0, max_value)
    return x - negative_slope * negative


class KerasActivation(nnx.Module):
    """A Keras activation with no zoo equivalent (gelu without approximation, relu6, elu ...).

    x: any shape -> same shape
    """

    def __init__(self, fn: str, params: dict | None = None):
        if fn not in KERAS_ACTIVATIONS:
            raise ValueError(f"unknown Keras activation {fn!r}")
        self.fn = fn
        self.params = tuple(sorted((params or {}).items()))

    def __call__(self, x):
        return KERAS_ACTIVATIONS[self.fn](x, **dict(self.params))


class Rescale(nnx.Module):
    """keras.layers.Rescaling: x * scale + offset (scalars, or one value per channel)."""

    def __init__(self, scale, offset):
        self.scale = tuple(scale) if isinstance(scale, (list, tuple)) else float(scale)
        self.offset = tuple(offset) if isinstance(offset, (list, tuple)) else float(offset)

    def __call__(self, x):
        return x * jnp.asarray(self.scale, x.dtype) + jnp.asarray(self.offset, x.dtype)


class Pad2D(nnx.Module):
    """keras.layers.ZeroPadding2D: zeros around H and W. padding: ((top, bottom), (left, right))."""

    def __init__(self, padding):
        self.padding = tuple(tuple(int(p) for p in side) for side in padding)

    def __call__(self, x):
        return jnp.pad(x, ((0, 0), *self.padding, (0, 0)))


class KerasHead(Head):
    """A `zoo.classifier.Head` that may also hold Keras activations without a zoo name."""

    def __init__(self, pool: str, layers):
        self.pool = pool
        self.layers = nnx.List(layers)


# --------------------------------------------------------------------------- reading files


def _version(text, where: str) -> str:
    text = str(text.decode() if isinstance(text, bytes) else text or "")
    match = re.match(r"(\d+)\.(\d+)", text)
    if not match or int(match.group(1)) not in KNOWN_MAJOR_VERSIONS:
        raise ValueError(f"{where} was written by Keras {text or '(no version recorded)'}; this reader knows the "
                         f"files of Keras {' and '.join(f'{v}.x' for v in KNOWN_MAJOR_VERSIONS)}")
    return text


def _json(data, where: str) -> dict:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}): the file is damaged") \
            from None
    if not isinstance(value, dict):
        raise ValueError(f"{where} holds a {type(value).__name__}, not a Keras model description")
    return value


def read_keras_file(path: str | os.PathLike) -> dict:
    """The architecture and weights of a Keras model file, as data.

    Args:
        path: a Keras 3 `.keras` archive, or a legacy full-model `.h5` (tf.keras or Keras 3).
    Returns:
        {"config": the model's serialized config (dict), "weights": {"format": "keras3" | "legacy",
        ...}, "keras_version": str, "file": name}. Weights stay in the file's layout until
        `keras_classifier` matches them to layers.
    Raises:
        FileNotFoundError; ValueError (one line) for a damaged file, an unknown Keras version, a
        weights-only file.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Keras model file {path} not found")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
                missing = [n for n in ("config.json", "metadata.json", "model.weights.h5") if n not in names]
                if missing:
                    raise ValueError(f"{path} is a zip archive without {', '.join(missing)}: not a .keras model file")
                metadata = _json(archive.read("metadata.json"), f"{path} (metadata.json)")
                config = _json(archive.read("config.json"), f"{path} (config.json)")
                weights_bytes = archive.read("model.weights.h5")
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f"{path} is a damaged .keras archive ({e})") from None
        version = _version(metadata.get("keras_version"), str(path))
        try:
            with h5py.File(io.BytesIO(weights_bytes), "r") as f:
                weights = {"format": "keras3", "groups": _keras3_groups(f)}
        except OSError as e:
            raise ValueError(f"{path}: model.weights.h5 is not readable HDF5 ({e}): the file is damaged") from None
        return {"config": config, "weights": weights, "keras_version": version, "file": path.name}
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise ValueError(f"{path} is neither a .keras archive (zip) nor an HDF5 .h5 file: not a Keras model file") \
            from None
    with f:
        if "model_config" not in f.attrs:
            raise ValueError(f"{path} is a Keras weights-only file (no model_config): the architecture is not in it. "
                             f"Save the whole model (model.save('model.keras')), or import Keras Applications "
                             f"weights into a zoo model with `zoo import keras`")
        version = _version(f.attrs.get("keras_version"), str(path))
        config = _json(f.attrs["model_config"], f"{path} (model_config)")
        root = f.get("model_weights", f)
        layers = {}
        for layer_name in map(_text, root.attrs.get("layer_names", [])):
            group = root[layer_name]
            variables = {}
            for weight_name in map(_text, group.attrs.get("weight_names", [])):
                short = weight_name.rsplit("/", 1)[-1].split(":")[0]
                variables[short] = np.asarray(group[weight_name])
            layers[layer_name] = variables
        return {"config": config, "weights": {"format": "legacy", "layers": layers}, "keras_version": version,
                "file": path.name}


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _keras3_groups(f) -> dict[str, list[np.ndarray]]:
    groups = {}
    layers = f.get("layers")
    if layers is None:
        raise ValueError("model.weights.h5 has no 'layers' group")
    for name, group in layers.items():
        variables = group.get("vars")
        groups[name] = [np.asarray(variables[str(i)]) for i in range(len(variables))] if variables is not None else []
    return groups


def _snake_case(name: str) -> str:
    """Keras's `naming.to_snake_case` (how Keras 3 names each layer's group in model.weights.h5)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _from_memory(model) -> dict:
    """The same record as `read_keras_file` for a `keras.Model` in memory (its config and variables)."""
    import keras

    weights = {"format": "memory", "layers": {layer.name: [np.asarray(w) for w in layer.get_weights()]
                                              for layer in model.layers}}
    return {"config": keras.saving.serialize_keras_object(model), "weights": weights,
            "keras_version": keras.__version__, "file": f"<keras.Model {model.name}>"}


# --------------------------------------------------------------------------- the chain of layers


def _layer_name(layer: dict) -> str:
    return layer.get("name") or layer.get("config", {}).get("name") or layer.get("class_name", "?")


def _tensor_sources(value) -> list[str]:
    """Names of the layers whose outputs a serialized call argument reads (Keras 3 and tf.keras formats)."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            return [value.get("config", {}).get("keras_history", ["?"])[0]]
        return [name for v in value.values() for name in _tensor_sources(v)]
    if isinstance(value, (list, tuple)):
        if len(value) >= 3 and isinstance(value[0], str) and isinstance(value[1], int):
            return [value[0]]  # tf.keras: [layer name, node index, tensor index, kwargs]
        return [name for v in value for name in _tensor_sources(v)]
    return []


def _inbound_names(layer: dict) -> list[list[str]]:
    """For each call (node) of a functional model's layer, the names of the layers it reads."""
    return [_tensor_sources(node.get("args", node) if isinstance(node, dict) else node)
            for node in layer.get("inbound_nodes", [])]


def _chain(config: dict, where: str) -> tuple[list[dict], list[dict]]:
    """(all layers in model.layers order, the layers from input to output) of a Sequential or functional chain."""
    kind = config.get("class_name")
    body = config.get("config", {})
    layers = body.get("layers")
    if not isinstance(layers, list):
        raise ValueError(f"{where} describes a {kind!r}, not a Keras Sequential or functional model")
    if kind == "Sequential":
        return layers, layers
    if kind not in ("Functional", "Model"):
        raise ValueError(f"{where} is a {kind!r} model (a subclassed model's code is not in the file); only "
                         f"Sequential and functional models convert")
    by_name = {_layer_name(layer): layer for layer in layers}
    inputs, outputs = body.get("input_layers", []), body.get("output_layers", [])
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], str):
        inputs = [inputs]
    if isinstance(outputs, list) and outputs and isinstance(outputs[0], str):
        outputs = [outputs]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"{where} has {len(inputs)} inputs and {len(outputs)} outputs; a classifier has one of each")
    chain, name = [], outputs[0][0]
    while True:
        layer = by_name.get(name)
        if layer is None:
            raise ValueError(f"{where}: layer {name!r} is read but not defined; the file is damaged")
        chain.append(layer)
        if name == inputs[0][0]:
            break
        calls = _inbound_names(layer)
        if len(calls) != 1 or len(calls[0]) != 1:
            reads = calls[0] if len(calls) == 1 else calls
            raise ValueError(f"{where}: layer {name!r} ({layer.get('class_name')}) reads {reads}: only chains of "
                             f"layers (each reading the previous one) convert, not branches or skip connections")
        name = calls[0][0]
    return layers, chain[::-1]


def _input_shape(config: dict, chain: list[dict]) -> tuple | None:
    candidates = []
    first = chain[0]
    if first.get("class_name") == "InputLayer":
        c = first.get("config", {})
        candidates += [c.get("batch_shape"), c.get("batch_input_shape")]
    c = first.get("config", {})
    candidates += [c.get("batch_input_shape"), c.get("batch_shape"),
                   config.get("build_config", {}).get("input_shape"), config.get("config", {}).get("build_input_shape")]
    for shape in candidates:
        if isinstance(shape, list) and len(shape) == 4:
            return tuple(shape[1:])
    return None


def _activation_of(value, where: str) -> tuple[str, dict]:
    """(Keras activation name, parameters) of a layer's `activation` entry."""
    if value is None:
        return "linear", {}
    if isinstance(value, dict):  # a serialized function: {"class_name": "function", "config": "relu", ...}
        value = value.get("config") if isinstance(value.get("config"), str) else value.get("class_name")
    if value == "softmax":
        return "softmax", {}
    if value not in KERAS_ACTIVATIONS:
        raise ValueError(f"{where}: activation {value!r} is not supported (supported: softmax, "
                         f"{', '.join(sorted(KERAS_ACTIVATIONS))})")
    return str(value), {}


def _pair(value, name: str) -> list[int]:
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return [int(v) for v in value]
    raise ValueError(f"{name} must be an int or a pair, got {value!r}")


class _Builder:
    """Turns the chain of Keras layers into spec steps (data) and {path: array} weights."""

    def __init__(self, where: str):
        self.where = where
        self.features: list[dict] = []
        self.head: list[dict] = []
        self.pool: str | None = None
        self.flat: dict[str, np.ndarray] = {}
        self.names: set[str] = set()
        self.notes: list[str] = []
        self.pending_norm: tuple[np.ndarray, np.ndarray] | None = None  # a BatchNorm before the first Dense

    def step_name(self, keras_name: str) -> str:
        name = re.sub(r"\W", "_", keras_name)
        if not name or name[0].isdigit() or name in self.names or name in ("layers", "step_names"):
            name = f"layer_{name}"
        while name in self.names:
            name += "_"
        self.names.add(name)
        return name

    # -- features
    def add_feature(self, step: dict, weights: dict | None = None):
        self.features.append(step)
        for key, value in (weights or {}).items():
            self.flat[f"features.{step['name']}.{key}"] = value

    def add_activation(self, keras_name: str, fn: str, params: dict, *, last: bool, fused: bool = True):
        if fn == "linear" and not params:
            return
        if fn == "softmax":
            if not last or self.pool is None:
                raise ValueError(f"{self.where}: layer {keras_name!r} applies a softmax before the last layer; only a "
                                 f"final softmax converts (it is left out: the FCN returns logits)")
            self.notes.append("softmax")
            return
        if self.pending_norm is not None:
            raise ValueError(f"{self.where}: layer {keras_name!r} applies {fn} between a BatchNormalization and the "
                             f"Dense it would fold into; only a BatchNormalization beside a Dense layer converts")
        step = {"op": "activation", "name": self.step_name(keras_name + ("_activation" if fused else "")), "fn": fn,
                "params": params}
        if self.pool is None:
            self.features.append(step)
        else:
            self.head.append(step)

    # -- head
    def add_dense(self, keras_name: str, kernel, bias):
        if self.pending_norm is not None:  # Dense(BN(v)) = (s W)^T v + (W^T t + b)
            scale, shift = self.pending_norm
            bias = (bias if bias is not None else 0.0) + shift @ kernel
            kernel = scale[:, None] * kernel
            self.pending_norm = None
        index = len(self.head)
        self.head.append({"op": "dense", "name": keras_name, "in_features": int(kernel.shape[0]),
                          "out_features": int(kernel.shape[1]), "use_bias": bias is not None})
        self.flat[f"head.layers.{index}.kernel"] = kernel
        if bias is not None:
            self.flat[f"head.layers.{index}.bias"] = np.asarray(bias, np.float32)

    def fold_norm(self, keras_name: str, scale, shift):
        """A BatchNormalization after the pool: folded into the Dense before it (or after it)."""
        dense = [i for i, s in enumerate(self.head) if s["op"] == "dense"]
        between = [s for s in self.head[dense[-1] + 1:] if s["op"] != "dropout"] if dense else []
        if dense and not between:
            i = dense[-1]
            kernel = self.flat[f"head.layers.{i}.kernel"]
            bias = self.flat.get(f"head.layers.{i}.bias", np.zeros(kernel.shape[1], np.float32))
            self.flat[f"head.layers.{i}.kernel"] = kernel * scale[None, :]
            self.flat[f"head.layers.{i}.bias"] = bias * scale + shift
            self.head[i]["use_bias"] = True
        elif not dense and not [s for s in self.head if s["op"] != "dropout"]:
            self.pending_norm = (scale, shift)
        else:
            raise ValueError(f"{self.where}: BatchNormalization {keras_name!r} follows an activation after the "
                             f"pool; only one beside a Dense layer converts (it is folded into it)")


def _build(record: dict, input_shape=None) -> tuple[dict, dict[str, np.ndarray]]:
    """(spec, weights): the classifier as data and its weights keyed by zoo path."""
    config, where = record["config"], record["file"]
    all_layers, chain = _chain(config, where)
    shape = _input_shape(config, chain)
    if input_shape is not None:
        shape = tuple(int(v) for v in input_shape)
    if shape is None or any(v is None for v in shape):
        raise ValueError(f"{where}: the model's input has no fixed size {shape}; pass input_shape=(H, W, C), the "
                         f"size it was trained on")
    weights_of = _weight_reader(record, all_layers)
    builder = _Builder(where)
    channels = int(shape[-1])
    real = [layer for layer in chain if layer.get("class_name") != "InputLayer"]
    for position, layer in enumerate(real):
        kind = layer.get("class_name")
        c = layer.get("config", {})
        name = _layer_name(layer)
        label = f"{where}: layer {name!r} ({kind})"
        last = position == len(real) - 1
        if c.get("data_format", "channels_last") not in (None, "channels_last"):
            raise ValueError(f"{label} is channels-first; only channels-last (NHWC) models convert")
        spatial = builder.pool is None
        require_spatial = partial(_require_spatial, spatial, label, builder.pool)

        if kind in ("Lambda", "TFOpLambda", "SlicingOpLambda"):
            raise ValueError(f"{label} holds Python code, which is never run from a file; replace it with "
                             f"built-in layers")
        if kind in ("Sequential", "Functional", "Model"):
            raise ValueError(f"{label} is a nested model; build the classifier as one flat chain of layers")
        if kind == "Conv2D":
            require_spatial()
            use_bias = bool(c.get("use_bias", True))
            v = weights_of(layer, name, ["kernel", "bias"] if use_bias else ["kernel"])
            kernel = v["kernel"]
            groups = int(c.get("groups", 1) or 1)
            builder.add_feature({"op": "conv", "name": builder.step_name(name), "in_features": channels,
                                 "out_features": int(kernel.shape[-1]), "kernel_size": list(kernel.shape[:2]),
                                 "strides": _pair(c.get("strides", 1), "strides"), "padding": c.get("padding", "valid"),
                                 "dilation": _pair(c.get("dilation_rate", 1), "dilation_rate"), "groups": groups,
                                 "use_bias": use_bias}, v)
            channels = int(kernel.shape[-1])
            builder.add_activation(name, *_activation_of(c.get("activation"), label), last=last)
        elif kind in ("DepthwiseConv2D", "SeparableConv2D"):
            require_spatial()
            use_bias = bool(c.get("use_bias", True))
            separable = kind == "SeparableConv2D"
            names = ["depthwise_kernel", "pointwise_kernel"] if separable else ["kernel"]
            v = weights_of(layer, name, names + (["bias"] if use_bias else []))
            depthwise = v["depthwise_kernel" if separable else "kernel"]
            kh, kw, cin, multiplier = depthwise.shape
            step = {"op": "conv", "name": builder.step_name(name + ("_depthwise" if separable else "")),
                    "in_features": channels, "out_features": int(cin * multiplier), "kernel_size": [kh, kw],
                    "strides": _pair(c.get("strides", 1), "strides"), "padding": c.get("padding", "valid"),
                    "dilation": _pair(c.get("dilation_rate", 1), "dilation_rate"), "groups": int(cin),
                    "use_bias": use_bias and not separable}
            # Keras (k, k, C, m) -> flax grouped (k, k, 1, C*m); output channel c*m + j in both.
            dw = {"kernel": depthwise.reshape(kh, kw, 1, cin * multiplier)}
            if use_bias and not separable:
                dw["bias"] = v["bias"]
            builder.add_feature(step, dw)
            channels = int(cin * multiplier)
            if separable:
                pointwise = v["pointwise_kernel"]
                pw = {"kernel": pointwise, **({"bias": v["bias"]} if use_bias else {})}
                builder.add_feature({"op": "conv", "name": builder.step_name(name + "_pointwise"),
                                     "in_features": channels, "out_features": int(pointwise.shape[-1]),
                                     "kernel_size": [1, 1], "strides": [1, 1], "padding": "valid", "dilation": [1, 1],
                                     "groups": 1, "use_bias": use_bias}, pw)
                channels = int(pointwise.shape[-1])
            builder.add_activation(name, *_activation_of(c.get("activation"), label), last=last)
        elif kind in ("MaxPooling2D", "AveragePooling2D", "MaxPool2D", "AvgPool2D"):
            require_spatial()
            window = _pair(c.get("pool_size", 2), "pool_size")
            strides = _pair(c["strides"], "strides") if c.get("strides") is not None else window
            builder.add_feature({"op": "max_pool" if kind.startswith("Max") else "avg_pool",
                                 "name": builder.step_name(name), "window": window, "strides": strides,
                                 "padding": c.get("padding", "valid")})
        elif kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D", "GlobalAvgPool2D", "GlobalMaxPool2D"):
            require_spatial()
            if c.get("keepdims"):
                raise ValueError(f"{label} keeps the pooled axes (keepdims=True); use keepdims=False, then Dense")
            if "Max" in kind:
                h, w = _map_size(builder.features, shape)
                builder.add_feature({"op": "max_pool", "name": builder.step_name(name), "window": [h, w],
                                     "strides": [1, 1], "padding": "valid"})
                builder.pool = "flatten"
            else:
                builder.pool = "avg"
        elif kind == "Flatten":
            require_spatial()
            builder.pool = "flatten"
        elif kind == "Dense":
            use_bias = bool(c.get("use_bias", True))
            v = weights_of(layer, name, ["kernel", "bias"] if use_bias else ["kernel"])
            kernel = v["kernel"]
            if spatial:  # on a map Keras applies Dense at every position: a 1x1 convolution
                builder.add_feature({"op": "conv", "name": builder.step_name(name), "in_features": channels,
                                     "out_features": int(kernel.shape[1]), "kernel_size": [1, 1], "strides": [1, 1],
                                     "padding": "valid", "dilation": [1, 1], "groups": 1, "use_bias": use_bias},
                                    {"kernel": kernel.reshape(1, 1, *kernel.shape), **({"bias": v["bias"]} if use_bias
                                                                                       else {})})
                channels = int(kernel.shape[1])
            else:
                builder.add_dense(name, kernel, v.get("bias"))
            builder.add_activation(name, *_activation_of(c.get("activation"), label), last=last)
        elif kind == "BatchNormalization":
            axis = c.get("axis", -1)
            axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
            if axis not in (-1, 3 if spatial else 1):
                raise ValueError(f"{label} normalizes axis {axis}; only the channel axis (-1) converts")
            center, scale = bool(c.get("center", True)), bool(c.get("scale", True))
            names = (["gamma"] if scale else []) + (["beta"] if center else []) + ["moving_mean", "moving_variance"]
            v = weights_of(layer, name, names)
            epsilon = float(c.get("epsilon", 1e-3))
            if spatial:
                features = int(v["moving_mean"].shape[0])
                step = {"op": "batch_norm", "name": builder.step_name(name), "features": features,
                        "epsilon": epsilon, "momentum": float(c.get("momentum", 0.99)), "center": center,
                        "scale": scale}
                bn = {"mean": v["moving_mean"], "var": v["moving_variance"]}
                if scale:
                    bn["scale"] = v["gamma"]
                if center:
                    bn["bias"] = v["beta"]
                builder.add_feature(step, bn)
            else:
                gamma = v.get("gamma", np.ones_like(v["moving_mean"]))
                beta = v.get("beta", np.zeros_like(v["moving_mean"]))
                factor = (gamma / np.sqrt(v["moving_variance"].astype(np.float64) + epsilon)).astype(np.float32)
                builder.fold_norm(name, factor, (beta - v["moving_mean"] * factor).astype(np.float32))
        elif kind in ("Activation", "ReLU", "LeakyReLU", "ELU", "Softmax"):
            if kind == "Activation":
                fn, params = _activation_of(c.get("activation"), label)
            elif kind == "ReLU":
                params = {k: c[k] for k in ("negative_slope", "max_value", "threshold")
                          if c.get(k) not in (None, 0, 0.0)}
                fn = "relu"
            elif kind == "LeakyReLU":
                fn, params = "leaky_relu", {"negative_slope": float(c.get("negative_slope", c.get("alpha", 0.3)))}
            elif kind == "ELU":
                fn, params = "elu", {"alpha": float(c.get("alpha", 1.0))}
            else:
                if c.get("axis", -1) != -1:
                    raise ValueError(f"{label} is a softmax over axis {c.get('axis')}")
                fn, params = "softmax", {}
            builder.add_activation(name, fn, params, last=last, fused=False)
        elif kind == "Rescaling":
            require_spatial()
            builder.add_feature({"op": "rescale", "name": builder.step_name(name), "scale": c.get("scale", 1.0),
                                 "offset": c.get("offset", 0.0)})
        elif kind == "ZeroPadding2D":
            require_spatial()
            padding = c.get("padding", 1)
            if isinstance(padding, int):
                padding = [[padding, padding], [padding, padding]]
            elif all(isinstance(p, int) for p in padding):
                padding = [[padding[0], padding[0]], [padding[1], padding[1]]]
            builder.add_feature({"op": "pad", "name": builder.step_name(name),
                                 "padding": [[int(a), int(b)] for a, b in padding]})
        elif kind == "Dropout":
            step = {"op": "dropout", "name": builder.step_name(name), "rate": float(c.get("rate", 0.0))}
            (builder.features if spatial else builder.head).append(step)
        elif kind in INFERENCE_IDENTITY:
            builder.notes.append(f"{name} ({kind}) does nothing at inference: left out")
        else:
            raise ValueError(f"{label} is not supported; supported layers: InputLayer, Conv2D, DepthwiseConv2D, "
                             f"SeparableConv2D, Dense, MaxPooling2D, AveragePooling2D, GlobalAveragePooling2D, "
                             f"GlobalMaxPooling2D, BatchNormalization, Dropout, Flatten, Activation, ReLU, LeakyReLU, "
                             f"ELU, Rescaling, ZeroPadding2D")
    if builder.pool is None:
        raise ValueError(f"{where} is not a classifier: it has no Flatten or global pooling layer that turns the "
                         f"feature map into a vector (already fully convolutional?)")
    if not any(s["op"] == "dense" for s in builder.head):
        raise ValueError(f"{where} is not a classifier: no Dense layer follows its {builder.pool} step")
    if builder.pending_norm is not None:
        raise ValueError(f"{where}: a BatchNormalization after the pool has no Dense layer to fold into")
    spec = {"name": config.get("config", {}).get("name") or "keras_model", "input_shape": list(shape),
            "features": builder.features, "pool": builder.pool, "head": builder.head, "notes": builder.notes,
            "keras_version": record["keras_version"], "file": record["file"]}
    return spec, builder.flat


def _require_spatial(spatial: bool, label: str, pool: str | None) -> None:
    if not spatial:
        raise ValueError(f"{label} comes after the {pool} step: only Dense, activation, dropout and "
                         f"BatchNormalization layers may follow it")


def _map_size(features: list[dict], input_shape) -> tuple[int, int]:
    out = jax.eval_shape(build_features(features, rngs=None, abstract=True),
                         jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return int(out.shape[1]), int(out.shape[2])


def _weight_reader(record: dict, all_layers: list[dict]):
    """weights_of(layer, name, variable names) -> {variable name: array}, checked for count."""
    weights, where = record["weights"], record["file"]
    groups: dict[str, str] = {}
    if weights["format"] == "keras3":
        used: dict[str, int] = {}
        for layer in all_layers:
            base = _snake_case(layer.get("class_name", ""))
            count = used.get(base, 0)
            used[base] = count + 1
            groups[_layer_name(layer)] = base if count == 0 else f"{base}_{count}"

    def weights_of(layer: dict, name: str, names: list[str]) -> dict[str, np.ndarray]:
        label = f"{where}: layer {name!r} ({layer.get('class_name')})"
        if weights["format"] == "legacy":
            stored = weights["layers"].get(name, {})
            aliases = {"depthwise_kernel": "kernel"} if layer.get("class_name") == "DepthwiseConv2D" else {}
            stored = {aliases.get(k, k): v for k, v in stored.items()}
            missing = [n for n in names if n not in stored]
            if missing or len(stored) != len(names):
                raise ValueError(f"{label}: the file holds the weights {sorted(stored)}, expected {names}")
            return {n: np.asarray(stored[n], np.float32) for n in names}
        if weights["format"] == "memory":
            arrays = weights["layers"].get(name, [])
        else:
            group = groups.get(name)
            arrays = weights["groups"].get(group) if group in weights["groups"] else weights["groups"].get(name)
            if arrays is None:
                raise ValueError(f"{label}: model.weights.h5 has no group layers/{group}; the file is damaged")
        if len(arrays) != len(names):
            raise ValueError(f"{label}: the file holds {len(arrays)} variable(s), expected {len(names)} ({names})")
        return {n: np.asarray(a, np.float32) for n, a in zip(names, arrays)}

    return weights_of


# --------------------------------------------------------------------------- building the zoo model


def _activation_module(step: dict):
    fn, params = step["fn"], dict(step.get("params") or {})
    if fn in ZOO_NAMES and not params:
        return Activation(ZOO_NAMES[fn])
    return KerasActivation(fn, params)


def build_features(steps: list[dict], *, rngs: nnx.Rngs | None = None, abstract: bool = False):
    """The backbone (a `NamedSequential`, one step per Keras layer) from its spec; abstract=True returns a
    function of x running it with fresh weights (for shapes only)."""
    def build():
        r = rngs or nnx.Rngs(0)
        modules = []
        for step in steps:
            op, name = step["op"], step["name"]
            if op == "conv":
                padding = step["padding"].upper()
                module = nnx.Conv(step["in_features"], step["out_features"], tuple(step["kernel_size"]),
                                  strides=tuple(step["strides"]), padding=padding,
                                  kernel_dilation=tuple(step["dilation"]), feature_group_count=step["groups"],
                                  use_bias=step["use_bias"], rngs=r)
            elif op == "batch_norm":
                module = nnx.BatchNorm(step["features"], epsilon=step["epsilon"], momentum=step["momentum"],
                                       use_bias=step["center"], use_scale=step["scale"], rngs=r)
            elif op == "activation":
                module = _activation_module(step)
            elif op in ("max_pool", "avg_pool"):
                cls = MaxPool if op == "max_pool" else AvgPool
                module = cls(tuple(step["window"]), tuple(step["strides"]), padding=step["padding"].upper())
            elif op == "rescale":
                module = Rescale(step["scale"], step["offset"])
            elif op == "pad":
                module = Pad2D(step["padding"])
            elif op == "dropout":
                module = nnx.Dropout(step["rate"], rngs=nnx.Rngs(dropout=0))
            else:
                raise ValueError(f"unknown backbone step {step!r}; the description is damaged or newer than this code")
            modules.append((name, module))
        return NamedSequential(modules)

    if abstract:
        def run(x):
            return build()(x)
        return run
    return build()


def _build_head(spec: dict, rngs: nnx.Rngs) -> KerasHead:
    layers = []
    for step in spec["head"]:
        if step["op"] == "dense":
            layers.append(nnx.Linear(step["in_features"], step["out_features"], use_bias=step["use_bias"], rngs=rngs))
        elif step["op"] == "activation":
            layers.append(_activation_module(step))
        elif step["op"] == "dropout":
            layers.append(nnx.Dropout(step["rate"], rngs=nnx.Rngs(dropout=0)))
        else:
            raise ValueError(f"unknown head step {step!r}")
    return KerasHead(spec["pool"], layers)


def keras_classifier(path_or_model, *, input_shape=None) -> tuple[Classifier, dict]:
    """A Keras classifier as a zoo `Classifier` computing what Keras computes (logits: see the module docstring).

    Args:
        path_or_model: a `.keras` or full-model `.h5` file, or a `keras.Model` in memory.
        input_shape: (H, W, C) it was trained on, when its input layer leaves the size open.
    Returns:
        (classifier in eval mode, spec): spec is the model as data (backbone steps, head, notes),
        what a saved FCN keeps to rebuild the backbone.
    Raises:
        FileNotFoundError; ValueError in one line saying what cannot be read or converted.
    """
    if isinstance(path_or_model, (str, os.PathLike)):
        record = read_keras_file(path_or_model)
    else:
        record = _from_memory(path_or_model)
    spec, flat = _build(record, input_shape)
    model = classifier_from_spec(spec)
    saving.load_flat_into(model, flat, source=f"Keras file {record['file']}")
    model.eval()
    return model, spec


def classifier_from_spec(spec: dict) -> Classifier:
    """The zoo `Classifier` a Keras spec describes, with fresh weights."""
    rngs = nnx.Rngs(0)
    shape = tuple(spec["input_shape"])
    name = re.sub(r"\W", "_", spec["name"])
    return Classifier(build_features(spec["features"], rngs=rngs), _build_head(spec, rngs), input_shape=shape,
                      min_size=shape[:2] if spec["pool"] == "flatten" else (1, 1), name=name)


def keras_source(spec: dict) -> dict:
    """The `source` record `convert.save_fcn` stores for an FCN converted from a Keras file."""
    return {"model": KERAS_SOURCE, "kwargs": {"features": spec["features"]},
            "metadata": {k: spec[k] for k in ("name", "file", "keras_version", "notes", "input_shape", "pool")}}


def from_keras(path_or_model, *, input_shape=None):
    """A Keras classifier (file or `keras.Model`) as a fully convolutional network (`convert.FCN`).

    The 1x1 output at the training size is the Keras model's logits (its final softmax left out);
    see `keras_classifier` for what is read and `convert.to_fcn` for the conversion.
    """
    from convert.fcn import to_fcn

    model, _ = keras_classifier(path_or_model, input_shape=input_shape)
    return to_fcn(model)


def is_keras_file(path) -> bool:
    """A file (not a directory) that looks like a Keras model file: a .keras/.h5/.hdf5 name or a zip archive."""
    p = Path(path)
    return p.is_file() and (p.suffix.lower() in (".keras", ".h5", ".hdf5") or zipfile.is_zipfile(p))

