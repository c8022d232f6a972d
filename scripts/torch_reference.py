"""The zoo's benchmark models written again in plain PyTorch (torch.nn only, no torchvision).

Each builder takes the zoo model's registry spec and returns a `torch.nn.Module` that computes
what the zoo model computes, in NCHW:

    resnet*          torchvision's ResNet layout (conv1, bn1, layer1.0.conv1, ..., fc), v1.5 strides
    vgg*             torchvision's VGG layout (features.0, ..., classifier.6); `fcn=True` makes
                     classifier.0/3/6 a 7x7 VALID conv and two 1x1 convs (the FCN of `convert.to_fcn`)
    efficientnet_b*  torchvision's EfficientNet layout (features.0.0, features.1.0.block.0.0, ...,
                     classifier.1), padded like the zoo (Keras): a stride-2 conv pads (k/2 - 1, k/2)
                     on an even side, where torchvision pads (k - 1)/2 on both
    xception         the zoo's own names (features.stem.conv1, features.entry_flow.0.units.0.depthwise,
                     ...), TensorFlow's SAME padding for the stride-2 max pools
    mnistnet*        the zoo's own names (features.layers.0.conv, ..., head.layers.1)

BatchNorm: the zoo's momentum m (weight of the old statistics, Flax/Keras) is PyTorch's 1 - m;
epsilon is the zoo model's. In training PyTorch updates running_var with the unbiased batch
variance and Flax with the biased one; both normalize the batch by its biased variance, so
logits and losses agree, only the running variances drift apart by n / (n - 1).

`torch_state_dict(zoo_model, arch)` turns the zoo model's weights into the torch model's state
dict: for ResNet, VGG and EfficientNet through the torchvision importer's own table
(`zoo.importers.torch.torch_layout`), read backwards; for Xception and MnistNet path for path.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

import zoo
from zoo.importers.loading import head_dense_paths
from zoo.importers.torch import torch_layout


def batchnorm(channels: int, momentum: float, eps: float) -> nn.BatchNorm2d:
    """nn.BatchNorm2d with the zoo's conventions: the zoo's (Flax's) momentum m is PyTorch's 1 - m."""
    return nn.BatchNorm2d(channels, eps=eps, momentum=1.0 - momentum)


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow's / XLA's SAME: the odd pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


# --------------------------------------------------------------------------- ResNet


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: the stride in the 3x3 conv), or BasicBlock when `basic`."""

    def __init__(self, in_ch, width, stride, *, basic, eps, momentum):
        super().__init__()
        out_ch = width if basic else 4 * width
        self.basic = basic
        bn = lambda c: batchnorm(c, momentum, eps)  # noqa: E731
        if basic:
            self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
            self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
            self.bn3 = bn(out_ch)
        self.bn1, self.bn2 = bn(width), bn(width)
        self.downsample = (nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), bn(out_ch))
                           if stride != 1 or in_ch != out_ch else None)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if not self.basic:
            y = self.bn3(self.conv3(F.relu(y)))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, *, block, stage_depths, num_classes, in_ch=3, stage_widths=(64, 128, 256, 512),
                 stem_width=64, eps=1e-5, momentum=0.9):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, stem_width, 7, 2, 3, bias=False)
        self.bn1 = batchnorm(stem_width, momentum, eps)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels, basic = stem_width, block == "basic"
        for s, (depth, width) in enumerate(zip(stage_depths, stage_widths)):
            blocks = []
            for b in range(depth):
                blocks.append(Bottleneck(channels, width, 2 if s > 0 and b == 0 else 1, basic=basic, eps=eps,
                                         momentum=momentum))
                channels = width if basic else 4 * width
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.num_stages = len(stage_depths)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for s in range(self.num_stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.fc(x.mean((2, 3)))


# --------------------------------------------------------------------------- VGG


class VGG(nn.Module):
    """torchvision's VGG without its adaptive pool (the identity at 224x224), or its FCN.

    Args:
        pooled: (h, w) of the last feature map, what classifier.0 flattens (7, 7 at 224x224).
        fcn: classifier.0/3/6 as convolutions (h x w VALID, 1x1, 1x1): any input size, (N, K, h', w') out.
    """

    def __init__(self, layers, *, num_classes, pooled, in_ch=3, fcn=False, dropout=0.5):
        super().__init__()
        steps, channels = [], in_ch
        for entry in layers:
            if entry == "M":
                steps.append(nn.MaxPool2d(2, 2))
            else:
                steps += [nn.Conv2d(channels, entry, 3, 1, 1), nn.ReLU(inplace=True)]
                channels = entry
        self.features = nn.Sequential(*steps)
        h, w = pooled
        if fcn:
            dense = [nn.Conv2d(channels, 4096, (h, w)), nn.Conv2d(4096, 4096, 1), nn.Conv2d(4096, num_classes, 1)]
        else:
            dense = [nn.Linear(channels * h * w, 4096), nn.Linear(4096, 4096), nn.Linear(4096, num_classes)]
        self.fcn = fcn
        self.classifier = nn.Sequential(dense[0], nn.ReLU(True), nn.Dropout(dropout), dense[1], nn.ReLU(True),
                                        nn.Dropout(dropout), dense[2])

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x if self.fcn else torch.flatten(x, 1))


# --------------------------------------------------------------------------- EfficientNet


class KerasPadConv(nn.Conv2d):
    """A stride-2 VALID conv after the zoo's (Keras's `correct_pad`) zero padding: (k//2 - 1, k//2)
    on an even side, (k//2, k//2) on an odd one. torchvision pads (k - 1) / 2 on both sides instead."""

    def forward(self, x):
        k = self.kernel_size[0]
        (top, bottom), (left, right) = [(k // 2 - 1 if n % 2 == 0 else k // 2, k // 2) for n in x.shape[2:]]
        return super().forward(F.pad(x, (left, right, top, bottom)))


def conv_bn_act(conv, channels, *, eps, act=True):
    """torchvision's Conv2dNormActivation: .0 conv, .1 BatchNorm, .2 SiLU."""
    layers = [conv, batchnorm(channels, 0.99, eps)]
    return nn.Sequential(*layers, nn.SiLU(inplace=True)) if act else nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision's SqueezeExcitation: fc1, fc2 as 1x1 convs on the channel means."""

    def __init__(self, channels, squeeze):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        s = self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class StochasticDepth(nn.Module):
    """Drop the residual branch of whole samples with probability p in training ("row" mode)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep


class MBConv(nn.Module):
    def __init__(self, config, *, eps):
        super().__init__()
        c = config
        width = c.in_filters * c.expand_ratio
        layers = []
        if c.expand_ratio != 1:
            layers.append(conv_bn_act(nn.Conv2d(c.in_filters, width, 1, bias=False), width, eps=eps))
        if c.stride == 1:
            depthwise = nn.Conv2d(width, width, c.kernel, 1, c.kernel // 2, groups=width, bias=False)
        else:
            depthwise = KerasPadConv(width, width, c.kernel, 2, 0, groups=width, bias=False)
        layers.append(conv_bn_act(depthwise, width, eps=eps))
        layers.append(SqueezeExcitation(width, max(1, int(c.in_filters * c.se_ratio))))
        layers.append(conv_bn_act(nn.Conv2d(width, c.out_filters, 1, bias=False), c.out_filters, eps=eps, act=False))
        self.block = nn.Sequential(*layers)
        self.has_skip = c.stride == 1 and c.in_filters == c.out_filters
        self.stochastic_depth = StochasticDepth(c.drop_rate if self.has_skip else 0.0)

    def forward(self, x):
        y = self.block(x)
        return self.stochastic_depth(y) + x if self.has_skip else y


class EfficientNet(nn.Module):
    def __init__(self, *, width_multiplier, depth_multiplier, num_classes, in_ch=3, dropout_rate=0.2,
                 drop_connect_rate=0.2, eps=1e-3):
        super().__init__()
        from zoo.efficientnet import STEM_FILTERS, TOP_FILTERS, block_configs, round_filters

        configs = block_configs(width_multiplier, depth_multiplier, drop_connect_rate)
        stem = round_filters(STEM_FILTERS, width_multiplier)
        stages = [conv_bn_act(KerasPadConv(in_ch, stem, 3, 2, 0, bias=False), stem, eps=eps)]
        for stage in sorted({c.stage for c in configs}):
            stages.append(nn.Sequential(*(MBConv(c, eps=eps) for c in configs if c.stage == stage)))
        top = round_filters(TOP_FILTERS, width_multiplier)
        stages.append(conv_bn_act(nn.Conv2d(configs[-1].out_filters, top, 1, bias=False), top, eps=eps))
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Sequential(nn.Dropout(dropout_rate), nn.Linear(top, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


# --------------------------------------------------------------------------- Xception


class SameMaxPool(nn.Module):
    """3x3/2 max pool with TensorFlow's SAME padding (-inf, the odd pixel after)."""

    def forward(self, x):
        (top, bottom), (left, right) = [same_pads(n, 3, 2) for n in x.shape[2:]]
        return F.max_pool2d(F.pad(x, (left, right, top, bottom), value=-math.inf), 3, 2)


class SeparableUnit(nn.Module):
    def __init__(self, in_ch, out_ch, *, relu_first, eps, momentum):
        super().__init__()
        self.relu_first = relu_first
        self.depthwise = nn.Conv2d(in_ch, in_ch, 3, 1, 1, groups=in_ch, bias=False)
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn = batchnorm(out_ch, momentum, eps)

    def forward(self, x):
        return self.bn(self.pointwise(self.depthwise(F.relu(x) if self.relu_first else x)))


class XceptionBlock(nn.Module):
    def __init__(self, in_ch, widths, *, downsample, relu_first, eps, momentum):
        super().__init__()
        units, ch = [], in_ch
        for j, width in enumerate(widths):
            units.append(SeparableUnit(ch, width, relu_first=relu_first or j > 0, eps=eps, momentum=momentum))
            ch = width
        self.units = nn.Sequential(*units)
        if downsample:
            self.pool = SameMaxPool()
            self.shortcut = nn.Module()
            self.shortcut.conv = nn.Conv2d(in_ch, ch, 1, 2, bias=False)  # a 1x1/2 SAME conv never pads
            self.shortcut.bn = batchnorm(ch, momentum, eps)
        else:
            self.pool = self.shortcut = None

    def forward(self, x):
        y = self.units(x)
        if self.shortcut is None:
            return y + x
        return self.pool(y) + self.shortcut.bn(self.shortcut.conv(x))


class Xception(nn.Module):
    def __init__(self, *, num_classes, in_ch=3, stem_widths=(32, 64), entry_widths=(128, 256, 728),
                 middle_depth=8, exit_widths=(728, 1024), final_widths=(1536, 2048), eps=1e-3, momentum=0.99,
                 **unused):
        super().__init__()
        bn = {"eps": eps, "momentum": momentum}
        self.features = nn.Module()
        stem = self.features.stem = nn.Module()
        stem.conv1, stem.bn1 = nn.Conv2d(in_ch, stem_widths[0], 3, 2, bias=False), batchnorm(stem_widths[0], **bn)
        stem.conv2 = nn.Conv2d(stem_widths[0], stem_widths[1], 3, bias=False)
        stem.bn2 = batchnorm(stem_widths[1], **bn)
        ch, entry = stem_widths[1], []
        for i, width in enumerate(entry_widths):
            entry.append(XceptionBlock(ch, (width, width), downsample=True, relu_first=i > 0, **bn))
            ch = width
        self.features.entry_flow = nn.Sequential(*entry)
        self.features.middle_flow = nn.Sequential(*(XceptionBlock(ch, (ch,) * 3, downsample=False, relu_first=True,
                                                                  **bn) for _ in range(middle_depth)))
        self.features.exit_flow = nn.Sequential(XceptionBlock(ch, tuple(exit_widths), downsample=True,
                                                              relu_first=True, **bn))
        units, ch = [], exit_widths[-1]
        for width in final_widths:
            units.append(SeparableUnit(ch, width, relu_first=False, **bn))
            ch = width
        self.features.final = nn.Module()
        self.features.final.units = nn.Sequential(*units)
        self.head = nn.Module()
        self.head.layers = nn.ModuleList([nn.Linear(ch, num_classes)])

    def forward(self, x):
        f = self.features
        x = F.relu(f.stem.bn1(f.stem.conv1(x)))
        x = F.relu(f.stem.bn2(f.stem.conv2(x)))
        x = f.exit_flow(f.middle_flow(f.entry_flow(x)))
        for unit in f.final.units:
            x = F.relu(unit(x))
        return self.head.layers[0](x.mean((2, 3)))


# --------------------------------------------------------------------------- MnistNet


class ConvBNReLU(nn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False)
        self.bn = batchnorm(out_ch, 0.9, 1e-5)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class MnistNet(nn.Module):
    def __init__(self, *, widths, convs_per_stage, num_classes, input_shape, dropout=0.4):
        super().__init__()
        h, w, channels = input_shape
        layers = []
        for stage, (width, depth) in enumerate(zip(widths, convs_per_stage)):
            if stage > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(depth):
                layers.append(ConvBNReLU(channels, width))
                channels = width
        self.features = nn.Module()
        self.features.layers = nn.Sequential(*layers)
        self.head = nn.Module()
        dense = nn.Linear((h // 4) * (w // 4) * channels, num_classes)
        # As the zoo's dense_head: no Dropout layer at rate 0, so the Linear is head.layers.0 then.
        self.head.layers = nn.Sequential(nn.Dropout(dropout), dense) if dropout > 0 else nn.Sequential(dense)

    def forward(self, x):
        x = self.features.layers(x)
        x = x.permute(0, 2, 3, 1).flatten(1)  # the zoo's Flatten is (h, w, c)
        return self.head.layers(x)


# --------------------------------------------------------------------------- building and copying


def build_torch(arch: str, *, num_classes: int, input_shape, fcn: bool = False, **options) -> nn.Module:
    """The PyTorch twin of `zoo.create_model(arch, num_classes=..., input_size=input_shape[:2], **options)`.

    Args:
        input_shape: (H, W, C) the zoo model was built for (VGG's and MnistNet's Flatten heads depend on it).
        fcn: VGG only: the FCN of `convert.to_fcn` (classifier as convolutions).
        options: the zoo family options given to `create_model` (dropout rates, BatchNorm settings).
    """
    spec = zoo.get_spec(arch)
    o = {**spec.options, **options}
    h, w, c = input_shape
    if spec.family == "resnet":
        return ResNet(block=o["block"], stage_depths=o["stage_depths"], num_classes=num_classes, in_ch=c,
                      stage_widths=o.get("stage_widths", (64, 128, 256, 512)), stem_width=o.get("stem_width", 64),
                      eps=o.get("bn_epsilon", 1e-5), momentum=o.get("bn_momentum", 0.9))
    if spec.family == "vgg":
        pools = sum(e == "M" for e in o["layers"])
        return VGG(o["layers"], num_classes=num_classes, pooled=(h // 2**pools, w // 2**pools), in_ch=c, fcn=fcn,
                   dropout=o.get("dropout", 0.5))
    if spec.family == "efficientnet":
        return EfficientNet(width_multiplier=o["width_multiplier"], depth_multiplier=o["depth_multiplier"],
                            num_classes=num_classes, in_ch=c, dropout_rate=o.get("dropout_rate", 0.2),
                            drop_connect_rate=o.get("drop_connect_rate", 0.2), eps=o.get("bn_epsilon", 1e-3))
    if spec.family == "xception":
        keys = ("stem_widths", "entry_widths", "middle_depth", "exit_widths", "final_widths")
        return Xception(num_classes=num_classes, in_ch=c, **{k: o[k] for k in keys if k in o},
                        eps=o.get("bn_epsilon", 1e-3), momentum=o.get("bn_momentum", 0.99))
    if spec.family == "mnistnet":
        return MnistNet(widths=o["widths"], convs_per_stage=o["convs_per_stage"], num_classes=num_classes,
                        input_shape=input_shape, dropout=o.get("dropout", 0.4))
    raise ValueError(f"no PyTorch reference for {arch} (family {spec.family})")


def _modules_by_path(model: nnx.Module) -> dict[str, nnx.Module]:
    return {".".join(map(str, path)): node for path, node in nnx.iter_graph(model)
            if isinstance(node, (nnx.Conv, nnx.Linear, nnx.BatchNorm))}


def _conv_weight(kernel: np.ndarray) -> np.ndarray:
    return kernel.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw); depthwise (kh, kw, 1, c) too


def _tensors(module: nnx.Module, kind: str, flatten_channels: int | None = None) -> dict[str, np.ndarray]:
    """One zoo layer as torch tensors; kind: "conv", "linear", "bn", "se_conv", "flatten_linear"."""
    if isinstance(module, nnx.BatchNorm):
        return {"weight": module.scale[...], "bias": module.bias[...], "running_mean": module.mean[...],
                "running_var": module.var[...]}
    kernel = np.asarray(module.kernel[...])
    if kind == "conv":
        weight = _conv_weight(kernel)
    elif kind == "se_conv":
        weight = kernel.T[:, :, None, None]
    elif kind == "flatten_linear":  # rows (h, w, c) of the zoo's Flatten -> columns (c, h, w) of torch.flatten
        hw = kernel.shape[0] // flatten_channels
        weight = kernel.reshape(hw, flatten_channels, -1).transpose(2, 1, 0).reshape(kernel.shape[1], -1)
    else:
        weight = kernel.T
    out = {"weight": weight}
    if getattr(module, "bias", None) is not None:
        out["bias"] = module.bias[...]
    return out


def torch_state_dict(zoo_model: nnx.Module, arch: str) -> dict[str, torch.Tensor]:
    """The zoo model's weights under the PyTorch twin's state-dict names (see the module docstring)."""
    modules = _modules_by_path(zoo_model)
    family = zoo.get_spec(arch).family
    flat: dict[str, np.ndarray] = {}
    if family in ("resnet", "vgg", "efficientnet"):
        heads = head_dense_paths(zoo_model)
        last_conv = None
        for entry in torch_layout(arch):
            target = heads[int(entry.target.split(":")[1])] if entry.target.startswith("head:") else entry.target
            module = modules.get(target)
            if module is None:  # the table follows the registered variant's depths and layer list
                raise ValueError(f"{arch}: the zoo model has no {target} (torchvision's {entry.prefix}); options "
                                 f"that change depth or the layer table do not fit the importer's table")
            if isinstance(module, nnx.Conv):
                last_conv = module
            kind = "bn" if entry.kind == "bn" else entry.kind
            channels = last_conv.out_features if entry.kind == "flatten_linear" else None
            flat.update({f"{entry.prefix}.{k}": v for k, v in _tensors(module, kind, channels).items()})
    else:
        for path, module in modules.items():
            kind = "conv" if isinstance(module, nnx.Conv) else "linear"
            flat.update({f"{path}.{k}": v for k, v in _tensors(module, kind).items()})
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in flat.items()}


def load_zoo_weights(torch_model: nn.Module, zoo_model: nnx.Module, arch: str) -> nn.Module:
    """Copy the zoo model's weights into `torch_model` (every weight, strictly; a Linear's weight
    fills a conv of the same size, as VGG's FCN needs). Returns torch_model."""
    state = torch_state_dict(zoo_model, arch)
    own = torch_model.state_dict()
    for name, value in state.items():
        if name in own and own[name].shape != value.shape and own[name].numel() == value.numel():
            state[name] = value.reshape(own[name].shape)
    for name, value in own.items():  # BatchNorm's counters are not weights
        if name.endswith("num_batches_tracked"):
            state[name] = value
    torch_model.load_state_dict(state, strict=True)
    return torch_model


def count_torch_params(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers, not counted), as zoo.count_params."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
