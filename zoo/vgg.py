"""VGG: depth from stacks of 3x3 convolutions.

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015. https://arxiv.org/abs/1409.1556

Each variant is one list: an int is a 3x3 convolution (stride 1, padding 1)
with that many output maps followed by ReLU, "M" a 2x2 max pool of stride 2.
The table follows the paper's Table 1 (configurations A, B, D, E); the head is
Flatten 7x7x512 -> 4096 -> 4096 -> classes with dropout 0.5 after each hidden
layer. Layers are named by block and position, `features.conv3_2` being the
second convolution of the third block, as in the paper's released models.
"""

from __future__ import annotations

from flax import nnx

from zoo.classifier import Classifier, dense_head, output_shape
from zoo.layers import Activation, MaxPool, NamedSequential
from zoo.registry import ModelSpec, register
from zoo.stages import Stage, last_at_each_stride

VGG_LAYERS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}

# Published trainable parameters at 224x224x3 and 1000 classes.
VGG_PARAMS = {"vgg11": 132_863_336, "vgg13": 133_047_848, "vgg16": 138_357_544, "vgg19": 143_667_240}


def build_vgg(
    *,
    num_classes: int,
    input_shape,
    include_top: bool,
    dtype,
    rngs: nnx.Rngs,
    name: str,
    layers,
    dropout: float = 0.5,
) -> Classifier:
    """A VGG network as a `Classifier`.

    Args:
        layers: the variant's table, e.g. `VGG_LAYERS["vgg16"]`: ints are 3x3 conv widths, "M" a max pool.
        dropout: drop rate after each hidden Dense layer of the head.
    Returns:
        features: (N, H, W, C) -> (N, H / 2^pools, W / 2^pools, last width), (7, 7, 512) at 224x224;
        head: Flatten -> 4096 -> 4096 -> num_classes.
    """
    height, width, channels = input_shape
    steps: list[tuple[str, nnx.Module]] = []
    maps, block, position, taps = channels, 1, 0, []
    for entry in layers:
        if entry == "M":
            steps.append((f"pool{block}", MaxPool(2)))
            taps.append(Stage(f"pool{block}", 2**block, maps))  # pool1 .. pool5: strides 2 .. 32
            block, position = block + 1, 0
        elif isinstance(entry, int) and entry > 0:
            position += 1
            conv = nnx.Conv(maps, entry, (3, 3), padding="SAME", dtype=dtype, rngs=rngs)
            steps += [(f"conv{block}_{position}", conv), (f"relu{block}_{position}", Activation("relu"))]
            maps = entry
        else:
            raise ValueError(f"VGG layers are positive ints (conv widths) or 'M' (max pool), got {entry!r}")
    features = NamedSequential(steps)
    pools = sum(entry == "M" for entry in layers)
    stages = last_at_each_stride([*taps, Stage(steps[-1][0], 2**pools, maps)])
    min_side = 2**pools  # each 2x2 pool halves, rounding down; convolutions keep the size
    head = None
    if include_top:
        _, h, w, c = output_shape(features, (1, height, width, channels))
        head = dense_head("flatten", h * w * c, num_classes, hidden=(4096, 4096),
                          dropout=dropout, dtype=dtype, rngs=rngs)
    return Classifier(features, head, input_shape=input_shape, min_size=(min_side, min_side), name=name,
                      stages=stages)


for _variant, _layers in VGG_LAYERS.items():
    register(ModelSpec(
        name=_variant,
        family="vgg",
        builder=build_vgg,
        options={"layers": _layers},
        paper="Simonyan and Zisserman, Very Deep Convolutional Networks for Large-Scale Image Recognition",
        year=2014,
        url="https://arxiv.org/abs/1409.1556",
        introduced="depth (11 to 19 layers) built only from small 3x3 convolutions and 2x2 max pooling",
        input_shape=(224, 224, 3),
        min_size=(32, 32),
        head_kind="flatten",
        total_stride=32,
        feature_shape=(7, 7, 512),
        num_params=VGG_PARAMS[_variant],
        num_classes=1000,
    ))
