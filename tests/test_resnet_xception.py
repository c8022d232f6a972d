"""ResNet, SE-ResNet and Xception against independent numpy computations.

The numpy reference below re-implements convolution (explicit or TensorFlow-style
SAME padding), BatchNorm inference, max pooling and squeeze-and-excitation from
their definitions, and wires the networks by hand from the documented parameter
names. Parameter-count deltas are computed from the architecture tables in the
papers, not from our modules. Big models are built abstractly (nnx.eval_shape).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo.resnet import ResidualBlock

# ---------------------------------------------------------------- numpy reference


def same_pads(size, kernel, stride):
    """TensorFlow's SAME: output ceil(size / stride), the odd pixel of padding at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def np_conv(x, w, stride=1, pad=0, bias=None, depthwise=False):
    """x: (N, H, W, Cin); w: (kh, kw, Cin, Cout) or, depthwise, (kh, kw, 1, C).
    pad: int (symmetric) or "SAME"."""
    kh, kw = w.shape[:2]
    if pad == "SAME":
        (pt, pb), (pl, pr) = same_pads(x.shape[1], kh, stride), same_pads(x.shape[2], kw, stride)
    else:
        pt = pb = pl = pr = pad
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            out += patch * w[i, j, 0] if depthwise else patch @ w[i, j]
    return out if bias is None else out + bias


def np_bn(x, bn):
    """Inference BatchNorm from the module's stored statistics and its epsilon."""
    p = {k: np.asarray(getattr(bn, k)[...], np.float64) for k in ("mean", "var", "scale", "bias")}
    return (x - p["mean"]) / np.sqrt(p["var"] + bn.epsilon) * p["scale"] + p["bias"]


def np_max_pool(x, k, stride, pads):
    """pads: ((top, bottom), (left, right)), filled with -inf."""
    xp = np.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-np.inf)
    ho = (xp.shape[1] - k) // stride + 1
    wo = (xp.shape[2] - k) // stride + 1
    out = np.full((x.shape[0], ho, wo, x.shape[3]), -np.inf)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride])
    return out


def relu(x):
    return np.maximum(x, 0)


def np_se(x, se):
    """Hu et al. eq. 2-4: gate = sigmoid(W2 relu(W1 mean(x) + b1) + b2); x * gate."""
    w1, b1 = np.asarray(se.reduce.kernel[...], np.float64), np.asarray(se.reduce.bias[...], np.float64)
    w2, b2 = np.asarray(se.expand.kernel[...], np.float64), np.asarray(se.expand.bias[...], np.float64)
    z = x.mean(axis=(1, 2))
    gate = 1 / (1 + np.exp(-(relu(z @ w1 + b1) @ w2 + b2)))
    return x * gate[:, None, None, :]


def w_of(conv):
    return np.asarray(conv.kernel[...], np.float64)


def b_of(conv):
    return None if conv.bias is None else np.asarray(conv.bias[...], np.float64)


def np_resnet_block(x, block, *, kind, stride, stride_in="3x3"):
    """One ResNet unit wired by hand (He et al. fig. 5; SE as in Hu et al. fig. 3)."""
    if kind == "basic":
        y = relu(np_bn(np_conv(x, w_of(block.conv1), stride, 1, b_of(block.conv1)), block.bn1))
        y = np_bn(np_conv(y, w_of(block.conv2), 1, 1, b_of(block.conv2)), block.bn2)
    else:
        s1, s3 = (stride, 1) if stride_in == "1x1" else (1, stride)
        y = relu(np_bn(np_conv(x, w_of(block.conv1), s1, 0, b_of(block.conv1)), block.bn1))
        y = relu(np_bn(np_conv(y, w_of(block.conv2), s3, 1, b_of(block.conv2)), block.bn2))
        y = np_bn(np_conv(y, w_of(block.conv3), 1, 0, b_of(block.conv3)), block.bn3)
    if block.se is not None:
        y = np_se(y, block.se)
    if block.downsample is not None:
        d = block.downsample
        x = np_bn(np_conv(x, w_of(d.conv), stride, 0, b_of(d.conv)), d.bn)
    return relu(y + x)


def fill_random(model, seed=0):
    """Set every variable from numpy: He-scaled kernels, small biases, non-trivial BatchNorm.

    Models are built abstractly (nnx.eval_shape) and filled here, which skips the compile
    of every initializer and makes the weights independent of our init code.
    """
    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_modules(model):
        for attr, var in sorted(vars(module).items()):
            if not isinstance(var, nnx.Variable):
                continue
            shape = var.shape
            if attr == "kernel":
                value = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
            elif attr == "var" or attr == "scale":
                value = rng.uniform(0.5, 1.5, shape)
            else:  # bias, mean
                value = rng.normal(0, 0.1, shape)
            var.set_value(jnp.asarray(value, jnp.float32))
    return model


def run(model, x):
    """model(x), compiled as one program (cheaper than op-by-op on a CPU)."""
    return nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))


def abstract(name, **options):
    return nnx.eval_shape(lambda: zoo.create_model(name, **options))


def make_block(kind, in_ch, width, stride, **options):
    defaults = {"se_reduction": None, "stride_in": "3x3", "conv_bias": False, "bn_epsilon": 1e-5,
                    "bn_momentum": 0.9, "dtype": jnp.float32}
    block = nnx.eval_shape(lambda: ResidualBlock(kind, in_ch, width, stride, **{**defaults, **options},
                                                 rngs=nnx.Rngs(0)))
    fill_random(block)
    block.eval()
    return block


def assert_close(got, want, tol=1e-4):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


X7 = np.random.default_rng(1).normal(size=(2, 7, 7, 16)).astype(np.float32)  # odd size: ceil(7/2) = 4

# ---------------------------------------------------------------- blocks vs numpy


@pytest.mark.parametrize("kind,stride,options", [
    ("basic", 1, {}),
    ("basic", 2, {}),
    ("bottleneck", 2, {}),
    ("bottleneck", 2, {"stride_in": "1x1"}),
    ("bottleneck", 1, {"se_reduction": 4}),
    ("basic", 2, {"se_reduction": 8, "conv_bias": True}),
    ("bottleneck", 2, {"stride_in": "1x1", "conv_bias": True, "bn_epsilon": 0.5}),
])
def test_residual_block_matches_numpy(kind, stride, options):
    width = 16 if kind == "basic" else 8
    block = make_block(kind, 16, width, stride, **options)
    want = np_resnet_block(X7.astype(np.float64), block, kind=kind, stride=stride,
                           stride_in=options.get("stride_in", "3x3"))
    assert want.shape == (2, 4 if stride == 2 else 7, 4 if stride == 2 else 7, width * (4 if kind == "bottleneck" else 1))
    assert_close(run(block, X7), want)


def test_stride_in_and_bn_epsilon_change_the_result():
    """The options are not ignored: the numpy block with the other setting disagrees."""
    block = make_block("bottleneck", 16, 8, 2, stride_in="1x1")
    other = np_resnet_block(X7.astype(np.float64), block, kind="bottleneck", stride=2, stride_in="3x3")
    assert np.abs(np.asarray(run(block, X7)) - other).max() > 1e-2
    assert block.conv1.strides == 2 and block.conv2.strides == 1
    big_eps = make_block("basic", 16, 16, 1, bn_epsilon=0.5)
    assert all(m.epsilon == 0.5 for _, m in nnx.iter_modules(big_eps) if isinstance(m, nnx.BatchNorm))
    small_eps = make_block("basic", 16, 16, 1)
    assert np.abs(np.asarray(run(big_eps, X7)) - np.asarray(run(small_eps, X7))).max() > 1e-2


def test_squeeze_excite_option_matches_numpy_gate():
    block = make_block("bottleneck", 16, 8, 1, se_reduction=4)
    assert block.se.reduce.kernel.shape == (32, 8) and block.se.expand.kernel.shape == (8, 32)
    y = np.random.default_rng(2).normal(size=(2, 5, 5, 32))
    assert_close(run(block.se, y.astype(np.float32)), np_se(y, block.se))


# ---------------------------------------------------------------- whole networks vs numpy


def np_resnet(x, model, *, kind, stage_depths, stride_in="3x3"):
    f = model.features
    y = relu(np_bn(np_conv(x, w_of(f.stem.conv), 2, 3, b_of(f.stem.conv)), f.stem.bn))
    y = np_max_pool(y, 3, 2, ((1, 1), (1, 1)))
    for s, depth in enumerate(stage_depths):
        stage = getattr(f, f"stage{s + 1}")
        assert len(stage) == depth
        for b, block in enumerate(stage):
            y = np_resnet_block(y, block, kind=kind, stride=2 if s > 0 and b == 0 else 1, stride_in=stride_in)
    dense = model.head.layers[0]
    return y.mean(axis=(1, 2)) @ np.asarray(dense.kernel[...], np.float64) + np.asarray(dense.bias[...])


def test_resnet18_forward_matches_numpy_on_64x64():
    model = fill_random(abstract("resnet18", num_classes=5, input_size=64))
    model.eval()
    x = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype(np.float32)
    assert zoo.output_shape(model.features, x.shape) == (2, 2, 2, 512)
    want = np_resnet(x.astype(np.float64), model, kind="basic", stage_depths=(2, 2, 2, 2))
    assert_close(run(model, x), want, tol=1e-3)


def test_keras_style_bottleneck_resnet_matches_numpy():
    # Keras ResNet50's settings on a narrow, shallow bottleneck ResNet, odd input size.
    options = {"block": "bottleneck", "stage_depths": (1, 2, 1, 1), "stage_widths": (4, 8, 8, 16), "stem_width": 8,
                   "stride_in": "1x1", "conv_bias": True, "bn_epsilon": 1.001e-5, "se_reduction": 8}
    model = fill_random(abstract("resnet50", num_classes=3, input_size=37, **options), seed=1)
    model.eval()
    x = np.random.default_rng(4).normal(size=(2, 37, 37, 3)).astype(np.float32)
    want = np_resnet(x.astype(np.float64), model, kind="bottleneck", stage_depths=(1, 2, 1, 1), stride_in="1x1")
    assert_close(run(model, x), want, tol=1e-3)


SMALL_XCEPTION = {"stem_widths": (4, 8), "entry_widths": (8, 12, 16), "middle_width": 16, "middle_depth": 1,
                      "exit_widths": (16, 24), "final_widths": (24, 32)}


def np_sep_unit(x, unit):
    if unit.relu_first:
        x = relu(x)
    y = np_conv(x, w_of(unit.depthwise), 1, "SAME", depthwise=True)
    return np_bn(np_conv(y, w_of(unit.pointwise), 1, "SAME"), unit.bn)


def np_xception(x, model):
    """Chollet 2017 fig. 5 wired by hand: VALID stem, SAME everywhere after."""
    f = model.features
    y = relu(np_bn(np_conv(x, w_of(f.stem.conv1), 2, 0), f.stem.bn1))
    y = relu(np_bn(np_conv(y, w_of(f.stem.conv2), 1, 0), f.stem.bn2))
    for block in (*f.entry_flow, *f.middle_flow, *f.exit_flow):
        z = y
        for unit in block.units:
            z = np_sep_unit(z, unit)
        if block.shortcut is None:
            y = z + y
        else:
            pads = (same_pads(z.shape[1], 3, 2), same_pads(z.shape[2], 3, 2))
            y = np_max_pool(z, 3, 2, pads) + np_bn(np_conv(y, w_of(block.shortcut.conv), 2, "SAME"),
                                                   block.shortcut.bn)
    for unit in f.final.units:
        y = relu(np_sep_unit(y, unit))
    dense = model.head.layers[0]
    return y.mean(axis=(1, 2)) @ np.asarray(dense.kernel[...], np.float64) + np.asarray(dense.bias[...])


def test_small_xception_matches_numpy():
    # Same layout as Xception, narrow and with one middle block; 33x33 gives odd sizes
    # (stem 16 -> 14, then the SAME pools 7 -> 4 -> 2 -> 1).
    model = fill_random(abstract("xception", num_classes=3, input_size=33, **SMALL_XCEPTION), seed=2)
    model.eval()
    x = np.random.default_rng(5).normal(size=(2, 33, 33, 3)).astype(np.float32)
    assert zoo.output_shape(model.features, x.shape) == (2, 1, 1, 32)
    assert_close(run(model, x), np_xception(x.astype(np.float64), model), tol=1e-3)


# ---------------------------------------------------------------- parameter counts from the tables


# Output channels per stage and blocks per stage (He et al. table 1).
BOTTLENECK_OUT = (256, 512, 1024, 2048)
BASIC_OUT = (64, 128, 256, 512)


@pytest.mark.parametrize("name,depths,outs", [
    ("resnet50", (3, 4, 6, 3), BOTTLENECK_OUT),
    ("resnet18", (2, 2, 2, 2), BASIC_OUT),
])
def test_se_option_adds_the_squeeze_excite_parameters(name, depths, outs):
    # Per block: Dense c -> c/16 and c/16 -> c, with biases.
    expected = sum(d * (2 * c * c // 16 + c // 16 + c) for d, c in zip(depths, outs))
    added = zoo.count_params(abstract(name, se_reduction=16)) - zoo.count_params(abstract(name))
    assert added == expected


def test_seresnet_is_resnet_with_the_se_option():
    for depth in (50, 101, 152):
        se = zoo.get_spec(f"seresnet{depth}").options
        plain = zoo.get_spec(f"resnet{depth}").options
        assert se == {**plain, "se_reduction": 16}


@pytest.mark.parametrize("name,depths", [("resnet50", (3, 4, 6, 3)), ("resnet34", (3, 4, 6, 3))])
def test_conv_bias_adds_one_bias_per_conv_output_channel(name, depths):
    widths = (64, 128, 256, 512)
    if name == "resnet50":
        per_block = [w + w + 4 * w for w in widths]  # conv1, conv2, conv3
        shortcut = [4 * w for w in widths]           # every stage's first block projects
    else:
        per_block = [2 * w for w in widths]
        shortcut = [0, *widths[1:]]                  # stage 1 keeps 64 channels at stride 1
    expected = 64 + sum(d * p + s for d, p, s in zip(depths, per_block, shortcut))
    added = zoo.count_params(abstract(name, conv_bias=True)) - zoo.count_params(abstract(name))
    assert added == expected


def test_stride_in_moves_the_stride_but_keeps_the_count():
    model = abstract("resnet50", stride_in="1x1")
    for stage in (model.features.stage2, model.features.stage3, model.features.stage4):
        assert (stage[0].conv1.strides, stage[0].conv2.strides, stage[0].downsample.conv.strides) == (2, 1, 2)
        assert all(block.conv1.strides == block.conv2.strides == 1 for block in stage[1:])
    assert zoo.count_params(model) == 25_557_032  # He et al.'s ResNet-50 strides in the 1x1


def test_xception_layout_and_no_conv_biases():
    model = abstract("xception")
    f = model.features
    assert (len(f.entry_flow), len(f.middle_flow), len(f.exit_flow), len(f.final.units)) == (3, 8, 1, 2)
    convs = [m for _, m in nnx.iter_modules(f) if isinstance(m, nnx.Conv)]
    assert convs and all(c.bias is None for c in convs)
    # 2 stem convs + 2 separable convs (depthwise + pointwise) per entry block, 3 per middle
    # block, 2 in the exit block, 2 final, + 4 shortcut convs (Chollet fig. 5).
    assert len(convs) == 2 + 2 * (3 * 2 + 8 * 3 + 2 + 2) + 4
    depthwise = [c for c in convs if c.feature_group_count > 1]
    assert all(c.feature_group_count == c.in_features == c.out_features for c in depthwise)
    assert len(depthwise) == 3 * 2 + 8 * 3 + 2 + 2
    bns = [m for _, m in nnx.iter_modules(f) if isinstance(m, nnx.BatchNorm)]
    assert bns and all(b.epsilon == 1e-3 for b in bns)


def test_xception_min_size_is_the_smallest_accepted_input():
    # The VALID stem decides: 7 -> 3 -> 1, while 6 -> 2 leaves conv2 nothing (an empty map).
    assert zoo.get_spec("xception").min_size == (7, 7)
    model = abstract("xception", include_top=False, **SMALL_XCEPTION)
    assert zoo.output_shape(model.features, (1, 7, 7, 3))[1:3] == (1, 1)
    assert zoo.output_shape(model.features, (1, 6, 6, 3))[1:3] == (0, 0)


# ---------------------------------------------------------------- BatchNorm statistics


def test_batch_norm_statistics_update_in_train_mode_only_and_are_not_params():
    model = fill_random(abstract("resnet18", num_classes=4, input_size=32, stage_widths=(8, 8, 16, 16),
                                 stem_width=8, bn_momentum=0.8))
    stem = model.features.stem
    stem.bn.mean.set_value(jnp.zeros(8))  # the statistics a new model starts from
    stem.bn.var.set_value(jnp.ones(8))
    bn_channels = sum(m.num_features for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm))
    stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    assert sum(s.size for s in stats) == 2 * bn_channels  # mean and var
    all_leaves = sum(s.size for s in jax.tree.leaves(nnx.state(model)))
    assert zoo.count_params(model) == all_leaves - 2 * bn_channels

    x = np.random.default_rng(6).normal(size=(4, 32, 32, 3)).astype(np.float32)
    conv_out = np_conv(x.astype(np.float64), w_of(stem.conv), 2, 3)
    run(model, x)  # train mode (the default after create_model)
    # running = momentum * running + (1 - momentum) * batch, from mean 0 and var 1.
    assert_close(stem.bn.mean[...], 0.2 * conv_out.mean(axis=(0, 1, 2)), tol=1e-4)
    assert_close(stem.bn.var[...], 0.8 + 0.2 * conv_out.var(axis=(0, 1, 2)), tol=1e-4)

    model.eval()
    before = [np.asarray(s) for s in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
    run(model, x)
    after = [np.asarray(s) for s in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------- options and errors


def test_bad_options_are_clear_value_errors():
    with pytest.raises(ValueError, match="stride_in"):
        zoo.create_model("resnet50", stride_in="2x2")
    with pytest.raises(ValueError, match="bottleneck"):
        abstract("resnet18", stride_in="1x1")
    with pytest.raises(ValueError, match="unknown option"):
        abstract("resnet18", se_reductio=16)
    with pytest.raises(ValueError, match="unknown option"):
        abstract("xception", stride_in="1x1")
    with pytest.raises(ValueError, match="momentum"):
        abstract("resnet18", bn_momentum=1.5)


def test_computation_dtype_reaches_every_layer():
    for name, options in (("resnet18", {"se_reduction": 16}), ("xception", SMALL_XCEPTION)):
        model = abstract(name, dtype=jnp.bfloat16, **options)
        layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, (nnx.Conv, nnx.Linear, nnx.BatchNorm))]
        assert layers and all(m.dtype == jnp.bfloat16 for m in layers)
        assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
