"""MnistNet: our own small VGG-style CNN for 28x28 digits (chapter 14, exercise 9).

The design follows what careful single-model MNIST results share (a stack of 3x3
convolutions with BatchNorm, two 2x2 max-pools, dropout before the classifier):
    Simonyan & Zisserman 2014, "Very Deep Convolutional Networks for Large-Scale
    Image Recognition", https://arxiv.org/abs/1409.1556 (3x3 stacks);
    Ioffe & Szegedy 2015, "Batch Normalization", https://arxiv.org/abs/1502.03167.

    features: [conv3x3-BN-ReLU] x convs_per_stage[0] at widths[0], maxpool 2,
              [conv3x3-BN-ReLU] x convs_per_stage[1] at widths[1], maxpool 2,
              [conv3x3-BN-ReLU] x convs_per_stage[2] at widths[2]
              (N, 28, 28, 1) -> (N, 7, 7, widths[-1]); total stride 4
    head:     flatten -> dropout -> Dense(num_classes)

Total stride 4 keeps the feature map fine (one cell per 4x4 pixels), so the FCN
that `convert` makes of it (the flatten head becomes a 7x7 convolution, i.e. the
classifier slid over the image in steps of 4 pixels) gives dense maps fine
enough to segment digits. Shipped weights expect x = (uint8 / 255 - mean) / std
with their training set's mean and std, recorded with each file (see `zoo.pretrained`).
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx

from zoo.classifier import Classifier, dense_head
from zoo.layers import Activation, MaxPool
from zoo.registry import ModelSpec, register
from zoo.stages import Stage


class ConvBNReLU(nnx.Module):
    """3x3 convolution (no bias: BatchNorm's shift replaces it), BatchNorm, ReLU.

    x: (N, H, W, in_channels) -> (N, H, W, out_channels)
    """

    def __init__(self, in_channels: int, out_channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_channels, out_channels, kernel_size=(3, 3), padding="SAME",
                             use_bias=False, dtype=dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(out_channels, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.act = Activation("relu")

    def __call__(self, x):
        return self.act(self.bn(self.conv(x)))


class MnistFeatures(nnx.Module):
    """Three stages of 3x3 conv-BN-ReLU, with a 2x2 max-pool between stages.

    x: (N, H, W, C) -> (N, H // 4, W // 4, widths[-1])
    """

    def __init__(self, in_channels: int, widths: Sequence[int], convs_per_stage: Sequence[int], *,
                 dtype, rngs: nnx.Rngs):
        layers: list[nnx.Module] = []
        channels = in_channels
        for stage, (width, depth) in enumerate(zip(widths, convs_per_stage)):
            if stage > 0:
                layers.append(MaxPool(2))
            for _ in range(depth):
                layers.append(ConvBNReLU(channels, width, dtype=dtype, rngs=rngs))
                channels = width
        self.layers = nnx.List(layers)
        self.out_channels = channels

    def sequential_steps(self):
        """(name, layer) in call order (read by `zoo.stages.backbone_steps`)."""
        return [(f"layers.{i}", layer) for i, layer in enumerate(self.layers)]

    def __call__(self, x):
        for _, layer in self.sequential_steps():
            x = layer(x)
        return x


def mnist_stages(widths: Sequence[int], convs_per_stage: Sequence[int]) -> tuple[Stage, ...]:
    """The end of each stage, before its pool: `layers.{i}` at strides 1, 2, 4 (MnistFeatures' order)."""
    taps, index = [], -1
    for stage, (width, depth) in enumerate(zip(widths, convs_per_stage)):
        index += depth + (stage > 0)  # the pool opening each later stage, then its convs
        taps.append(Stage(f"layers.{index}", 2**stage, width))
    return tuple(taps)


def build_mnistnet(
    *,
    num_classes: int,
    input_shape,
    include_top: bool,
    dtype,
    rngs: nnx.Rngs,
    name: str,
    widths: Sequence[int] = (16, 32, 64),
    convs_per_stage: Sequence[int] = (1, 2, 1),
    dropout: float = 0.4,
    test_only: bool = False,
) -> Classifier:
    """Build an MnistNet (see the module docstring); `widths`/`convs_per_stage` give one entry per stage."""
    if len(widths) != 3 or len(convs_per_stage) != 3:
        raise ValueError(f"MnistNet has 3 stages: pass 3 widths and 3 convs_per_stage, got {widths}, {convs_per_stage}")
    if min(widths) < 1 or min(convs_per_stage) < 1:
        raise ValueError(f"widths and convs_per_stage must be positive, got {widths}, {convs_per_stage}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    h, w, c = input_shape
    features = MnistFeatures(c, widths, convs_per_stage, dtype=dtype, rngs=rngs)
    head = None
    if include_top:
        flat = (h // 4) * (w // 4) * features.out_channels
        head = dense_head("flatten", flat, num_classes, dropout=dropout, dropout_first=True,
                          dtype=dtype, rngs=rngs)
    return Classifier(features, head, input_shape=input_shape, min_size=(4, 4), name=name,
                      stages=mnist_stages(widths, convs_per_stage))


_PAPER = dict(
    family="mnistnet",
    builder=build_mnistnet,
    paper="Simonyan & Zisserman, Very Deep Convolutional Networks for Large-Scale Image Recognition "
          "(the 3x3 stacks; MnistNet itself is fcnzoo's own design)",
    year=2014,
    url="https://arxiv.org/abs/1409.1556",
    input_shape=(28, 28, 1),
    min_size=(4, 4),
    head_kind="flatten",
    total_stride=4,
    num_classes=10,
)

register(ModelSpec(
    name="mnistnet",
    options={"widths": (16, 32, 64), "convs_per_stage": (1, 2, 1), "dropout": 0.4},
    introduced="exercise 9: a small from-scratch MNIST CNN, 3x3 conv-BN stacks, total stride 4 for dense FCN maps",
    feature_shape=(7, 7, 64),
    num_params=64_058,  # our own design: counted by hand, 32,688 conv/BN + 31,370 head
    **_PAPER,
))

# Twice the width at every stage (2.4x the time per training step on this project's CPU): the capacity the
# best MNIST results need. The small one stays the segmentation backbone (its FCN is 4x cheaper).
register(ModelSpec(
    name="mnistnet_wide",
    options={"widths": (32, 64, 128), "convs_per_stage": (1, 2, 1), "dropout": 0.25},
    introduced="exercise 9's best CNN: MnistNet at twice the width",
    feature_shape=(7, 7, 128),
    num_params=192_618,  # counted by hand: 129,312 conv + 576 BN + 62,730 head
    **_PAPER,
))

# Four times the width: Fashion-MNIST's textures need the capacity (the small one fits its augmented
# training data to only 93.5% after 15 epochs). 2.6x mnistnet_wide's time per training step here.
register(ModelSpec(
    name="mnistnet_large",
    options={"widths": (64, 128, 256), "convs_per_stage": (1, 2, 1), "dropout": 0.25},
    introduced="a zoo model for Fashion-MNIST: MnistNet at four times the width",
    feature_shape=(7, 7, 256),
    num_params=643_274,  # counted by hand: 516,672 conv + 1,152 BN + 125,450 head
    **_PAPER,
))
