"""AlexNet: the network that won ImageNet 2012 on two GPUs.

Krizhevsky, Sutskever and Hinton, "ImageNet Classification with Deep
Convolutional Neural Networks", NeurIPS 2012.
https://papers.nips.cc/paper/2012/hash/c399862d3b9d6b76c8436e924a68c45b-Abstract.html
(no arXiv version exists).

    227x227x3
    conv1 11x11/4, 96   -> relu -> LRN -> max 3/2    55 -> 27
    conv2 5x5, 256      -> relu -> LRN -> max 3/2    27 -> 13   (two groups)
    conv3 3x3, 384      -> relu                      13         (sees both towers)
    conv4 3x3, 384      -> relu                      13         (two groups)
    conv5 3x3, 256      -> relu -> max 3/2           13 -> 6    (two groups)
    head: Flatten 6x6x256 -> 4096 -> 4096 -> 1000, dropout 0.5 after each hidden layer

The paper split the network over two GPUs: conv2, conv4 and conv5 only see the
maps of their own GPU, which is a convolution with `feature_group_count=2`
(60,965,224 parameters). `groups=1` gives the single-tower network
(62,378,344). The paper states 224x224 inputs, but 11x11/4 without padding only
gives its 55x55 maps on 227x227, which is the default here. Pooling windows of
3 with stride 2 overlap, one of the paper's points (sec. 3.4).
"""

from __future__ import annotations

from flax import nnx

from zoo.classifier import Classifier, dense_head, output_shape
from zoo.layers import Activation, LocalResponseNorm, MaxPool, NamedSequential
from zoo.registry import ModelSpec, register
from zoo.stages import Stage, last_at_each_stride

# The convolution table: (name, output maps, kernel, stride, padding, grouped like the
# paper's two towers, followed by LRN, followed by max pooling).
ALEXNET_CONVS = (
    ("1", 96, 11, 4, "VALID", False, True, True),
    ("2", 256, 5, 1, "SAME", True, True, True),
    ("3", 384, 3, 1, "SAME", False, False, False),
    ("4", 384, 3, 1, "SAME", True, False, False),
    ("5", 256, 3, 1, "SAME", True, False, True),
)


def build_alexnet(
    *,
    num_classes: int,
    input_shape,
    include_top: bool,
    dtype,
    rngs: nnx.Rngs,
    name: str,
    groups: int = 2,
    dropout: float = 0.5,
) -> Classifier:
    """AlexNet as a `Classifier`.

    Args:
        groups: 2 for the paper's two towers (conv2, conv4, conv5 grouped), 1 for one tower.
        dropout: drop rate after each hidden Dense layer of the head.
    Returns:
        features: (N, H, W, C) -> (N, h, w, 256), (6, 6, 256) at 227x227;
        head: Flatten -> 4096 -> 4096 -> num_classes.
    """
    if groups not in (1, 2):
        raise ValueError(f"groups must be 2 (the paper's two GPUs) or 1 (one tower), got {groups!r}")
    height, width, channels = input_shape
    steps: list[tuple[str, nnx.Module]] = []
    maps, total_stride, taps = channels, 1, []
    for stage, out_maps, kernel, stride, padding, grouped, lrn, pool in ALEXNET_CONVS:
        conv = nnx.Conv(maps, out_maps, (kernel, kernel), strides=stride, padding=padding,
                        feature_group_count=groups if grouped else 1, dtype=dtype, rngs=rngs)
        steps += [(f"conv{stage}", conv), (f"relu{stage}", Activation("relu"))]
        if lrn:
            steps.append((f"lrn{stage}", LocalResponseNorm(size=5, k=2.0, alpha=1e-4, beta=0.75)))
        total_stride *= stride
        if pool:
            steps.append((f"pool{stage}", MaxPool(3, strides=2)))
            total_stride *= 2
            taps.append(Stage(f"pool{stage}", total_stride, out_maps))  # after each pool: 8, 16, 32
        maps = out_maps
    features = NamedSequential(steps)
    stages = last_at_each_stride([*taps, Stage(steps[-1][0], total_stride, maps)])
    head = None
    if include_top:
        _, h, w, c = output_shape(features, (1, height, width, channels))
        head = dense_head("flatten", h * w * c, num_classes, hidden=(4096, 4096),
                          dropout=dropout, dtype=dtype, rngs=rngs)
    # Smallest input leaving a 1x1 map: pool5 needs 3, conv2 7, pool1 15, conv1 (15-1)*4+11.
    return Classifier(features, head, input_shape=input_shape, min_size=(67, 67), name=name, stages=stages)


register(ModelSpec(
    name="alexnet",
    family="alexnet",
    builder=build_alexnet,
    options={"groups": 2},
    paper="Krizhevsky et al., ImageNet Classification with Deep Convolutional Neural Networks",
    year=2012,
    url="https://papers.nips.cc/paper/2012/hash/c399862d3b9d6b76c8436e924a68c45b-Abstract.html",
    introduced="a deep CNN trained on GPUs with ReLU, dropout, overlapping pooling and data augmentation",
    input_shape=(227, 227, 3),
    min_size=(67, 67),
    head_kind="flatten",
    total_stride=32,
    feature_shape=(6, 6, 256),
    num_params=60_965_224,
    num_classes=1000,
))
