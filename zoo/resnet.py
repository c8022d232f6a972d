"""ResNet and SE-ResNet: residual units stacked in four stages, one builder for every depth.

He et al. 2015, "Deep Residual Learning for Image Recognition", https://arxiv.org/abs/1512.03385.
Hu et al. 2017, "Squeeze-and-Excitation Networks", https://arxiv.org/abs/1709.01507.

A variant is data: a block kind ("basic": two 3x3 convs; "bottleneck": 1x1, 3x3,
1x1 with 4x expansion) and `stage_depths`, the number of blocks per stage
(resnet50: bottleneck, (3, 4, 6, 3)). SE-ResNet is a ResNet whose blocks take the
`se_reduction` option: a `zoo.layers.SqueezeExcite` rescales the residual branch
before the skip connection is added.

    x: (N, H, W, C) -> stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool) -> stage1..stage4
       -> (N, ceil(H/32), ceil(W/32), 512 or 2048) -> global average pool -> Dense

Parameter names (the checkpoint contract; stages and blocks count from 1 and 0):
    features.stem.conv, features.stem.bn
    features.stage{s}[b].conv1, .bn1, .conv2, .bn2       basic and bottleneck blocks
    features.stage{s}[b].conv3, .bn3                     bottleneck blocks only
    features.stage{s}[b].downsample.conv, .downsample.bn first block of a stage whose
                                                         stride or width changes, else None
    features.stage{s}[b].se.reduce, .se.expand           with se_reduction, else None
    head.layers[0]                                       the Dense classifier
Conv kernels are (kh, kw, in, out), Dense kernels (in, out); BatchNorm holds
`scale`, `bias` (params) and `mean`, `var` (batch statistics).

Options that let imported weights compute exactly what their source computed
(defaults follow torchvision, "ResNet v1.5"):
    stride_in="3x3": a bottleneck strides in its 3x3 conv (torchvision, timm);
        "1x1" strides in its first 1x1 conv (the paper, Keras ResNet50/101/152).
    conv_bias=False: Keras puts a bias on every conv, even before BatchNorm.
    bn_epsilon=1e-5: Keras uses 1.001e-5.
    bn_momentum=0.9: weight of the old running statistics (Flax/Keras convention:
        running = momentum * running + (1 - momentum) * batch). torchvision's
        momentum=0.1 is 0.9 here; Keras's default is 0.99.
Padding is explicit and symmetric, as in both sources: the stem conv pads 3 then
runs VALID (Keras: ZeroPadding2D(3)); the max pool pads 1 with -inf (torchvision)
where Keras pads 1 with zeros, the same result since its input is a ReLU output
(>= 0); every 3x3 conv pads 1 (with stride 2, "SAME" would pad (0, 1) instead and
shift the grid). The shortcut is a 1x1 conv (stride 1 or 2, no padding) plus BN in
both sources.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from zoo.classifier import Classifier, dense_head
from zoo.layers import MaxPool, SqueezeExcite
from zoo.registry import ModelSpec, register
from zoo.stages import Stage

BLOCK_KINDS = ("basic", "bottleneck")
STRIDE_IN = ("1x1", "3x3")
# Output channels of a block = stage width * expansion.
EXPANSION = {"basic": 1, "bottleneck": 4}

# He initialisation suits ReLU networks (He et al. 2015, "Delving Deep into Rectifiers").
_conv_init = nnx.initializers.he_normal()


def _conv(in_ch, out_ch, kernel, stride, *, conv_bias, dtype, rngs):
    pad = kernel // 2  # explicit symmetric padding, as torchvision and Keras compute it
    return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                    use_bias=conv_bias, kernel_init=_conv_init, dtype=dtype, rngs=rngs)


def _bn(channels, *, bn_epsilon, bn_momentum, dtype, rngs):
    return nnx.BatchNorm(channels, momentum=bn_momentum, epsilon=bn_epsilon, dtype=dtype, rngs=rngs)


class Downsample(nnx.Module):
    """Projection shortcut: 1x1 conv (stride 1 or 2) then BatchNorm.

    x: (N, H, W, in_ch) -> (N, ceil(H/stride), ceil(W/stride), out_ch)
    """

    def __init__(self, in_ch, out_ch, stride, *, conv_bias, bn_epsilon, bn_momentum, dtype, rngs):
        self.conv = _conv(in_ch, out_ch, 1, stride, conv_bias=conv_bias, dtype=dtype, rngs=rngs)
        self.bn = _bn(out_ch, bn_epsilon=bn_epsilon, bn_momentum=bn_momentum, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.conv(x))


class ResidualBlock(nnx.Module):
    """One ResNet unit: relu(branch(x) [* se gate] + shortcut(x)).

    "basic":      conv3x3(stride) BN ReLU conv3x3 BN                     -> width channels
    "bottleneck": conv1x1 BN ReLU conv3x3 BN ReLU conv1x1 BN             -> 4 * width channels
                  (the stride sits in the 3x3 or the first 1x1, see `stride_in`)
    The shortcut is the identity, or `Downsample` when stride or width changes.

    Args:
        kind: "basic" or "bottleneck".
        in_ch: input channels; width: the block's inner width.
        stride: 1 or 2.
        se_reduction: None, or the squeeze-and-excitation reduction ratio (SENet: 16).
        stride_in: "3x3" or "1x1" (bottleneck only).
    x: (N, H, W, in_ch) -> (N, ceil(H/stride), ceil(W/stride), width * EXPANSION[kind])
    """

    def __init__(self, kind, in_ch, width, stride, *, se_reduction, stride_in,
                 conv_bias, bn_epsilon, bn_momentum, dtype, rngs):
        out_ch = width * EXPANSION[kind]
        conv = {"conv_bias": conv_bias, "dtype": dtype, "rngs": rngs}
        bn = {"bn_epsilon": bn_epsilon, "bn_momentum": bn_momentum, "dtype": dtype, "rngs": rngs}
        shortcut = {**conv, **bn}
        self.kind = kind
        if kind == "basic":
            self.conv1 = _conv(in_ch, width, 3, stride, **conv)
            self.bn1 = _bn(width, **bn)
            self.conv2 = _conv(width, width, 3, 1, **conv)
            self.bn2 = _bn(width, **bn)
        else:
            stride_1x1, stride_3x3 = (stride, 1) if stride_in == "1x1" else (1, stride)
            self.conv1 = _conv(in_ch, width, 1, stride_1x1, **conv)
            self.bn1 = _bn(width, **bn)
            self.conv2 = _conv(width, width, 3, stride_3x3, **conv)
            self.bn2 = _bn(width, **bn)
            self.conv3 = _conv(width, out_ch, 1, 1, **conv)
            self.bn3 = _bn(out_ch, **bn)
        self.se = (SqueezeExcite(out_ch, out_ch // se_reduction, dtype=dtype, rngs=rngs)
                   if se_reduction else None)
        self.downsample = (Downsample(in_ch, out_ch, stride, **shortcut)
                           if stride != 1 or in_ch != out_ch else None)

    def __call__(self, x):
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.kind == "bottleneck":
            y = self.bn3(self.conv3(jax.nn.relu(y)))
        if self.se is not None:
            y = self.se(y)
        shortcut = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(y + shortcut)


class Stem(nnx.Module):
    """7x7/2 conv (pad 3), BN, ReLU, 3x3/2 max pool (pad 1).

    x: (N, H, W, C) -> (N, ceil(H/4), ceil(W/4), width)
    """

    def __init__(self, in_ch, width, *, conv_bias, bn_epsilon, bn_momentum, dtype, rngs):
        self.conv = _conv(in_ch, width, 7, 2, conv_bias=conv_bias, dtype=dtype, rngs=rngs)
        self.bn = _bn(width, bn_epsilon=bn_epsilon, bn_momentum=bn_momentum, dtype=dtype, rngs=rngs)
        # -inf padding (reduce_window's identity for max) never wins; see the module docstring.
        self.pool = MaxPool(3, 2, padding=((1, 1), (1, 1)))

    def sequential_steps(self):
        """(name, step) in call order; "relu" is the stride-2 map (read by `zoo.stages.backbone_steps`)."""
        return [("conv", self.conv), ("bn", self.bn), ("relu", jax.nn.relu), ("pool", self.pool)]

    def __call__(self, x):
        for _, step in self.sequential_steps():
            x = step(x)
        return x


class ResNetFeatures(nnx.Module):
    """Stem then `len(stage_depths)` stages; stage 1 keeps the resolution, later ones halve it.

    Stages are the attributes `stage1`, `stage2`, ... (each an `nnx.List` of blocks).
    x: (N, H, W, C) -> (N, ceil(H/32), ceil(W/32), stage_widths[-1] * EXPANSION[block])
    for four stages.
    """

    def __init__(self, *, in_ch, block, stage_depths, stage_widths, stem_width, se_reduction,
                 stride_in, conv_bias, bn_epsilon, bn_momentum, dtype, rngs):
        settings = {"conv_bias": conv_bias, "bn_epsilon": bn_epsilon, "bn_momentum": bn_momentum, "dtype": dtype}
        self.stem = Stem(in_ch, stem_width, **settings, rngs=rngs)
        self.num_stages = len(stage_depths)
        channels = stem_width
        for s, (depth, width) in enumerate(zip(stage_depths, stage_widths)):
            blocks = []
            for b in range(depth):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(ResidualBlock(block, channels, width, stride, se_reduction=se_reduction,
                                            stride_in=stride_in, **settings, rngs=rngs))
                channels = width * EXPANSION[block]
            setattr(self, f"stage{s + 1}", nnx.List(blocks))
        self.out_channels = channels

    def sequential_steps(self):
        """(name, step) in call order: "stem", "stage1.0", "stage1.1", ... (read by `zoo.stages.backbone_steps`)."""
        steps = [("stem", self.stem)]
        for s in range(self.num_stages):
            steps += [(f"stage{s + 1}.{b}", block) for b, block in enumerate(getattr(self, f"stage{s + 1}"))]
        return steps

    def __call__(self, x):
        for _, step in self.sequential_steps():
            x = step(x)
        return x


def resnet_stages(block, stage_depths, stage_widths, stem_width) -> tuple[Stage, ...]:
    """The stem's stride-2 activation, then the last block of each stage (strides 4, 8, 16, 32)."""
    stages = [Stage("stem.relu", 2, stem_width)]
    for s, (depth, width) in enumerate(zip(stage_depths, stage_widths)):
        stages.append(Stage(f"stage{s + 1}.{depth - 1}", 4 * 2**s, width * EXPANSION[block]))
    return tuple(stages)


def _check_options(*, block, stage_depths, stage_widths, se_reduction, stride_in, bn_momentum,
                   unknown, name):
    if unknown:
        raise ValueError(
            f"{name}: unknown option(s) {sorted(unknown)}; ResNet options are block, stage_depths, "
            f"stage_widths, stem_width, se_reduction, stride_in, conv_bias, bn_epsilon, bn_momentum"
        )
    if block not in BLOCK_KINDS:
        raise ValueError(f"{name}: block must be one of {BLOCK_KINDS}, got {block!r}")
    if len(stage_depths) != len(stage_widths) or not all(d >= 1 for d in stage_depths):
        raise ValueError(
            f"{name}: stage_depths {tuple(stage_depths)} needs one positive depth per entry of "
            f"stage_widths {tuple(stage_widths)}"
        )
    if stride_in not in STRIDE_IN:
        raise ValueError(f"{name}: stride_in must be one of {STRIDE_IN}, got {stride_in!r}")
    if stride_in == "1x1" and block == "basic":
        raise ValueError(
            f"{name}: stride_in='1x1' applies to bottleneck blocks; a basic block always strides in "
            f"its first 3x3 conv. Leave stride_in at '3x3'."
        )
    if se_reduction is not None:
        narrowest = min(w * EXPANSION[block] for w in stage_widths)
        if se_reduction < 1 or narrowest // se_reduction < 1:
            raise ValueError(
                f"{name}: se_reduction={se_reduction} leaves no squeeze channels for a "
                f"{narrowest}-channel block; use a ratio between 1 and {narrowest}"
            )
    if not 0.0 <= bn_momentum < 1.0:
        raise ValueError(
            f"{name}: bn_momentum={bn_momentum} must be in [0, 1) (the weight of the old statistics; "
            f"torchvision's momentum m is 1 - m here)"
        )


def build_resnet(
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    include_top: bool,
    dtype,
    rngs: nnx.Rngs,
    name: str,
    block: str,
    stage_depths: Sequence[int],
    stage_widths: Sequence[int] = (64, 128, 256, 512),
    stem_width: int = 64,
    se_reduction: int | None = None,
    stride_in: str = "3x3",
    conv_bias: bool = False,
    bn_epsilon: float = 1e-5,
    bn_momentum: float = 0.9,
    **unknown,
) -> Classifier:
    """Build a ResNet / SE-ResNet classifier (see the module docstring for the options).

    Returns a `Classifier`: x (N, H, W, C) -> logits (N, num_classes), or the
    feature map (N, ceil(H/32), ceil(W/32), c) when include_top is False.
    """
    _check_options(block=block, stage_depths=stage_depths, stage_widths=stage_widths,
                   se_reduction=se_reduction, stride_in=stride_in, bn_momentum=bn_momentum,
                   unknown=unknown, name=name)
    features = ResNetFeatures(
        in_ch=input_shape[2], block=block, stage_depths=tuple(stage_depths),
        stage_widths=tuple(stage_widths), stem_width=stem_width, se_reduction=se_reduction,
        stride_in=stride_in, conv_bias=conv_bias, bn_epsilon=bn_epsilon, bn_momentum=bn_momentum,
        dtype=dtype, rngs=rngs,
    )
    head = (dense_head("avg", features.out_channels, num_classes, dtype=dtype, rngs=rngs)
            if include_top else None)
    return Classifier(features, head, input_shape=input_shape, min_size=MIN_SIZE, name=name,
                      stages=resnet_stages(block, stage_depths, stage_widths, stem_width))


# Every layer maps a size h >= 1 to >= 1 (7x7/2 pad 3, pool 3/2 pad 1, 3x3/2 pad 1 and
# 1x1/2 all give floor((h - 1) / 2) + 1), so a single pixel still yields a 1x1 map.
MIN_SIZE = (1, 1)

HE_2015 = {
    "paper": "He et al., Deep Residual Learning for Image Recognition",
    "year": 2015,
    "url": "https://arxiv.org/abs/1512.03385",
    "introduced": "identity skip connections: blocks learn residuals, so 100+ layer nets train",
}
HU_2017 = {
    "paper": "Hu et al., Squeeze-and-Excitation Networks",
    "year": 2017,
    "url": "https://arxiv.org/abs/1709.01507",
    "introduced": "squeeze-and-excitation: recalibrate feature-map channels by gates from their global means",
}

# name: (block, stage_depths, published trainable parameters at 224x224x3, 1000 classes)
RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2), 11_689_512),
    "resnet34": ("basic", (3, 4, 6, 3), 21_797_672),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 25_557_032),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 44_549_160),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 60_192_808),
}
SE_RESNETS = {
    "seresnet50": ("bottleneck", (3, 4, 6, 3), 28_088_024),
    "seresnet101": ("bottleneck", (3, 4, 23, 3), 49_326_872),
    "seresnet152": ("bottleneck", (3, 8, 36, 3), 66_821_848),
}

for _table, _extra, _paper in ((RESNETS, {}, HE_2015), (SE_RESNETS, {"se_reduction": 16}, HU_2017)):
    for _name, (_block, _depths, _params) in _table.items():
        register(ModelSpec(
            name=_name,
            family="resnet",
            builder=build_resnet,
            options={"block": _block, "stage_depths": _depths, **_extra},
            **_paper,
            input_shape=(224, 224, 3),
            min_size=MIN_SIZE,
            head_kind="avg",
            total_stride=32,
            feature_shape=(7, 7, 512 * EXPANSION[_block]),
            num_params=_params,
            num_classes=1000,
        ))
