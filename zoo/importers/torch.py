"""torchvision state dicts into zoo models: ResNet-18..152, VGG-11..19 and (mapping only) EfficientNet.

A state dict is read as data: `.safetensors` with safetensors, `.pth`/`.pt` with
`torch.load(..., weights_only=True)` (PyTorch's loader that refuses to run code;
it needs PyTorch installed). Tensors are converted to the zoo's layout:

    conv weight (out, in, kh, kw)  -> kernel (kh, kw, in, out)
    depthwise   (c, 1, kh, kw)     -> kernel (kh, kw, 1, c)
    linear      (out, in)          -> kernel (in, out)
    BatchNorm weight, bias, running_mean, running_var -> scale, bias, mean, var

torchvision's VGG flattens its (N, 512, 7, 7) maps channel-first; the zoo's
Flatten is (h, w, c), so the first classifier weight's columns are permuted.
Its adaptive average pool to 7x7 is the identity at 224x224, where the imported
model equals torchvision's.

Architectures whose torchvision version is a different network than the zoo's
family, with no option of the family to build it, are refused with the reason:
AlexNet (torchvision's is the one-tower 64-192-384-256-256 variant of Krizhevsky's
"One weird trick", arXiv:1404.5997, without LRN), GoogLeNet (BatchNorm after every
conv, a 3x3 conv where the paper's branch has 5x5, no LRN) and the VGG *_bn
variants (BatchNorm after every conv). EfficientNet: torchvision pads its
stride-2 convolutions symmetrically ((k-1)/2 on each side) where Keras and the
zoo's family pad (k/2 - 1, k/2) on even sizes, which shifts every later map by
one pixel; the zoo's family offers no symmetric option yet, so the import is
refused (the weight mapping is complete, and equal on inputs of size 32k + 1,
where both paddings coincide; see `torch_to_zoo`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import zoo
from zoo.importers.loading import Imported, build_abstract, fill_model, head_dense_paths
from zoo.importers.preprocess import preprocessing_for

SUPPORTED = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
             "vgg11", "vgg13", "vgg16", "vgg19",
             *(f"efficientnet_b{i}" for i in range(8)))

REFUSED = {
    "alexnet": (
        "torchvision's alexnet is the one-tower variant of Krizhevsky's 'One weird trick' "
        "(arXiv:1404.5997): 64-192-384-256-256 channels, conv1 11x11/4 with padding 2, no local "
        "response normalization. The zoo's alexnet is the 2012 paper's network (96-256-384-384-256 "
        "channels with LRN, two towers or one via groups) and has no option for those widths, so "
        "torchvision's weights do not fit it."
    ),
    "googlenet": (
        "torchvision's googlenet is a BatchNorm variant: every conv has no bias and is followed by "
        "BatchNorm, the '5x5' branch is a 3x3 conv, there is no local response normalization and "
        "its transform_input re-normalizes the input. The zoo's googlenet is the paper's network "
        "(biased convs, LRN, a real 5x5 branch) and has no option for that variant."
    ),
}
VGG_BN_REASON = (
    "this is a torchvision vgg*_bn state dict (BatchNorm after every conv); the zoo's VGG is the "
    "paper's network without BatchNorm and has no option for it. Import a plain vgg11/13/16/19 file."
)

# torchvision builds EfficientNet-B5..B7 with BatchNorm eps 1e-3 (weights ported from
# TensorFlow), B0..B4 with PyTorch's default 1e-5.
EFFICIENTNET_BN_EPSILON = {**{f"efficientnet_b{i}": 1e-5 for i in range(5)},
                           **{f"efficientnet_b{i}": 1e-3 for i in range(5, 8)}}
VGG_POOLED_SIZE = (7, 7)  # torchvision's adaptive average pool output, flattened channel-first


@dataclasses.dataclass(frozen=True)
class TorchModule:
    """One torchvision module with weights and the zoo module it fills.

    Attributes:
        prefix: the state-dict prefix, e.g. "layer1.0.conv1".
        kind: "conv", "bn", "linear", "se_conv" (a 1x1 conv our Dense) or "flatten_linear"
            (the first Dense after VGG's channel-first flatten).
        target: zoo module path, or "head:k" for the k-th Dense of the zoo head.
    """

    prefix: str
    kind: str
    target: str


def _resnet_layout(spec) -> Iterator[TorchModule]:
    yield TorchModule("conv1", "conv", "features.stem.conv")
    yield TorchModule("bn1", "bn", "features.stem.bn")
    convs = 3 if spec.options["block"] == "bottleneck" else 2
    for s, depth in enumerate(spec.options["stage_depths"]):
        for b in range(depth):
            theirs, ours = f"layer{s + 1}.{b}", f"features.stage{s + 1}.{b}"
            for i in range(1, convs + 1):
                yield TorchModule(f"{theirs}.conv{i}", "conv", f"{ours}.conv{i}")
                yield TorchModule(f"{theirs}.bn{i}", "bn", f"{ours}.bn{i}")
            if b == 0 and (s > 0 or convs == 3):  # where stride or width changes
                yield TorchModule(f"{theirs}.downsample.0", "conv", f"{ours}.downsample.conv")
                yield TorchModule(f"{theirs}.downsample.1", "bn", f"{ours}.downsample.bn")
    yield TorchModule("fc", "linear", "head:-1")


def _vgg_layout(spec) -> Iterator[TorchModule]:
    index, block, position = 0, 1, 0
    for entry in spec.options["layers"]:
        if entry == "M":
            index, block, position = index + 1, block + 1, 0
            continue
        position += 1
        yield TorchModule(f"features.{index}", "conv", f"features.conv{block}_{position}")
        index += 2  # the conv and its ReLU
    yield TorchModule("classifier.0", "flatten_linear", "head:0")
    yield TorchModule("classifier.3", "linear", "head:1")
    yield TorchModule("classifier.6", "linear", "head:-1")


def _efficientnet_layout(spec) -> Iterator[TorchModule]:
    from zoo.efficientnet import B0_STAGES, block_configs

    yield TorchModule("features.0.0", "conv", "features.stem.conv.conv")
    yield TorchModule("features.0.1", "bn", "features.stem.bn")
    configs = block_configs(spec.options["width_multiplier"], spec.options["depth_multiplier"])
    repeat = 0
    for i, config in enumerate(configs):
        repeat = repeat + 1 if i > 0 and configs[i - 1].stage == config.stage else 0
        theirs, ours = f"features.{config.stage + 1}.{repeat}.block", f"features.blocks.{i}"
        j = 0
        if config.expand_ratio != 1:
            yield TorchModule(f"{theirs}.0.0", "conv", f"{ours}.expand_conv")
            yield TorchModule(f"{theirs}.0.1", "bn", f"{ours}.expand_bn")
            j = 1
        depthwise = f"{ours}.depthwise_conv" + (".conv" if config.stride == 2 else "")
        yield TorchModule(f"{theirs}.{j}.0", "conv", depthwise)
        yield TorchModule(f"{theirs}.{j}.1", "bn", f"{ours}.depthwise_bn")
        yield TorchModule(f"{theirs}.{j + 1}.fc1", "se_conv", f"{ours}.se.reduce")
        yield TorchModule(f"{theirs}.{j + 1}.fc2", "se_conv", f"{ours}.se.expand")
        yield TorchModule(f"{theirs}.{j + 2}.0", "conv", f"{ours}.project_conv")
        yield TorchModule(f"{theirs}.{j + 2}.1", "bn", f"{ours}.project_bn")
    top = f"features.{len(B0_STAGES) + 1}"  # the 1x1 conv after the seven stages
    yield TorchModule(f"{top}.0", "conv", "features.top_conv")
    yield TorchModule(f"{top}.1", "bn", "features.top_bn")
    yield TorchModule("classifier.1", "linear", "head:-1")


_LAYOUTS = {"resnet": _resnet_layout, "vgg": _vgg_layout, "efficientnet": _efficientnet_layout}


def torch_layout(arch: str) -> list[TorchModule]:
    """The torchvision modules with weights of `arch`, in state-dict order."""
    _check_supported(arch)
    spec = zoo.get_spec(arch)
    return list(_LAYOUTS[spec.family](spec))


def _check_supported(arch: str) -> None:
    if arch in REFUSED:
        raise ValueError(f"cannot import torchvision weights into {arch}: {REFUSED[arch]}")
    if arch not in SUPPORTED:
        raise ValueError(f"cannot import torchvision weights for {arch!r}; supported: {', '.join(SUPPORTED)}")


# --------------------------------------------------------------------------- reading


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: numpy array} of a `.safetensors` file or a `.pth`/`.pt` state dict.

    `.pth` files are read with `torch.load(weights_only=True)`, which only rebuilds
    tensors and plain containers and refuses anything else. A checkpoint that wraps
    its state dict ({"state_dict": ...} or {"model": ...}) is unwrapped, and the
    "module." prefix of DataParallel is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state dict file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own types for damaged headers/data
            raise ValueError(f"cannot read {path} as safetensors: {e}") from None
    else:
        try:
            import torch
        except ImportError:
            raise ValueError(
                f"reading {path.name} needs PyTorch (pip install torch); or save the state dict as "
                f".safetensors (safetensors.torch.save_file) and import that"
            ) from None
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses pickled code with an UnpicklingError
            raise ValueError(f"cannot read {path} as a PyTorch state dict with weights_only=True: {e}") from None
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
        state = {k: (v.detach().float().numpy() if v.is_floating_point() else v.detach().numpy())
                 for k, v in loaded.items() if hasattr(v, "detach")}
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------- mapping


def _conv_kernel(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight


def _linear_kernel(weight: np.ndarray) -> np.ndarray:
    return weight.T if weight.ndim == 2 else weight


def _flatten_linear_kernel(weight: np.ndarray) -> np.ndarray:
    # Columns ordered (c, h, w) by torch.flatten on NCHW -> rows ordered (h, w, c) for our Flatten.
    h, w = VGG_POOLED_SIZE
    if weight.ndim != 2 or weight.shape[1] % (h * w):
        return _linear_kernel(weight)
    c = weight.shape[1] // (h * w)
    return weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)


def _se_kernel(weight: np.ndarray) -> np.ndarray:
    # A 1x1 conv (out, in, 1, 1) on the squeezed vector is our Dense (in, out).
    if weight.ndim == 4 and weight.shape[2:] == (1, 1):
        return weight[:, :, 0, 0].T
    return weight


def torch_to_zoo(arch: str, state: Mapping[str, np.ndarray], head_paths: list[str]) -> dict[str, np.ndarray]:
    """Map a torchvision state dict onto clean zoo paths for `arch`.

    Args:
        head_paths: the zoo model's head Dense paths; empty for a feature extractor, whose
            torchvision classifier is then left out.
    Returns:
        {clean zoo path: array}, with every state-dict entry no module claimed under
        "torch:<name>" so that loading reports it as unexpected.
    """
    flat: dict[str, np.ndarray] = {}
    claimed: set[str] = set()
    for module in torch_layout(arch):
        target = module.target
        if target.startswith("head:"):
            if not head_paths:
                claimed.update(k for k in state if k.startswith(module.prefix + "."))
                continue
            target = head_paths[int(target.split(":")[1])]

        def take(name, prefix=module.prefix):
            key = f"{prefix}.{name}"
            if key in state:
                claimed.add(key)
                return np.asarray(state[key])
            return None

        if module.kind == "bn":
            for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                                 ("var", "running_var")):
                value = take(theirs)
                if value is not None:
                    flat[f"{target}.{ours}"] = value
            take("num_batches_tracked")  # a training counter with no zoo counterpart
            continue
        weight, bias = take("weight"), take("bias")
        convert = {"conv": _conv_kernel, "linear": _linear_kernel, "se_conv": _se_kernel,
                   "flatten_linear": _flatten_linear_kernel}[module.kind]
        if weight is not None:
            flat[f"{target}.kernel"] = convert(weight)
        if bias is not None:
            flat[f"{target}.bias"] = bias
    flat.update({f"torch:{k}": np.asarray(v) for k, v in state.items() if k not in claimed})
    return flat


# --------------------------------------------------------------------------- import


def _family_options(arch: str, family: str) -> dict:
    if family == "efficientnet":
        from zoo import efficientnet

        if "symmetric" not in getattr(efficientnet, "DOWNSAMPLE_PADDINGS", ()):
            raise ValueError(
                f"cannot import torchvision weights into {arch} exactly: torchvision pads its stride-2 "
                f"convolutions symmetrically ((k-1)/2 pixels on each side), the zoo's EfficientNet pads "
                f"like Keras/TensorFlow (k/2 - 1 before, k/2 after, on even sizes), so on a 224x224 "
                f"image every map after the stem would be shifted by one pixel and the outputs would "
                f"differ. The family has no symmetric-padding option (downsample_padding is one of "
                f"{getattr(efficientnet, 'DOWNSAMPLE_PADDINGS', ())}); import Keras's EfficientNet "
                f"weights instead (zoo import keras {arch} FILE)."
            )
        return {"bn_epsilon": EFFICIENTNET_BN_EPSILON[arch], "downsample_padding": "symmetric"}
    return {}


def import_torch(
    arch: str,
    path: str | os.PathLike,
    *,
    num_classes: int | None = None,
    include_top: bool = True,
    dtype=None,
    seed: int = 0,
) -> Imported:
    """Read a torchvision state dict into the zoo's `arch`.

    Args:
        arch: "resnet18".."resnet152", "vgg11".."vgg19" (and EfficientNet once the family
            offers symmetric padding; AlexNet and GoogLeNet are refused, see the module docstring).
        path: `.safetensors`, or `.pth`/`.pt` (needs PyTorch; read with weights_only=True).
        num_classes: None keeps the file's classifier; another number builds a new last
            Dense layer (freshly initialized), every other weight imported.
        include_top: False gives the feature extractor (the classifier in the file is ignored).
        dtype: computation dtype of the zoo model (default float32).
    Returns:
        an `Imported`: the model (eval mode) expects `preprocess_input(images, "torch")`.
    Raises:
        WeightsMismatchError (a ValueError) listing missing, unexpected and mismatched weights;
        ValueError when torchvision's version of `arch` is another network (the reason given).
    """
    _check_supported(arch)
    spec = zoo.get_spec(arch)
    options = _family_options(arch, spec.family)
    state = read_torch_state_dict(path)
    if spec.family == "vgg" and any(k.startswith("features.") and k.endswith(".running_mean") for k in state):
        raise ValueError(f"cannot import {path} into {arch}: {VGG_BN_REASON}")
    last = next((m for m in reversed(torch_layout(arch)) if m.target == "head:-1"), None)
    file_classes = state.get(f"{last.prefix}.weight") if last else None
    file_classes = int(file_classes.shape[0]) if file_classes is not None else None
    new_head = False
    if include_top:
        if num_classes is None:
            if file_classes is None:
                raise ValueError(f"{path} holds no classifier; pass num_classes, or include_top=False")
            num_classes = file_classes
        new_head = file_classes != num_classes
    kwargs = {"include_top": include_top, **options}
    if include_top:
        kwargs["num_classes"] = num_classes
    model = build_abstract(arch, dtype=dtype or jnp.float32, **kwargs)
    head_paths = head_dense_paths(model)
    flat = torch_to_zoo(arch, state, head_paths)
    skip: tuple[str, ...] = ()
    metadata = {"source": "torchvision", "file": Path(path).name,
                "preprocessing": preprocessing_for("torch", arch)}
    if new_head and head_paths:
        skip = (head_paths[-1],)
        flat = {k: v for k, v in flat.items() if not k.startswith(skip[0] + ".")}
        metadata["new_head"] = list(skip)
    fill_model(model, flat, skip=skip, source=f"state dict {path} (torchvision layout, as {arch})", seed=seed)
    return Imported(model, arch, kwargs, metadata)
