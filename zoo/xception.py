"""Xception: Inception's idea taken to the limit, with depthwise separable convolutions.

Chollet 2017, "Xception: Deep Learning with Depthwise Separable Convolutions",
https://arxiv.org/abs/1610.02357.

Every separable conv is a 3x3 depthwise conv (one filter per channel, via
`feature_group_count`) followed by a 1x1 pointwise conv, both without bias and
with no nonlinearity in between; BatchNorm follows each one. The layer order is
the paper's figure 5, which Keras Applications' Xception follows:

    x: (N, 299, 299, 3)
    stem:   conv 3x3/2 VALID (32) BN ReLU, conv 3x3 VALID (64) BN ReLU        -> 147x147x64
    entry:  3 blocks, widths 128, 256, 728: [ReLU] sep BN ReLU sep BN, max pool 3x3/2,
            + shortcut conv 1x1/2 BN (the first block's input is already ReLU'd,
            so it starts with the sep conv)                                   -> 19x19x728
    middle: 8 blocks: 3 x (ReLU sep BN) + identity                           -> 19x19x728
    exit:   ReLU sep(728) BN ReLU sep(1024) BN, max pool 3x3/2 + shortcut     -> 10x10x1024
    final:  sep(1536) BN ReLU sep(2048) BN ReLU                               -> 10x10x2048
    head:   global average pool, Dense(num_classes)

Padding: the two stem convs are VALID; separable convs, max pools and 1x1/2
shortcuts use "SAME", which in XLA has TensorFlow's semantics (an odd total pad
puts the extra pixel at the bottom/right; pools pad with -inf), exactly what Keras
computes on any input size.

Parameter names (the checkpoint contract):
    features.stem.conv1, .bn1, .conv2, .bn2
    features.entry_flow[i], features.middle_flow[i], features.exit_flow[i]: blocks, each
        .units[j].depthwise   kernel (3, 3, 1, in)   (Keras's depthwise_kernel is (3, 3, in, 1))
        .units[j].pointwise   kernel (1, 1, in, out)
        .units[j].bn
        .shortcut.conv, .shortcut.bn   (None in the middle flow)
    features.final.units[j]   the two separable convs after the exit block (no shortcut)
    head.layers[0]            the Dense classifier
Options: `bn_epsilon` (default 1e-3, Keras's) and `bn_momentum` (default 0.99,
Keras's; the weight of the old running statistics), plus the width table below.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from zoo.classifier import Classifier, dense_head
from zoo.layers import MaxPool
from zoo.registry import ModelSpec, register
from zoo.stages import Stage, last_at_each_stride

# He initialisation suits ReLU networks; fan_in of a depthwise 3x3 kernel is 9, as it should be.
_conv_init = nnx.initializers.he_normal()


def _bn(channels, *, bn_epsilon, bn_momentum, dtype, rngs):
    return nnx.BatchNorm(channels, momentum=bn_momentum, epsilon=bn_epsilon, dtype=dtype, rngs=rngs)


class SeparableUnit(nnx.Module):
    """[ReLU] depthwise 3x3 conv, pointwise 1x1 conv, BatchNorm.

    Args:
        relu_first: apply ReLU to the input first (Xception puts it before each separable conv,
            except where the input already went through one).
    x: (N, H, W, in_ch) -> (N, H, W, out_ch)
    """

    def __init__(self, in_ch, out_ch, *, relu_first, bn_epsilon, bn_momentum, dtype, rngs):
        self.relu_first = relu_first
        self.depthwise = nnx.Conv(in_ch, in_ch, (3, 3), padding="SAME", feature_group_count=in_ch,
                                  use_bias=False, kernel_init=_conv_init, dtype=dtype, rngs=rngs)
        self.pointwise = nnx.Conv(in_ch, out_ch, (1, 1), padding="VALID", use_bias=False,
                                  kernel_init=_conv_init, dtype=dtype, rngs=rngs)
        self.bn = _bn(out_ch, bn_epsilon=bn_epsilon, bn_momentum=bn_momentum, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        if self.relu_first:
            x = jax.nn.relu(x)
        return self.bn(self.pointwise(self.depthwise(x)))


class Shortcut(nnx.Module):
    """1x1/2 conv (no bias) then BatchNorm. x: (N, H, W, in_ch) -> (N, ceil(H/2), ceil(W/2), out_ch)"""

    def __init__(self, in_ch, out_ch, *, bn_epsilon, bn_momentum, dtype, rngs):
        self.conv = nnx.Conv(in_ch, out_ch, (1, 1), strides=2, padding="SAME", use_bias=False,
                             kernel_init=_conv_init, dtype=dtype, rngs=rngs)
        self.bn = _bn(out_ch, bn_epsilon=bn_epsilon, bn_momentum=bn_momentum, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.conv(x))


class XceptionBlock(nnx.Module):
    """Separable units, then either a 3x3/2 max pool + projection shortcut, or identity + add.

    Args:
        widths: output channels of each separable unit.
        downsample: True for entry/exit blocks (pool and 1x1/2 shortcut), False for the middle flow.
        relu_first: whether the first unit starts with ReLU (False after the stem).
    x: (N, H, W, in_ch) -> (N, H', W', widths[-1]), H' = ceil(H/2) if downsample else H
    """

    def __init__(self, in_ch, widths: Sequence[int], *, downsample, relu_first, bn_epsilon,
                 bn_momentum, dtype, rngs):
        bn = {"bn_epsilon": bn_epsilon, "bn_momentum": bn_momentum, "dtype": dtype, "rngs": rngs}
        units, ch = [], in_ch
        for j, width in enumerate(widths):
            units.append(SeparableUnit(ch, width, relu_first=relu_first or j > 0, **bn))
            ch = width
        self.units = nnx.List(units)
        if downsample:
            self.pool = MaxPool(3, 2, padding="SAME")
            self.shortcut = Shortcut(in_ch, ch, **bn)
        else:
            if in_ch != ch:
                raise ValueError(f"an identity-shortcut block must keep its width; got {in_ch} -> {ch}")
            self.pool = None
            self.shortcut = None

    def __call__(self, x):
        y = x
        for unit in self.units:
            y = unit(y)
        if self.shortcut is None:
            return y + x
        return self.pool(y) + self.shortcut(x)


class Stem(nnx.Module):
    """conv 3x3/2 VALID, BN, ReLU, conv 3x3 VALID, BN, ReLU.

    x: (N, H, W, C) -> (N, (H - 3) // 2 - 1, (W - 3) // 2 - 1, widths[1])
    """

    def __init__(self, in_ch, widths, *, bn_epsilon, bn_momentum, dtype, rngs):
        bn = {"bn_epsilon": bn_epsilon, "bn_momentum": bn_momentum, "dtype": dtype, "rngs": rngs}
        self.conv1 = nnx.Conv(in_ch, widths[0], (3, 3), strides=2, padding="VALID", use_bias=False,
                              kernel_init=_conv_init, dtype=dtype, rngs=rngs)
        self.bn1 = _bn(widths[0], **bn)
        self.conv2 = nnx.Conv(widths[0], widths[1], (3, 3), padding="VALID", use_bias=False,
                              kernel_init=_conv_init, dtype=dtype, rngs=rngs)
        self.bn2 = _bn(widths[1], **bn)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        return jax.nn.relu(self.bn2(self.conv2(x)))


class Final(nnx.Module):
    """The separable convs after the exit block, each followed by ReLU (no shortcut).

    x: (N, h, w, in_ch) -> (N, h, w, widths[-1])
    """

    def __init__(self, in_ch, widths, *, bn_epsilon, bn_momentum, dtype, rngs):
        units, ch = [], in_ch
        for width in widths:
            units.append(SeparableUnit(ch, width, relu_first=False, bn_epsilon=bn_epsilon,
                                       bn_momentum=bn_momentum, dtype=dtype, rngs=rngs))
            ch = width
        self.units = nnx.List(units)

    def __call__(self, x):
        for unit in self.units:
            x = jax.nn.relu(unit(x))
        return x


class XceptionFeatures(nnx.Module):
    """Stem, entry flow, middle flow, exit flow, final separable convs.

    x: (N, H, W, C) -> (N, h, w, final_widths[-1]); 299x299 -> 10x10 (total stride 32).
    """

    def __init__(self, *, in_ch, stem_widths, entry_widths, middle_width, middle_depth, exit_widths,
                 final_widths, bn_epsilon, bn_momentum, dtype, rngs):
        bn = {"bn_epsilon": bn_epsilon, "bn_momentum": bn_momentum, "dtype": dtype, "rngs": rngs}
        self.stem = Stem(in_ch, stem_widths, **bn)
        ch, entry = stem_widths[-1], []
        for i, width in enumerate(entry_widths):
            entry.append(XceptionBlock(ch, (width, width), downsample=True, relu_first=i > 0, **bn))
            ch = width
        self.entry_flow = nnx.List(entry)
        if middle_depth and ch != middle_width:
            raise ValueError(f"middle_width ({middle_width}) must equal the last entry width ({ch})")
        self.middle_flow = nnx.List([
            XceptionBlock(ch, (ch, ch, ch), downsample=False, relu_first=True, **bn)
            for _ in range(middle_depth)
        ])
        self.exit_flow = nnx.List([XceptionBlock(ch, tuple(exit_widths), downsample=True,
                                                 relu_first=True, **bn)])
        self.final = Final(exit_widths[-1], final_widths, **bn)
        self.out_channels = final_widths[-1]

    def sequential_steps(self):
        """(name, step) in call order: "stem", "entry_flow.0", ..., "final" (read by `zoo.stages.backbone_steps`)."""
        steps = [("stem", self.stem)]
        for flow in ("entry_flow", "middle_flow", "exit_flow"):
            steps += [(f"{flow}.{i}", block) for i, block in enumerate(getattr(self, flow))]
        return [*steps, ("final", self.final)]

    def __call__(self, x):
        for _, step in self.sequential_steps():
            x = step(x)
        return x


def xception_stages(stem_widths, entry_widths, middle_depth, exit_widths, final_widths) -> tuple[Stage, ...]:
    """The end of each resolution: the stem (2), entry blocks (4, 8), the last middle block (16), final (32)."""
    taps = [Stage("stem", 2, stem_widths[-1])]  # conv1 strides 2, VALID convs only trim the border
    stride = 2
    for i, width in enumerate(entry_widths):
        stride *= 2
        taps.append(Stage(f"entry_flow.{i}", stride, width))
    taps += [Stage(f"middle_flow.{i}", stride, entry_widths[-1]) for i in range(middle_depth)]
    taps += [Stage("exit_flow.0", stride * 2, exit_widths[-1]), Stage("final", stride * 2, final_widths[-1])]
    return last_at_each_stride(taps)


def build_xception(
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    include_top: bool,
    dtype,
    rngs: nnx.Rngs,
    name: str,
    stem_widths: Sequence[int] = (32, 64),
    entry_widths: Sequence[int] = (128, 256, 728),
    middle_width: int = 728,
    middle_depth: int = 8,
    exit_widths: Sequence[int] = (728, 1024),
    final_widths: Sequence[int] = (1536, 2048),
    bn_epsilon: float = 1e-3,
    bn_momentum: float = 0.99,
    **unknown,
) -> Classifier:
    """Build an Xception classifier (see the module docstring for the layout and options).

    Returns a `Classifier`: x (N, H, W, C) -> logits (N, num_classes), or the
    feature map (N, h, w, final_widths[-1]) when include_top is False.
    """
    if unknown:
        raise ValueError(
            f"{name}: unknown option(s) {sorted(unknown)}; Xception options are stem_widths, "
            f"entry_widths, middle_width, middle_depth, exit_widths, final_widths, bn_epsilon, bn_momentum"
        )
    if len(stem_widths) != 2 or not entry_widths or not exit_widths or not final_widths:
        raise ValueError(f"{name}: stem_widths needs 2 widths; entry, exit and final widths at least one")
    if not 0.0 <= bn_momentum < 1.0:
        raise ValueError(f"{name}: bn_momentum={bn_momentum} must be in [0, 1) (weight of the old statistics)")
    features = XceptionFeatures(
        in_ch=input_shape[2], stem_widths=tuple(stem_widths), entry_widths=tuple(entry_widths),
        middle_width=middle_width, middle_depth=middle_depth, exit_widths=tuple(exit_widths),
        final_widths=tuple(final_widths), bn_epsilon=bn_epsilon, bn_momentum=bn_momentum,
        dtype=dtype, rngs=rngs,
    )
    head = (dense_head("avg", features.out_channels, num_classes, dtype=dtype, rngs=rngs)
            if include_top else None)
    stages = xception_stages(stem_widths, entry_widths, middle_depth, exit_widths, final_widths)
    return Classifier(features, head, input_shape=input_shape, min_size=MIN_SIZE, name=name, stages=stages)


# The VALID stem needs 3 pixels for conv1 and 3 of its outputs for conv2:
# (H - 3) // 2 + 1 >= 3  <=>  H >= 7. Every later layer pads SAME, so keeps h >= 1.
MIN_SIZE = (7, 7)

register(ModelSpec(
    name="xception",
    family="xception",
    builder=build_xception,
    options={},
    paper="Chollet, Xception: Deep Learning with Depthwise Separable Convolutions",
    year=2017,
    url="https://arxiv.org/abs/1610.02357",
    introduced="depthwise separable convolutions throughout: spatial and cross-channel "
               "correlations mapped separately, with residual connections",
    input_shape=(299, 299, 3),
    min_size=MIN_SIZE,
    head_kind="avg",
    total_stride=32,
    feature_shape=(10, 10, 2048),
    num_params=22_855_952,
    num_classes=1000,
))
