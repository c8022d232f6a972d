"""EfficientNet B0-B7: one base network, scaled in width, depth and resolution together.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019, https://arxiv.org/abs/1905.11946.

B0 is a stack of MBConv blocks (Sandler et al. 2018's inverted residual with
Hu et al.'s squeeze-and-excitation) described by one table, `B0_STAGES`.
B1-B7 are *derived* from it by four numbers each (`COMPOUND_SCALING`): a width
multiplier (filters, rounded to multiples of 8 and never below 90% of the
unscaled product), a depth multiplier (repeats, rounded up), a resolution
(the default input) and the dropout rate before the classifier.

    x: (N, H, W, 3) -> features -> (N, ceil(H/32), ceil(W/32), round_filters(1280))
                    -> head: global average pool, dropout, Dense -> (N, num_classes)

Parameter names (the contract for checkpoint importers; `...` = `features.`):

    ...input_norm                   optional fixed rescale/normalization, no parameters
    ...stem.conv  ...stem.bn        3x3/2 conv (no bias) + BatchNorm, then swish
    ...blocks[i]                    nnx.List of MBConv blocks, in Keras's order
        expand_conv  expand_bn      1x1 conv + BN + swish (None when expand ratio is 1)
        depthwise_conv depthwise_bn kxk depthwise conv + BN + swish
        se.reduce  se.expand        zoo.layers.SqueezeExcite (Dense kernels (c, s), (s, c))
        project_conv  project_bn    1x1 conv + BN, no activation
        drop_path                   StochasticDepth on the residual branch (or None)
    ...top_conv  ...top_bn          1x1 conv to round_filters(1280) + BN + swish
    head.layers[0]  head.layers[1]  Dropout, Dense (num_classes)

Block i corresponds to Keras's `block{stage}{letter}_` layers in order, e.g.
blocks[0] = block1a, blocks[1] = block2a, blocks[2] = block2b for B0. A Keras
Conv2D kernel (kh, kw, cin, cout) is our `nnx.Conv` kernel as is; a Keras
DepthwiseConv2D kernel (k, k, c, 1) is ours reshaped to (k, k, 1, c); Keras's
SE 1x1 convs (1, 1, c, s) are our Dense kernels reshaped to (c, s).

Choices made so that Keras Applications' weights reproduce Keras's outputs:
- BatchNorm epsilon 1e-3 and momentum 0.99 (`bn_epsilon` option).
- Stride-2 convolutions (the stem and the first depthwise conv of a stage)
  zero-pad explicitly and then convolve VALID, as Keras's `correct_pad` does:
  ((k//2 - 1, k//2)) on an even side, ((k//2, k//2)) on an odd one, decided
  from the actual input size (Keras decides at build time; with an unknown
  size it assumes even: `downsample_padding="assume_even"`). Stride-1
  convolutions are SAME.
- Keras rescales and normalizes inside the model; `input_normalization=
  (scale, mean, variance)` computes (x * scale - mean) / max(sqrt(variance), 1e-7)
  per channel, as Keras's Rescaling + Normalization layers. Keras's ImageNet
  weights add a further Rescaling by 1/sqrt(stddev) per channel: pass variance
  * stddev to fold it in. Off by default.
- Stochastic depth ("drop connect") on block b of B blocks uses rate
  drop_connect_rate * b / B, drops whole samples and rescales the survivors by
  1 / (1 - rate) in train mode; it is the identity in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.classifier import Classifier, Head
from zoo.layers import Activation, SqueezeExcite
from zoo.registry import ModelSpec, register
from zoo.stages import Stage, last_at_each_stride

FILTER_DIVISOR = 8
TOP_FILTERS = 1280  # width of the final 1x1 conv in B0, scaled like every other width
STEM_FILTERS = 32
DOWNSAMPLE_PADDINGS = ("correct_pad", "assume_even")
# Keras's Normalization layer divides by max(sqrt(variance), epsilon).
NORMALIZATION_EPSILON = 1e-7
# Keras refuses inputs below 32x32; at 32 every stride-2 step still halves a map of >= 2 pixels.
MIN_SIZE = (32, 32)

# He-normal over fan-out (Keras's CONV_KERNEL_INITIALIZER). A flax depthwise kernel is
# (k, k, 1, c), so its per-channel fan (k*k) is the "fan_in" axis product there.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")
depthwise_init = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
dense_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


class StageConfig(NamedTuple):
    """One row of the base (B0) table: `repeats` MBConv blocks of the same kind."""

    kernel: int
    repeats: int
    in_filters: int
    out_filters: int
    expand_ratio: int
    stride: int
    se_ratio: float


# Table 1 of the paper (stages 2-8), with the input width of each stage spelled out.
B0_STAGES = (
    StageConfig(kernel=3, repeats=1, in_filters=32, out_filters=16, expand_ratio=1, stride=1, se_ratio=0.25),
    StageConfig(kernel=3, repeats=2, in_filters=16, out_filters=24, expand_ratio=6, stride=2, se_ratio=0.25),
    StageConfig(kernel=5, repeats=2, in_filters=24, out_filters=40, expand_ratio=6, stride=2, se_ratio=0.25),
    StageConfig(kernel=3, repeats=3, in_filters=40, out_filters=80, expand_ratio=6, stride=2, se_ratio=0.25),
    StageConfig(kernel=5, repeats=3, in_filters=80, out_filters=112, expand_ratio=6, stride=1, se_ratio=0.25),
    StageConfig(kernel=5, repeats=4, in_filters=112, out_filters=192, expand_ratio=6, stride=2, se_ratio=0.25),
    StageConfig(kernel=3, repeats=1, in_filters=192, out_filters=320, expand_ratio=6, stride=1, se_ratio=0.25),
)


class Scaling(NamedTuple):
    """Compound-scaling coefficients of one variant (the paper's phi, turned into numbers)."""

    width_multiplier: float
    depth_multiplier: float
    resolution: int
    dropout_rate: float


COMPOUND_SCALING = {
    "b0": Scaling(1.0, 1.0, 224, 0.2),
    "b1": Scaling(1.0, 1.1, 240, 0.2),
    "b2": Scaling(1.1, 1.2, 260, 0.3),
    "b3": Scaling(1.2, 1.4, 300, 0.3),
    "b4": Scaling(1.4, 1.8, 380, 0.4),
    "b5": Scaling(1.6, 2.2, 456, 0.4),
    "b6": Scaling(1.8, 2.6, 528, 0.5),
    "b7": Scaling(2.0, 3.1, 600, 0.5),
}


def round_filters(filters: int, width_multiplier: float, divisor: int = FILTER_DIVISOR) -> int:
    """`filters * width_multiplier` rounded to the nearest multiple of `divisor`, never below 90% of it."""
    scaled = filters * width_multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # rounding down must not lose more than 10% of the width
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth_multiplier: float) -> int:
    """`repeats * depth_multiplier`, rounded up."""
    return int(math.ceil(depth_multiplier * repeats))


class BlockConfig(NamedTuple):
    """One MBConv block of a scaled network, as built."""

    stage: int  # 0-based row of the base table
    in_filters: int
    out_filters: int
    kernel: int
    stride: int
    expand_ratio: int
    se_ratio: float
    drop_rate: float  # stochastic-depth rate of the residual branch


def block_configs(
    width_multiplier: float,
    depth_multiplier: float,
    drop_connect_rate: float = 0.2,
    stages: Sequence[StageConfig] = B0_STAGES,
) -> list[BlockConfig]:
    """Every MBConv block of the network scaled from `stages` by the two multipliers.

    Within a stage only the first block strides and changes the width. The
    stochastic-depth rate grows linearly with the block index b (0-based) over
    all B blocks: drop_connect_rate * b / B.
    """
    total = sum(round_repeats(s.repeats, depth_multiplier) for s in stages)
    configs: list[BlockConfig] = []
    for stage_index, stage in enumerate(stages):
        in_filters = round_filters(stage.in_filters, width_multiplier)
        out_filters = round_filters(stage.out_filters, width_multiplier)
        for repeat in range(round_repeats(stage.repeats, depth_multiplier)):
            configs.append(BlockConfig(
                stage=stage_index,
                in_filters=in_filters if repeat == 0 else out_filters,
                out_filters=out_filters,
                kernel=stage.kernel,
                stride=stage.stride if repeat == 0 else 1,
                expand_ratio=stage.expand_ratio,
                se_ratio=stage.se_ratio,
                drop_rate=drop_connect_rate * len(configs) / total,
            ))
    return configs


def downsample_pads(size: int, kernel: int, mode: str) -> tuple[int, int]:
    """(before, after) zero padding of one spatial side ahead of a stride-2 VALID conv.

    "correct_pad" gives ceil(size / 2) outputs, like TF's SAME: (k//2 - 1, k//2)
    on an even side, (k//2, k//2) on an odd one. "assume_even" always uses the
    even rule (Keras when built for an unknown input size).
    """
    even = mode == "assume_even" or size % 2 == 0
    return (kernel // 2 - 1 if even else kernel // 2, kernel // 2)


class DownsampleConv(nnx.Module):
    """Zero padding (Keras's ZeroPadding2D + `correct_pad`) then a stride-2 VALID conv.

    Keeps the conv as `self.conv` so it is named like any other conv.
    x: (N, H, W, in_features) -> (N, ceil(H/2), ceil(W/2), out_features)
    """

    def __init__(self, in_features: int, out_features: int, kernel: int, *, groups: int = 1,
                 padding_mode: str, dtype, rngs: nnx.Rngs):
        self.kernel = kernel
        self.padding_mode = padding_mode
        self.conv = nnx.Conv(
            in_features, out_features, (kernel, kernel), strides=2, padding="VALID",
            feature_group_count=groups, use_bias=False, dtype=dtype,
            kernel_init=depthwise_init if groups > 1 else conv_init, rngs=rngs,
        )

    def __call__(self, x):
        pads = [downsample_pads(x.shape[axis], self.kernel, self.padding_mode) for axis in (1, 2)]
        return self.conv(jnp.pad(x, [(0, 0), *pads, (0, 0)]))


class StochasticDepth(nnx.Module):
    """Drop the whole residual branch of a sample with probability `rate` (train mode only).

    Huang et al. 2016, "Deep Networks with Stochastic Depth", https://arxiv.org/abs/1603.09382.
    Survivors are scaled by 1 / (1 - rate), so eval mode (`deterministic=True`,
    set by `model.eval()`) is the identity. Draws from the `dropout` stream of `rngs`.

    x: (N, H, W, C) -> same shape
    """

    def __init__(self, rate: float, *, rngs: nnx.Rngs, deterministic: bool = False):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"stochastic-depth rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.deterministic = deterministic
        self.rngs = rngs["dropout"].fork()

    def __call__(self, x):
        if self.deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class MBConv(nnx.Module):
    """Mobile inverted bottleneck with squeeze-and-excitation (one EfficientNet block).

    expand 1x1 (if expand_ratio != 1) -> depthwise kxk/stride -> SE -> project 1x1,
    plus an identity shortcut (through stochastic depth) when stride is 1 and
    the width is unchanged. SE squeezes to max(1, int(in_filters * se_ratio)).

    x: (N, H, W, in_filters) -> (N, H/stride, W/stride, out_filters)
    """

    def __init__(self, config: BlockConfig, *, bn_epsilon: float, padding_mode: str, dtype,
                 rngs: nnx.Rngs):
        c = config
        width = c.in_filters * c.expand_ratio

        def bn(features):
            return nnx.BatchNorm(features, momentum=0.99, epsilon=bn_epsilon, dtype=dtype, rngs=rngs)

        self.act = Activation("silu")
        if c.expand_ratio != 1:
            self.expand_conv = nnx.Conv(c.in_filters, width, (1, 1), use_bias=False, dtype=dtype,
                                        kernel_init=conv_init, rngs=rngs)
            self.expand_bn = bn(width)
        else:
            self.expand_conv = None
            self.expand_bn = None
        if c.stride == 1:
            self.depthwise_conv = nnx.Conv(width, width, (c.kernel, c.kernel), padding="SAME",
                                           feature_group_count=width, use_bias=False, dtype=dtype,
                                           kernel_init=depthwise_init, rngs=rngs)
        else:
            self.depthwise_conv = DownsampleConv(width, width, c.kernel, groups=width,
                                                 padding_mode=padding_mode, dtype=dtype, rngs=rngs)
        self.depthwise_bn = bn(width)
        if 0 < c.se_ratio <= 1:
            self.se = SqueezeExcite(width, max(1, int(c.in_filters * c.se_ratio)), activation="silu",
                                    dtype=dtype, rngs=rngs)
        else:
            self.se = None
        self.project_conv = nnx.Conv(width, c.out_filters, (1, 1), use_bias=False, dtype=dtype,
                                     kernel_init=conv_init, rngs=rngs)
        self.project_bn = bn(c.out_filters)
        self.has_skip = c.stride == 1 and c.in_filters == c.out_filters
        self.drop_path = StochasticDepth(c.drop_rate, rngs=rngs) if self.has_skip and c.drop_rate > 0 else None

    def __call__(self, x):
        y = x
        if self.expand_conv is not None:
            y = self.act(self.expand_bn(self.expand_conv(y)))
        y = self.act(self.depthwise_bn(self.depthwise_conv(y)))
        if self.se is not None:
            y = self.se(y)
        y = self.project_bn(self.project_conv(y))
        if not self.has_skip:
            return y
        if self.drop_path is not None:
            y = self.drop_path(y)
        return y + x


class InputNormalization(nnx.Module):
    """Fixed per-channel (x * scale - mean) / max(sqrt(variance), 1e-7); no parameters.

    Mirrors Keras's Rescaling + Normalization layers at the input of its EfficientNets.
    x: (N, H, W, C) -> same shape
    """

    def __init__(self, scale, mean, variance):
        self.scale = tuple(float(v) for v in scale)
        self.mean = tuple(float(v) for v in mean)
        self.variance = tuple(float(v) for v in variance)

    def __call__(self, x):
        scale, mean, variance = (jnp.asarray(v, x.dtype) for v in (self.scale, self.mean, self.variance))
        return (x * scale - mean) / jnp.maximum(jnp.sqrt(variance), NORMALIZATION_EPSILON)


class Stem(nnx.Module):
    """3x3/2 conv (no bias) + BN + swish. x: (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), width)."""

    def __init__(self, in_channels: int, width: int, *, bn_epsilon: float, padding_mode: str, dtype,
                 rngs: nnx.Rngs):
        self.conv = DownsampleConv(in_channels, width, 3, padding_mode=padding_mode, dtype=dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(width, momentum=0.99, epsilon=bn_epsilon, dtype=dtype, rngs=rngs)
        self.act = Activation("silu")

    def __call__(self, x):
        return self.act(self.bn(self.conv(x)))


class EfficientNetFeatures(nnx.Module):
    """The convolutional part: [input_norm] -> stem -> blocks -> top conv.

    x: (N, H, W, C) -> (N, ceil(H/32), ceil(W/32), round_filters(1280))
    """

    def __init__(self, in_channels: int, configs: Sequence[BlockConfig], *, width_multiplier: float,
                 bn_epsilon: float, padding_mode: str, input_normalization, dtype, rngs: nnx.Rngs):
        self.input_norm = InputNormalization(*input_normalization) if input_normalization is not None else None
        self.stem = Stem(in_channels, round_filters(STEM_FILTERS, width_multiplier), bn_epsilon=bn_epsilon,
                         padding_mode=padding_mode, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([
            MBConv(c, bn_epsilon=bn_epsilon, padding_mode=padding_mode, dtype=dtype, rngs=rngs)
            for c in configs
        ])
        top_width = round_filters(TOP_FILTERS, width_multiplier)
        self.top_conv = nnx.Conv(configs[-1].out_filters, top_width, (1, 1), use_bias=False, dtype=dtype,
                                 kernel_init=conv_init, rngs=rngs)
        self.top_bn = nnx.BatchNorm(top_width, momentum=0.99, epsilon=bn_epsilon, dtype=dtype, rngs=rngs)
        self.top_act = Activation("silu")
        self.out_features = top_width

    def sequential_steps(self):
        """(name, step) in call order: ["input_norm"], "stem", "blocks.0", ..., "top_conv", "top_bn",
        "top_act" (read by `zoo.stages.backbone_steps`)."""
        steps = [] if self.input_norm is None else [("input_norm", self.input_norm)]
        steps += [("stem", self.stem), *((f"blocks.{i}", block) for i, block in enumerate(self.blocks))]
        return [*steps, ("top_conv", self.top_conv), ("top_bn", self.top_bn), ("top_act", self.top_act)]

    def __call__(self, x):
        for _, step in self.sequential_steps():
            x = step(x)
        return x


def efficientnet_stages(configs: Sequence[BlockConfig], stem_width: int, top_width: int) -> tuple[Stage, ...]:
    """The last block at each stride (2, 4, 8, 16), then the top conv's activation at 32."""
    taps, stride = [Stage("stem", 2, stem_width)], 2
    for i, c in enumerate(configs):
        stride *= c.stride
        taps.append(Stage(f"blocks.{i}", stride, c.out_filters))
    return last_at_each_stride([*taps, Stage("top_act", stride, top_width)])


def _check_normalization(value, channels: int):
    """(scale, mean, variance) as tuples of `channels` floats each; a clear ValueError otherwise."""
    hint = ("input_normalization must be None or (scale, mean, variance), each a number or one "
            f"number per channel ({channels}), e.g. (1/255, (0.485, 0.456, 0.406), (0.229**2, 0.224**2, "
            f"0.225**2))")
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{hint}; got {value!r}")
    parts = []
    for part in value:
        part = [part] * channels if isinstance(part, (int, float)) else list(part)
        if len(part) != channels or not all(isinstance(v, (int, float)) for v in part):
            raise ValueError(f"{hint}; got {value!r}")
        parts.append(tuple(float(v) for v in part))
    if any(v < 0 for v in parts[2]):
        raise ValueError(f"input_normalization variances must be >= 0, got {parts[2]}")
    return tuple(parts)


def build_efficientnet(
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    include_top: bool = True,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    name: str = "efficientnet",
    width_multiplier: float = 1.0,
    depth_multiplier: float = 1.0,
    dropout_rate: float = 0.2,
    drop_connect_rate: float = 0.2,
    bn_epsilon: float = 1e-3,
    downsample_padding: str = "correct_pad",
    input_normalization=None,
    **unknown_options,
) -> Classifier:
    """An EfficientNet scaled from B0 by `width_multiplier` and `depth_multiplier`.

    Args:
        num_classes: outputs of the Dense layer.
        input_shape: (H, W, C) the model is built for (any H, W >= 32 run).
        include_top: False returns the feature map (N, ceil(H/32), ceil(W/32), c).
        width_multiplier, depth_multiplier: compound-scaling coefficients (B0: 1, 1).
        dropout_rate: dropout before the Dense layer.
        drop_connect_rate: stochastic-depth rate reached at the last block (0 turns it off).
        bn_epsilon: BatchNorm epsilon (Keras: 1e-3).
        downsample_padding: "correct_pad" (from the actual size) or "assume_even" (see module doc).
        input_normalization: None, or (scale, mean, variance) applied to the input (see module doc).
    Returns:
        a `Classifier`: x (N, H, W, C) -> logits (N, num_classes).
    """
    if unknown_options:
        raise ValueError(
            f"unknown EfficientNet option(s) {sorted(unknown_options)}; known: width_multiplier, "
            "depth_multiplier, dropout_rate, drop_connect_rate, bn_epsilon, downsample_padding, "
            "input_normalization"
        )
    if width_multiplier <= 0 or depth_multiplier <= 0:
        raise ValueError(
            f"width_multiplier and depth_multiplier must be positive, got {width_multiplier}, {depth_multiplier}"
        )
    for label, rate in (("dropout_rate", dropout_rate), ("drop_connect_rate", drop_connect_rate)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{label} must be in [0, 1), got {rate}")
    if bn_epsilon <= 0:
        raise ValueError(f"bn_epsilon must be positive, got {bn_epsilon}")
    if downsample_padding not in DOWNSAMPLE_PADDINGS:
        raise ValueError(f"downsample_padding must be one of {DOWNSAMPLE_PADDINGS}, got {downsample_padding!r}")
    in_channels = input_shape[2]
    if input_normalization is not None:
        input_normalization = _check_normalization(input_normalization, in_channels)

    configs = block_configs(width_multiplier, depth_multiplier, drop_connect_rate)
    features = EfficientNetFeatures(
        in_channels, configs, width_multiplier=width_multiplier, bn_epsilon=bn_epsilon,
        padding_mode=downsample_padding, input_normalization=input_normalization, dtype=dtype, rngs=rngs,
    )
    head = None
    if include_top:
        layers: list[nnx.Module] = []
        if dropout_rate > 0:
            layers.append(nnx.Dropout(dropout_rate, rngs=rngs))
        layers.append(nnx.Linear(features.out_features, num_classes, kernel_init=dense_init, dtype=dtype,
                                 rngs=rngs))
        head = Head("avg", layers)
    stages = efficientnet_stages(configs, round_filters(STEM_FILTERS, width_multiplier),
                                 round_filters(TOP_FILTERS, width_multiplier))
    return Classifier(features, head, input_shape=input_shape, min_size=MIN_SIZE, name=name, stages=stages)


# Keras Applications' trainable-parameter counts at 1000 classes.
PUBLISHED_PARAMS = {
    "b0": 5_288_548, "b1": 7_794_184, "b2": 9_109_994, "b3": 12_233_232,
    "b4": 19_341_616, "b5": 30_389_784, "b6": 43_040_704, "b7": 66_347_960,
}

for _variant, _scaling in COMPOUND_SCALING.items():
    _size = _scaling.resolution
    register(ModelSpec(
        name=f"efficientnet_{_variant}",
        family="efficientnet",
        builder=build_efficientnet,
        options={
            "width_multiplier": _scaling.width_multiplier,
            "depth_multiplier": _scaling.depth_multiplier,
            "dropout_rate": _scaling.dropout_rate,
        },
        paper="Tan & Le, EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
        year=2019,
        url="https://arxiv.org/abs/1905.11946",
        introduced="compound scaling of width, depth and resolution together; "
                   "MBConv blocks with squeeze-and-excitation",
        input_shape=(_size, _size, 3),
        min_size=MIN_SIZE,
        head_kind="avg",
        total_stride=32,
        feature_shape=(-(-_size // 32), -(-_size // 32), round_filters(TOP_FILTERS, _scaling.width_multiplier)),
        num_params=PUBLISHED_PARAMS[_variant],
        num_classes=1000,
    ))
