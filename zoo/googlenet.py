"""GoogLeNet (Inception v1): parallel 1x1, 3x3, 5x5 and pooling branches.

Szegedy et al., "Going Deeper with Convolutions", CVPR 2015.
https://arxiv.org/abs/1409.4842

Paper-faithful: convolutions with biases, no batch normalization, local
response normalization in the stem (after the first max pool, and after conv2
before the second max pool, as the paper's Figure 3 draws it), a real 5x5
convolution in the third branch, the Inception table (Table 1) as data, and the
head global average pool -> dropout 0.4 -> Dense (6,998,552 parameters).

Auxiliary classifiers (`aux_logits=True`, 13,378,280 parameters), after 4a and
4d: 5x5/3 average pool, 1x1 conv with 128 maps, Dense 1024, dropout 0.7,
Dense classes. They are heads for training only and keep the protocol:
`model(x)` always returns the main logits and never runs them. Read them with

    logits, (aux1, aux2) = googlenet.forward_with_aux(model, x)

which returns them as values (nothing is stored in the model). In eval mode
they do not run and the tuple is empty. The paper weights their losses by 0.3.

`se_reduction=r` puts a squeeze-and-excitation gate (Hu et al. 2017,
https://arxiv.org/abs/1709.01507) on the output of every Inception unit, the
SE-Inception of that paper: an option of the unit, not another network.

LRN constants are not in the paper; we take those of the authors' reference
Caffe model (size 5, alpha 1e-4, beta 0.75, k 1). Caffe divides alpha by the
size, so in the paper-style formula of `LocalResponseNorm` alpha is 2e-5.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from zoo.classifier import Classifier, Head, check_images, dense_head, output_shape
from zoo.layers import Activation, AvgPool, LocalResponseNorm, MaxPool, NamedSequential, SqueezeExcite
from zoo.registry import ModelSpec, register
from zoo.stages import Stage, last_at_each_stride

# The paper's Table 1, one row per Inception unit: (name, #1x1, #3x3 reduce, #3x3,
# #5x5 reduce, #5x5, pool proj). "pool" rows are the 3x3/2 max pools between stages.
INCEPTION_TABLE = (
    ("inception3a", 64, 96, 128, 16, 32, 32),
    ("inception3b", 128, 128, 192, 32, 96, 64),
    "pool3",
    ("inception4a", 192, 96, 208, 16, 48, 64),
    ("inception4b", 160, 112, 224, 24, 64, 64),
    ("inception4c", 128, 128, 256, 24, 64, 64),
    ("inception4d", 112, 144, 288, 32, 64, 64),
    ("inception4e", 256, 160, 320, 32, 128, 128),
    "pool4",
    ("inception5a", 256, 160, 320, 32, 128, 128),
    ("inception5b", 384, 192, 384, 48, 128, 128),
)

# Auxiliary classifiers: name -> the unit whose output they read.
AUX_AFTER = {"aux1": "inception4a", "aux2": "inception4d"}


def _lrn() -> LocalResponseNorm:
    return LocalResponseNorm(size=5, k=1.0, alpha=1e-4 / 5, beta=0.75)


class Inception(nnx.Module):
    """One Inception unit: four branches concatenated along channels.

    Args:
        in_channels: channels of x.
        ch1x1, ch3x3_reduce, ch3x3, ch5x5_reduce, ch5x5, pool_proj: a row of the paper's Table 1.
        se_reduction: if set, a squeeze-and-excitation gate with out_channels // se_reduction
            hidden units recalibrates the concatenated output.
    x: (N, H, W, in_channels) -> (N, H, W, ch1x1 + ch3x3 + ch5x5 + pool_proj)
    """

    def __init__(self, in_channels: int, ch1x1: int, ch3x3_reduce: int, ch3x3: int,
                 ch5x5_reduce: int, ch5x5: int, pool_proj: int, *, se_reduction: int | None = None,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        def conv(cin, cout, k):
            return nnx.Conv(cin, cout, (k, k), padding="SAME", dtype=dtype, rngs=rngs)

        self.branch1x1 = conv(in_channels, ch1x1, 1)
        self.branch3x3_reduce = conv(in_channels, ch3x3_reduce, 1)
        self.branch3x3 = conv(ch3x3_reduce, ch3x3, 3)
        self.branch5x5_reduce = conv(in_channels, ch5x5_reduce, 1)
        self.branch5x5 = conv(ch5x5_reduce, ch5x5, 5)
        self.pool = MaxPool(3, strides=1, padding="SAME")
        self.pool_proj = conv(in_channels, pool_proj, 1)
        self.relu = Activation("relu")
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj
        self.se = None if se_reduction is None else SqueezeExcite(
            self.out_channels, self.out_channels // se_reduction, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        relu = self.relu
        y = jnp.concatenate([
            relu(self.branch1x1(x)),
            relu(self.branch3x3(relu(self.branch3x3_reduce(x)))),
            relu(self.branch5x5(relu(self.branch5x5_reduce(x)))),
            relu(self.pool_proj(self.pool(x))),
        ], axis=-1)
        return y if self.se is None else self.se(y)


class AuxClassifier(nnx.Module):
    """A training-time classifier on an intermediate map.

    Args:
        in_channels: channels of the map it reads (512 after 4a, 528 after 4d).
        map_size: (h, w) of that map at the model's input size.
    x: (N, h, w, in_channels) -> (N, num_classes)
    """

    def __init__(self, in_channels: int, num_classes: int, map_size: tuple[int, int], *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.pool = AvgPool(5, strides=3)
        self.conv = nnx.Conv(in_channels, 128, (1, 1), dtype=dtype, rngs=rngs)
        self.relu = Activation("relu")
        pooled = [(side - 5) // 3 + 1 for side in map_size]
        self.head: Head = dense_head("flatten", pooled[0] * pooled[1] * 128, num_classes,
                                     hidden=(1024,), dropout=0.7, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.head(self.relu(self.conv(self.pool(x))))


class GoogLeNetFeatures(NamedSequential):
    """The backbone (stem and Inception units) with optional auxiliary classifiers.

    `deterministic` is set by `model.train()` / `model.eval()` like Dropout's: the
    auxiliary classifiers run only in train mode, and only through `forward_with_aux`.

    Args:
        steps: (name, module) pairs of the backbone.
        aux: name -> AuxClassifier, each run on the output of the step `AUX_AFTER[name]`.
    x: (N, H, W, C) -> (N, h, w, 1024)
    """

    def __init__(self, steps: Sequence[tuple[str, nnx.Module]], aux: dict[str, AuxClassifier]):
        super().__init__(steps)
        for aux_name, classifier in aux.items():
            setattr(self, aux_name, classifier)
        self.aux_taps = tuple((AUX_AFTER[aux_name], aux_name) for aux_name in aux)
        self.deterministic = False

    def __call__(self, x):
        return self.with_aux(x, run_aux=False)[0]

    def with_aux(self, x, *, run_aux: bool = True):
        """x: (N, H, W, C) -> ((N, h, w, 1024), auxiliary logits: a tuple of (N, classes), in tap order)."""
        run_aux = run_aux and not self.deterministic
        aux_logits = []
        for name in self.step_names:
            x = getattr(self, name)(x)
            if run_aux:
                aux_logits += [getattr(self, aux_name)(x) for tap, aux_name in self.aux_taps if tap == name]
        return x, tuple(aux_logits)


def forward_with_aux(model: Classifier, x):
    """Main logits plus the auxiliary ones.

    x: (N, H, W, C) -> (logits (N, classes), (aux1 (N, classes), aux2 (N, classes)));
    the tuple is empty in eval mode or without `aux_logits=True`. Works inside
    `nnx.grad` / `nnx.jit`, so a training loss can add 0.3 * each auxiliary loss.
    """
    if not isinstance(getattr(model, "features", None), GoogLeNetFeatures):
        raise TypeError(f"forward_with_aux takes a zoo GoogLeNet, got {type(model).__name__}; "
                        "other models have no auxiliary classifiers: call model(x)")
    check_images(x, channels=model.input_shape[-1], min_size=model.min_size, name=model.name)
    features, aux_logits = model.features.with_aux(x)
    return model.head(features), aux_logits


def build_googlenet(
    *,
    num_classes: int,
    input_shape,
    include_top: bool,
    dtype,
    rngs: nnx.Rngs,
    name: str,
    aux_logits: bool = False,
    se_reduction: int | None = None,
    dropout: float = 0.4,
    table=INCEPTION_TABLE,
) -> Classifier:
    """GoogLeNet as a `Classifier`.

    Args:
        aux_logits: add the two auxiliary classifiers (train mode only; see the module docstring).
        se_reduction: squeeze-and-excitation on every Inception unit with this reduction (e.g. 16).
        dropout: drop rate before the final Dense.
        table: the Inception units and pools, as `INCEPTION_TABLE`.
    Returns:
        features: (N, H, W, C) -> (N, H/32, W/32, 1024) (rounded up), (7, 7, 1024) at 224x224;
        head: global average pool -> dropout -> num_classes.
    """
    if se_reduction is not None and (not isinstance(se_reduction, int) or se_reduction < 1):
        raise ValueError(f"se_reduction must be a positive int or None, got {se_reduction!r}")
    if aux_logits and not include_top:
        raise ValueError("aux_logits=True adds classifier heads; it needs include_top=True")
    height, width, channels = input_shape

    def conv(cin, cout, k, stride=1, padding="SAME"):
        return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, dtype=dtype, rngs=rngs)

    steps: list[tuple[str, nnx.Module]] = [
        # Padding 3 on both sides as in the reference model (SAME would pad 2 before, 3 after).
        ("conv1", conv(channels, 64, 7, stride=2, padding=((3, 3), (3, 3)))),
        ("relu1", Activation("relu")),
        ("pool1", MaxPool(3, strides=2, padding="SAME")),
        ("lrn1", _lrn()),
        ("conv2_reduce", conv(64, 64, 1)),
        ("relu2_reduce", Activation("relu")),
        ("conv2", conv(64, 192, 3)),
        ("relu2", Activation("relu")),
        ("lrn2", _lrn()),
        ("pool2", MaxPool(3, strides=2, padding="SAME")),
    ]
    maps, stride = 192, 8
    # The stride-2 activation, then the map after each pool; the last step supersedes the
    # last pool at its stride (inception5b, not pool4, at 32).
    taps = [Stage("relu1", 2, 64), Stage("pool1", 4, 64), Stage("pool2", 8, 192)]
    aux: dict[str, AuxClassifier] = {}
    for row in table:
        if isinstance(row, str):
            steps.append((row, MaxPool(3, strides=2, padding="SAME")))
            stride *= 2
            taps.append(Stage(row, stride, maps))
            continue
        unit_name, *widths = row
        unit = Inception(maps, *widths, se_reduction=se_reduction, dtype=dtype, rngs=rngs)
        steps.append((unit_name, unit))
        maps = unit.out_channels
        for aux_name, tap in AUX_AFTER.items():
            if aux_logits and tap == unit_name:
                _, h, w, c = output_shape(NamedSequential(steps), (1, height, width, channels))
                if h < 5 or w < 5:
                    raise ValueError(
                        f"aux_logits=True needs a map of at least 5x5 after {tap} (its 5x5 pool); "
                        f"a {height}x{width} input gives {h}x{w}. Use an input of at least 65x65."
                    )
                aux[aux_name] = AuxClassifier(c, num_classes, (h, w), dtype=dtype, rngs=rngs)
    features = GoogLeNetFeatures(steps, aux)
    stages = last_at_each_stride([*taps, Stage(steps[-1][0], stride, maps)])
    head = None
    if include_top:
        head = dense_head("avg", maps, num_classes, dropout=dropout, dropout_first=True,
                          dtype=dtype, rngs=rngs)
    # Every convolution and pool is SAME-padded (ceil division), so any size leaves >= 1x1.
    return Classifier(features, head, input_shape=input_shape, min_size=(1, 1), name=name, stages=stages)


register(ModelSpec(
    name="googlenet",
    family="googlenet",
    builder=build_googlenet,
    options={"aux_logits": False, "se_reduction": None},
    paper="Szegedy et al., Going Deeper with Convolutions",
    year=2014,
    url="https://arxiv.org/abs/1409.4842",
    introduced="the Inception unit: parallel 1x1/3x3/5x5/pool branches with 1x1 reductions, 22 layers deep",
    input_shape=(224, 224, 3),
    min_size=(1, 1),
    head_kind="avg",
    total_stride=32,
    feature_shape=(7, 7, 1024),
    num_params=6_998_552,
    num_classes=1000,
))
