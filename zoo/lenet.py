"""LeNet-5: the convolutional network that read cheques.

LeCun, Bottou, Bengio and Haffner, "Gradient-Based Learning Applied to Document
Recognition", Proc. IEEE 86(11), 1998.
http://yann.lecun.com/exdb/publis/pdf/lecun-98.pdf (no arXiv version exists).

    input 32x32x1
    C1 conv 5x5, 6     -> 28x28x6      S2 subsample 2x2 -> 14x14x6
    C3 conv 5x5, 16    -> 10x10x16     S4 subsample 2x2 -> 5x5x16     (= features)
    C5 5x5x16 -> 120   F6 120 -> 84    output 84 -> 10                (= head)

C5 is a 5x5 convolution in the paper; on a 32x32 input it sees the whole 5x5
map, so it is exactly the first Dense of a Flatten head. The converter turns it
back into that 5x5 convolution. The 61,706 parameters of the usual count
connect C3 to all six S2 maps (the paper's sparse table has 1,516 weights
instead of 2,416) and give the output layer a plain Dense instead of the
paper's Euclidean RBF units.

Paper-faithful defaults: tanh (the paper scales it, 1.7159 tanh(2a/3); the
scale is left out) and average-pooling subsampling (the paper's subsampling
also had a trainable coefficient and bias per map; ours has none). Modern
options: `activation="relu"`, `pooling="max"`. MNIST's 28x28 digits fit with
`input_padding=2`, which zero-pads inside the model to the paper's 32x32.
"""

from __future__ import annotations

from flax import nnx

from zoo.classifier import Classifier, dense_head, output_shape
from zoo.layers import Activation, AvgPool, MaxPool, NamedSequential, ZeroPad
from zoo.registry import ModelSpec, register
from zoo.stages import Stage


POOLINGS = {"avg": AvgPool, "max": MaxPool}

# (name, output maps) of the two convolution + subsampling stages.
LENET5_STAGES = (("1", 6), ("2", 16))


def build_lenet(
    *,
    num_classes: int,
    input_shape,
    include_top: bool,
    dtype,
    rngs: nnx.Rngs,
    name: str,
    activation: str = "tanh",
    pooling: str = "avg",
    input_padding: int = 0,
) -> Classifier:
    """LeNet-5 as a `Classifier`.

    Args:
        activation: "tanh" (paper) or any name of `zoo.layers.ACTIVATIONS`, e.g. "relu".
        pooling: "avg" (the paper's subsampling, no trainable coefficients) or "max".
        input_padding: zero pixels added on each side first; 2 takes 28x28 MNIST to 32x32.
    Returns:
        features: (N, H, W, C) -> (N, h, w, 16), (5, 5, 16) at 32x32;
        head: Flatten -> C5 (120) -> F6 (84) -> num_classes.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
    if not isinstance(input_padding, int) or input_padding < 0:
        raise ValueError(f"input_padding must be a non-negative int, got {input_padding!r}")
    Activation(activation)  # validates the name before anything is built
    height, width, channels = input_shape
    steps: list[tuple[str, nnx.Module]] = []
    if input_padding:
        steps.append(("pad", ZeroPad(input_padding)))
    maps, stride, stages = channels, 1, []
    for stage, out_maps in LENET5_STAGES:
        steps += [
            (f"conv{stage}", nnx.Conv(maps, out_maps, (5, 5), padding="VALID", dtype=dtype, rngs=rngs)),
            (f"act{stage}", Activation(activation)),
            (f"pool{stage}", POOLINGS[pooling](2)),
        ]
        # A stage ends before a subsampling (C1 at stride 1, C3 at 2), the last one after S4 (stride 4).
        stages.append(Stage(f"act{stage}", stride, out_maps))
        maps, stride = out_maps, stride * 2
    stages.append(Stage(f"pool{len(LENET5_STAGES)}", stride, maps))
    features = NamedSequential(steps)
    # Each 5x5 valid conv removes 4 pixels and each pool halves: 16 -> 12 -> 6 -> 2 -> 1.
    min_side = max(16 - 2 * input_padding, 1)
    min_size = (min_side, min_side)
    if height < min_side or width < min_side:
        raise ValueError(f"{name} needs an input of at least {min_side}x{min_side}; got {height}x{width}")
    head = None
    if include_top:
        _, h, w, c = output_shape(features, (1, height, width, channels))
        head = dense_head("flatten", h * w * c, num_classes, hidden=(120, 84),
                          activation=activation, dtype=dtype, rngs=rngs)
    return Classifier(features, head, input_shape=input_shape, min_size=min_size, name=name, stages=stages)


register(ModelSpec(
    name="lenet5",
    family="lenet",
    builder=build_lenet,
    options={"activation": "tanh", "pooling": "avg", "input_padding": 0},
    paper="LeCun et al., Gradient-Based Learning Applied to Document Recognition",
    year=1998,
    url="http://yann.lecun.com/exdb/publis/pdf/lecun-98.pdf",
    introduced="convolutions with shared weights and subsampling, trained end to end by backpropagation",
    input_shape=(32, 32, 1),
    min_size=(16, 16),
    head_kind="flatten",
    total_stride=4,
    feature_shape=(5, 5, 16),
    num_params=61_706,
    num_classes=10,
))
