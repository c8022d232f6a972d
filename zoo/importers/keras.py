"""Keras Applications weights into zoo models: VGG16/19, ResNet50/101/152, Xception, EfficientNetB0-B7.

Reads the two files Keras writes, with h5py only (no Keras, no pickle):

- Keras 3 `.weights.h5` (`model.save_weights`) and `.keras` archives: groups are
  named by layer *class* and counted in `model.layers` order (`layers/conv2d_3/vars/0`),
  so a layer is found by its class and its rank among the layers of that class.
- The legacy tf.keras `.h5` (`model.save("x.h5")`, and the ImageNet files Keras
  Applications publishes): groups are named by layer (`[model_weights/]conv1_conv/
  conv1_conv/kernel:0`), listed in the `layer_names` attribute.

Each architecture's Keras layers are described below in `model.layers` order
(`keras_layout`), each with the zoo module it fills. Where Keras computes
something else than the zoo's defaults, the importer builds the zoo model with
the family's options so that it computes exactly what Keras computes:

- ResNet: `stride_in="1x1"` (Keras strides in the first 1x1 conv of a block, as the
  paper), `conv_bias=True` (a bias on every conv, even before BatchNorm),
  `bn_epsilon=1.001e-5`, `bn_momentum=0.99`.
- Xception: the family's defaults are Keras's (BatchNorm epsilon 1e-3).
- EfficientNet: `bn_epsilon=1e-3`, and `input_normalization` from the file's
  Normalization layer: Keras rescales by 1/255 and normalizes inside the model. Keras's
  ImageNet file stores the ImageNet standard deviations where variances belong and
  Keras compensates with one more Rescaling (by 1/sqrt(stddev)) that it adds only
  when built with `weights="imagenet"`; the importer recognizes those values and folds
  that rescaling in (`imagenet_rescale`).
- Keras's classifiers end in a softmax; zoo models return logits (the Dense output
  before it).
- ResNet, VGG and Xception expect Keras's `preprocess_input` (`zoo.importers.preprocess`).
"""

from __future__ import annotations

import dataclasses
import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import zoo
from zoo.importers.loading import Imported, build_abstract, fill_model, head_dense_paths
from zoo.importers.preprocess import preprocessing_for
from zoo.saving import WeightsMismatchError

# Keras Applications names of the architectures this module imports.
KERAS_NAMES = {
    "VGG16": "vgg16", "VGG19": "vgg19",
    "ResNet50": "resnet50", "ResNet101": "resnet101", "ResNet152": "resnet152",
    "Xception": "xception",
    **{f"EfficientNetB{i}": f"efficientnet_b{i}" for i in range(8)},
}
ARCHITECTURES = tuple(KERAS_NAMES.values())

# ImageNet per-channel standard deviations (RGB). Keras's EfficientNet ImageNet weights
# store them as the Normalization layer's "variance".
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)

# A Keras layer kind -> (class name as Keras 3 files spell it, its variables in file order).
KINDS = {
    "conv": ("conv2d", ("kernel", "bias")),
    "se_conv": ("conv2d", ("kernel", "bias")),  # a 1x1 conv on a 1x1 map: our Dense
    "bn": ("batch_normalization", ("gamma", "beta", "moving_mean", "moving_variance")),
    "dense": ("dense", ("kernel", "bias")),
    "depthwise": ("depthwise_conv2d", ("kernel", "bias")),
    "separable": ("separable_conv2d", ("depthwise_kernel", "pointwise_kernel", "bias")),
    "normalization": ("normalization", ("mean", "variance", "count")),
}
# tf.keras called a DepthwiseConv2D kernel "depthwise_kernel"; Keras 3 calls it "kernel".
VARIABLE_ALIASES = {"depthwise_kernel": "kernel"}


@dataclasses.dataclass(frozen=True)
class KerasLayer:
    """One Keras layer with weights, and where its weights go in the zoo model.

    Attributes:
        name: the Keras layer name, or None where Keras names it automatically
            (Xception's shortcut convs: "conv2d", "conv2d_1"... depend on what was built before).
        kind: a key of `KINDS`.
        target: the zoo module path it fills ("features.stem.conv"), or "head:k", the k-th
            Dense layer of the zoo head (negative counts from the end).
    """

    name: str | None
    kind: str
    target: str


# --------------------------------------------------------------------------- layouts


def _vgg_layout(spec) -> Iterator[KerasLayer]:
    block, position = 1, 0
    for entry in spec.options["layers"]:
        if entry == "M":
            block, position = block + 1, 0
            continue
        position += 1
        yield KerasLayer(f"block{block}_conv{position}", "conv", f"features.conv{block}_{position}")
    yield KerasLayer("fc1", "dense", "head:0")
    yield KerasLayer("fc2", "dense", "head:1")
    yield KerasLayer("predictions", "dense", "head:-1")


def _resnet_layout(spec) -> Iterator[KerasLayer]:
    yield KerasLayer("conv1_conv", "conv", "features.stem.conv")
    yield KerasLayer("conv1_bn", "bn", "features.stem.bn")
    for s, depth in enumerate(spec.options["stage_depths"]):
        for b in range(depth):
            keras = f"conv{s + 2}_block{b + 1}"
            ours = f"features.stage{s + 1}.{b}"
            # Keras lists the projection shortcut's conv just before the third conv, and
            # its BN before the third BN (graph order, not creation order).
            order = ("1_conv", "1_bn", "2_conv", "2_bn", "0_conv", "3_conv", "0_bn", "3_bn") if b == 0 else \
                ("1_conv", "1_bn", "2_conv", "2_bn", "3_conv", "3_bn")
            for part in order:
                index, kind = part.split("_")
                target = f"{ours}.downsample.{kind}" if index == "0" else f"{ours}.{kind}{index}"
                yield KerasLayer(f"{keras}_{part}", "conv" if kind == "conv" else "bn", target)
    yield KerasLayer("predictions", "dense", "head:-1")


def _xception_layout(spec) -> Iterator[KerasLayer]:
    yield KerasLayer("block1_conv1", "conv", "features.stem.conv1")
    yield KerasLayer("block1_conv1_bn", "bn", "features.stem.bn1")
    yield KerasLayer("block1_conv2", "conv", "features.stem.conv2")
    yield KerasLayer("block1_conv2_bn", "bn", "features.stem.bn2")
    entry, middle = 3, 8  # Keras's Xception is the paper's: blocks 2-4, 5-12, 13, 14
    blocks = [(f"features.entry_flow.{i}", 2, True) for i in range(entry)]
    blocks += [(f"features.middle_flow.{i}", 3, False) for i in range(middle)]
    blocks += [("features.exit_flow.0", 2, True)]
    for number, (ours, units, shortcut) in enumerate(blocks, start=2):
        for j in range(units):
            yield KerasLayer(f"block{number}_sepconv{j + 1}", "separable", f"{ours}.units.{j}")
            yield KerasLayer(f"block{number}_sepconv{j + 1}_bn", "bn", f"{ours}.units.{j}.bn")
        if shortcut:
            yield KerasLayer(None, "conv", f"{ours}.shortcut.conv")
            yield KerasLayer(None, "bn", f"{ours}.shortcut.bn")
    for j in range(2):
        yield KerasLayer(f"block14_sepconv{j + 1}", "separable", f"features.final.units.{j}")
        yield KerasLayer(f"block14_sepconv{j + 1}_bn", "bn", f"features.final.units.{j}.bn")
    yield KerasLayer("predictions", "dense", "head:-1")


def _efficientnet_layout(spec) -> Iterator[KerasLayer]:
    from zoo.efficientnet import block_configs

    # Keras names it "normalization", "normalization_1"... by how many were built before.
    yield KerasLayer(None, "normalization", "features.input_norm")
    yield KerasLayer("stem_conv", "conv", "features.stem.conv.conv")
    yield KerasLayer("stem_bn", "bn", "features.stem.bn")
    options = spec.options
    configs = block_configs(options["width_multiplier"], options["depth_multiplier"])
    repeat = 0
    for i, config in enumerate(configs):
        repeat = repeat + 1 if i > 0 and configs[i - 1].stage == config.stage else 0
        keras = f"block{config.stage + 1}{chr(ord('a') + repeat)}"
        ours = f"features.blocks.{i}"
        if config.expand_ratio != 1:
            yield KerasLayer(f"{keras}_expand_conv", "conv", f"{ours}.expand_conv")
            yield KerasLayer(f"{keras}_expand_bn", "bn", f"{ours}.expand_bn")
        # A stride-2 depthwise conv is wrapped with its explicit padding (DownsampleConv).
        depthwise = f"{ours}.depthwise_conv" + (".conv" if config.stride == 2 else "")
        yield KerasLayer(f"{keras}_dwconv", "depthwise", depthwise)
        yield KerasLayer(f"{keras}_bn", "bn", f"{ours}.depthwise_bn")
        yield KerasLayer(f"{keras}_se_reduce", "se_conv", f"{ours}.se.reduce")
        yield KerasLayer(f"{keras}_se_expand", "se_conv", f"{ours}.se.expand")
        yield KerasLayer(f"{keras}_project_conv", "conv", f"{ours}.project_conv")
        yield KerasLayer(f"{keras}_project_bn", "bn", f"{ours}.project_bn")
    yield KerasLayer("top_conv", "conv", "features.top_conv")
    yield KerasLayer("top_bn", "bn", "features.top_bn")
    yield KerasLayer("predictions", "dense", "head:-1")


_LAYOUTS = {"vgg": _vgg_layout, "resnet": _resnet_layout, "xception": _xception_layout,
            "efficientnet": _efficientnet_layout}


def resolve_architecture(arch: str) -> str:
    """The zoo name of `arch`, given as a zoo name ("resnet50") or a Keras one ("ResNet50")."""
    name = KERAS_NAMES.get(arch, arch)
    if name not in ARCHITECTURES:
        raise ValueError(
            f"cannot import Keras weights for {arch!r}; supported: {', '.join(ARCHITECTURES)} "
            f"(or their Keras names: {', '.join(KERAS_NAMES)})"
        )
    return name


def keras_layout(arch: str) -> list[KerasLayer]:
    """The Keras layers with weights of `arch`, in Keras's `model.layers` order."""
    spec = zoo.get_spec(resolve_architecture(arch))
    return list(_LAYOUTS[spec.family](spec))


# --------------------------------------------------------------------------- reading files


@dataclasses.dataclass
class KerasWeights:
    """The arrays of a Keras weights file, before they are matched to an architecture.

    Attributes:
        format: "keras3" (class-named groups) or "legacy" (layer-named groups).
        layers: Keras 3: {group name, e.g. "conv2d_3": [arrays in variable order]}.
            legacy: {layer name: {variable name, e.g. "kernel": array}}, in file order.
    """

    format: str
    layers: dict


def _open_h5(path: Path):
    import h5py

    if zipfile.is_zipfile(path):  # a `.keras` archive keeps its weights in model.weights.h5
        with zipfile.ZipFile(path) as archive:
            if "model.weights.h5" not in archive.namelist():
                raise ValueError(f"{path} is a zip archive without model.weights.h5; not a .keras model file")
            return h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"cannot read {path} as HDF5 ({e}); expected a Keras .weights.h5, .h5 or .keras file") \
            from None


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def read_keras_weights(path: str | os.PathLike) -> KerasWeights:
    """Read every array of a Keras weights file (Keras 3 `.weights.h5`/`.keras`, or legacy `.h5`).

    Nothing in the file is executed; only datasets are read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Keras weights file {path} not found")
    with _open_h5(path) as f:
        if "layers" in f and "layer_names" not in f.attrs:
            layers = {}
            for group_name, group in f["layers"].items():
                variables = group.get("vars")
                if variables is not None and len(variables):
                    layers[group_name] = [np.asarray(variables[str(i)]) for i in range(len(variables))]
            return KerasWeights("keras3", layers)
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise ValueError(
                f"{path} is HDF5 but neither a Keras 3 weights file (no 'layers' group) nor a legacy "
                f"Keras file (no 'layer_names' attribute)"
            )
        layers = {}
        for layer_name in map(_text, root.attrs["layer_names"]):
            group = root[layer_name]
            variables = {}
            for weight_name in map(_text, group.attrs.get("weight_names", [])):
                short = weight_name.rsplit("/", 1)[-1].split(":")[0]
                variables[VARIABLE_ALIASES.get(short, short)] = np.asarray(group[weight_name])
            if variables:
                layers[layer_name] = variables
        return KerasWeights("legacy", layers)


# --------------------------------------------------------------------------- matching


def _keras3_group(class_name: str, rank: int) -> str:
    return class_name if rank == 0 else f"{class_name}_{rank}"


def match_layers(layout: list[KerasLayer], weights: KerasWeights) -> tuple[dict, dict]:
    """Pair each layout layer with its variables in the file.

    Returns:
        found: {layout index: {variable name: array}} for the layers the file has;
        leftover: {"file entry/variable": array} for file contents no layer claimed.
    """
    found: dict[int, dict[str, np.ndarray]] = {}
    if weights.format == "keras3":
        ranks: dict[str, int] = {}
        claimed = set()
        for i, layer in enumerate(layout):
            class_name, variable_names = KINDS[layer.kind]
            group = _keras3_group(class_name, ranks.get(class_name, 0))
            ranks[class_name] = ranks.get(class_name, 0) + 1
            if group in weights.layers:
                arrays = weights.layers[group]
                names = variable_names if len(arrays) == len(variable_names) else _short_names(layer.kind, arrays)
                found[i] = dict(zip(names, arrays))
                claimed.add(group)
        leftover = {f"{g}/vars/{j}": a for g, arrays in weights.layers.items() if g not in claimed
                    for j, a in enumerate(arrays)}
        return found, leftover
    named = {layer.name for layer in layout if layer.name}
    anonymous: dict[str, list[str]] = {}
    for layer_name, variables in weights.layers.items():
        if layer_name not in named:
            anonymous.setdefault(_legacy_kind(variables), []).append(layer_name)
    claimed = set()
    for i, layer in enumerate(layout):
        if layer.name is not None:
            key = layer.name if layer.name in weights.layers else None
        else:  # automatically named in Keras: the next unnamed file layer of the same kind
            queue = anonymous.get(_legacy_kind(dict.fromkeys(KINDS[layer.kind][1])), [])
            key = queue.pop(0) if queue else None
        if key is not None:
            found[i] = weights.layers[key]
            claimed.add(key)
    leftover = {f"{name}/{v}": a for name, variables in weights.layers.items() if name not in claimed
                for v, a in variables.items()}
    return found, leftover


def _legacy_kind(variables) -> str:
    """The kind of layer a legacy file's variable names reveal (only as fine as matching needs)."""
    if "moving_mean" in variables:
        return "bn"
    if "count" in variables:
        return "normalization"
    return "separable" if "pointwise_kernel" in variables else "conv"


def _short_names(kind: str, arrays) -> tuple[str, ...]:
    # Convolutions without a bias store one variable (two for a separable conv).
    names = KINDS[kind][1]
    return names[: len(arrays)]


def _to_zoo(kind: str, target: str, variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One Keras layer's variables as {zoo path: array}; shapes left as they are when they cannot fit."""
    out = {}
    if kind in ("conv", "dense"):
        out[f"{target}.kernel"] = variables.get("kernel")
        if "bias" in variables:
            out[f"{target}.bias"] = variables["bias"]
    elif kind == "se_conv":
        kernel = variables.get("kernel")
        if kernel is not None and kernel.ndim == 4 and kernel.shape[:2] == (1, 1):
            kernel = kernel.reshape(kernel.shape[2:])  # (1, 1, in, out) -> Dense (in, out)
        out[f"{target}.kernel"] = kernel
        if "bias" in variables:
            out[f"{target}.bias"] = variables["bias"]
    elif kind == "bn":
        for ours, theirs in (("scale", "gamma"), ("bias", "beta"), ("mean", "moving_mean"),
                             ("var", "moving_variance")):
            out[f"{target}.{ours}"] = variables.get(theirs)
    elif kind == "depthwise":
        out[f"{target}.kernel"] = _depthwise(variables.get("kernel"))
        if "bias" in variables:
            out[f"{target}.bias"] = variables["bias"]
    elif kind == "separable":
        out[f"{target}.depthwise.kernel"] = _depthwise(variables.get("depthwise_kernel"))
        out[f"{target}.pointwise.kernel"] = variables.get("pointwise_kernel")
        if "bias" in variables:
            out[f"{target}.bias"] = variables["bias"]
    return {k: v for k, v in out.items() if v is not None}


def _depthwise(kernel):
    # Keras: (k, k, channels, multiplier); flax grouped conv: (k, k, 1, channels * multiplier),
    # output channel c * multiplier + m in both.
    if kernel is None or kernel.ndim != 4:
        return kernel
    kh, kw, channels, multiplier = kernel.shape
    return kernel.reshape(kh, kw, 1, channels * multiplier)


# --------------------------------------------------------------------------- import


def _family_options(family: str) -> dict:
    if family == "resnet":
        return {"stride_in": "1x1", "conv_bias": True, "bn_epsilon": 1.001e-5, "bn_momentum": 0.99}
    if family == "efficientnet":
        return {"bn_epsilon": 1e-3}
    return {}


def _input_normalization(variables: dict[str, np.ndarray] | None, imagenet_rescale: bool | None):
    """(scale, mean, variance) reproducing Keras's Rescaling(1/255) + Normalization [+ Rescaling]."""
    if variables is None:
        raise WeightsMismatchError("the file has no Normalization layer, which every Keras EfficientNet has")
    mean = np.asarray(variables["mean"], np.float64).reshape(-1)
    variance = np.asarray(variables["variance"], np.float64).reshape(-1)
    if imagenet_rescale is None:
        imagenet_rescale = bool(np.allclose(variance, IMAGENET_STDDEV_RGB, rtol=0, atol=1e-6))
    if imagenet_rescale:
        # Keras divides by sqrt(variance) and then by sqrt(stddev): one division by sqrt(variance * stddev).
        variance = variance * np.asarray(IMAGENET_STDDEV_RGB)
    return (1.0 / 255.0, tuple(mean.tolist()), tuple(variance.tolist())), imagenet_rescale


def keras_to_zoo(arch: str, weights: KerasWeights, head_paths: list[str]) -> tuple[dict, dict]:
    """Map a Keras file onto zoo paths for `arch`.

    Args:
        head_paths: the zoo model's head Dense paths (`loading.head_dense_paths`); empty
            for a model without head, whose Keras head layers are then left out.
    Returns:
        (weights {clean zoo path: array} including unclaimed file entries under their file
        names, so that loading reports them; the Normalization layer's variables or None).
    """
    layout = keras_layout(arch)
    found, leftover = match_layers(layout, weights)
    flat: dict[str, np.ndarray] = {}
    normalization = None
    for i, layer in enumerate(layout):
        if i not in found:
            continue
        if layer.kind == "normalization":
            normalization = found[i]
            continue
        target = layer.target
        if target.startswith("head:"):
            k = int(target.split(":")[1])
            if not head_paths:
                continue  # a feature extractor: the file's classifier is not wanted
            if not -len(head_paths) <= k < len(head_paths):
                flat[f"keras:{layer.name}"] = next(iter(found[i].values()))
                continue
            target = head_paths[k]
        flat.update(_to_zoo(layer.kind, target, found[i]))
    flat.update({f"keras:{name}": array for name, array in leftover.items()})
    return flat, normalization


def file_classes_of(arch: str, weights: KerasWeights) -> tuple[bool, int | None]:
    """Whether the file holds classifier layers, and the number of classes of its last one."""
    layout = keras_layout(arch)
    found, _ = match_layers(layout, weights)
    head = [i for i, layer in enumerate(layout) if layer.target.startswith("head:")]
    last = found.get(head[-1], {}).get("kernel")
    return any(i in found for i in head), (int(last.shape[-1]) if last is not None else None)


def import_keras(
    arch: str,
    path: str | os.PathLike,
    *,
    num_classes: int | None = None,
    include_top: bool | None = None,
    input_size: int | tuple[int, int] | None = None,
    imagenet_rescale: bool | None = None,
    dtype=None,
    seed: int = 0,
) -> Imported:
    """Read Keras Applications weights into the zoo's `arch`.

    Args:
        arch: "vgg16", "vgg19", "resnet50", "resnet101", "resnet152", "xception",
            "efficientnet_b0".."efficientnet_b7" (or the Keras names, "ResNet50"...).
        path: a Keras 3 `.weights.h5` or `.keras` file, or a legacy tf.keras `.h5` file.
        num_classes: None keeps the file's classifier; another number builds a new last
            Dense layer of that size (freshly initialized), every other weight imported.
        include_top: None follows the file (Keras's "notop" files give a feature extractor).
        input_size: (H, W) or an int; matters for VGG's Flatten head, whose size is read
            from the file when not given (a square input).
        imagenet_rescale: EfficientNet only; None recognizes Keras's ImageNet normalization
            values (see the module docstring), True/False forces the extra rescaling.
        dtype: computation dtype of the zoo model (default float32).
    Returns:
        an `Imported` (model in eval mode, its `create_model` kwargs, metadata); `.save(dir)`.
    Raises:
        WeightsMismatchError (a ValueError) listing missing, unexpected and mismatched weights.
    """
    name = resolve_architecture(arch)
    spec = zoo.get_spec(name)
    weights = read_keras_weights(path)
    has_head, file_classes = file_classes_of(name, weights)
    if include_top is None:
        include_top = has_head or num_classes is not None
    new_head = False
    if include_top:
        if num_classes is None:
            if file_classes is None:
                raise ValueError(f"{path} holds no classifier; pass num_classes for a new one, "
                                 f"or include_top=False for a feature extractor")
            num_classes = file_classes
        new_head = file_classes != num_classes
    if input_size is None and spec.family == "vgg" and include_top and has_head:
        input_size = _vgg_input_size(name, weights)
    if isinstance(input_size, int):
        input_size = (input_size, input_size)

    options = _family_options(spec.family)
    metadata = {"source": "keras", "file": Path(path).name, "format": weights.format,
                "preprocessing": preprocessing_for("keras", name)}
    if spec.family == "efficientnet":
        _, normalization = keras_to_zoo(name, weights, [])
        options["input_normalization"], folded = _input_normalization(normalization, imagenet_rescale)
        metadata["imagenet_rescale"] = folded
    kwargs = {"num_classes": num_classes if include_top else None, "include_top": include_top, **options}
    if input_size is not None:
        kwargs["input_size"] = tuple(input_size)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = build_abstract(name, dtype=dtype or jnp.float32, **kwargs)
    head_paths = head_dense_paths(model)
    flat, _ = keras_to_zoo(name, weights, head_paths)
    skip: tuple[str, ...] = ()
    if new_head and head_paths:
        # Keep the hidden Dense layers the file has (VGG's fc1, fc2); replace what it lacks.
        present = {p.rsplit(".", 1)[0] for p in flat if p.startswith("head.")}
        skip = tuple(p for p in head_paths if p == head_paths[-1] or p not in present)
        flat = {k: v for k, v in flat.items() if not any(k.startswith(s + ".") for s in skip)}
        metadata["new_head"] = list(skip)
    fill_model(model, flat, skip=skip, source=f"Keras file {path} ({weights.format} layout, as {name})",
               seed=seed)
    return Imported(model, name, kwargs, metadata)


def _vgg_input_size(name: str, weights: KerasWeights) -> tuple[int, int] | None:
    """The square input whose 5-pool feature map gives fc1's input width (224 for ImageNet files)."""
    layout = keras_layout(name)
    found, _ = match_layers(layout, weights)
    fc1 = next((found[i] for i, layer in enumerate(layout) if layer.name == "fc1" and i in found), None)
    if fc1 is None or "kernel" not in fc1:
        return None
    cells = fc1["kernel"].shape[0] // 512
    side = int(round(cells ** 0.5))
    if side * side * 512 != fc1["kernel"].shape[0]:
        return None  # not square: the shape mismatch will be reported by name
    return (side * 32, side * 32)
