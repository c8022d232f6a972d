"""LeNet-5, AlexNet, VGG and GoogLeNet: the options and details the shared model tests do not see.

References are outside the code under test: the LRN formula of Krizhevsky et al.
(sec. 3.3) as a numpy loop, Caffe's LRN formula, two-tower convolutions run as
two separate convolutions, parameter counts worked out from the papers' tables.
Big models are only built abstractly (`nnx.eval_shape`).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo import googlenet
from zoo.layers import Activation, AvgPool, LocalResponseNorm, MaxPool


def abstract_model(name, **kwargs):
    return zoo.eval_shape(lambda: zoo.create_model(name, **kwargs))


def param_grads_nonzero(grads, prefix):
    """Whether any parameter under the dotted path `prefix` got a nonzero gradient."""
    flat = nnx.to_flat_state(nnx.state(grads, nnx.Param))
    leaves = jax.device_get([v.get_value() for path, v in flat if ".".join(map(str, path)).startswith(prefix)])
    assert leaves, f"no parameters under {prefix}"
    return any(np.any(leaf != 0) for leaf in leaves)


# ---------------------------------------------------------------- local response normalization


def lrn_paper_loop(a, *, n, k, alpha, beta):
    """b[c] = a[c] / (k + alpha * sum_{j=max(0, c-n/2)}^{min(C-1, c+n/2)} a[j]^2) ** beta, one c at a time."""
    a = np.asarray(a, np.float64)
    channels = a.shape[-1]
    b = np.empty_like(a)
    for c in range(channels):
        lo, hi = max(0, c - n // 2), min(channels - 1, c + n // 2)
        total = sum(a[..., j] ** 2 for j in range(lo, hi + 1))
        b[..., c] = a[..., c] / (k + alpha * total) ** beta
    return b


def random_activations(seed, shape, scale):
    # Large enough that alpha * sum(a^2) is of order k, so the normalization really acts.
    return scale * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_alexnet_lrn_matches_the_papers_formula():
    lrn = abstract_model("alexnet").features.lrn1
    assert isinstance(lrn, LocalResponseNorm)
    x = random_activations(0, (2, 3, 4, 11), scale=60.0)
    expected = lrn_paper_loop(x, n=5, k=2.0, alpha=1e-4, beta=0.75)
    np.testing.assert_allclose(np.asarray(lrn(jnp.asarray(x))), expected, rtol=1e-5)
    assert np.abs(expected / x - 1).max() > 0.2  # the test data is really normalized


def test_alexnet_normalizes_after_conv1_and_conv2_only():
    steps = abstract_model("alexnet").features.step_names
    assert steps.index("relu1") < steps.index("lrn1") < steps.index("pool1")
    assert steps.index("relu2") < steps.index("lrn2") < steps.index("pool2")
    assert [s for s in steps if s.startswith("lrn")] == ["lrn1", "lrn2"]


def test_googlenet_lrn_matches_caffes_formula():
    # The reference Caffe model: scale = (1 + alpha / size * sum a^2) ** beta, alpha 1e-4, size 5.
    lrn = abstract_model("googlenet").features.lrn1
    x = random_activations(1, (1, 2, 2, 9), scale=150.0)
    sq = np.pad(x.astype(np.float64) ** 2, ((0, 0), (0, 0), (0, 0), (2, 2)))
    window_sum = sum(sq[..., j:j + 9] for j in range(5))
    expected = x / (1 + 1e-4 / 5 * window_sum) ** 0.75
    np.testing.assert_allclose(np.asarray(lrn(jnp.asarray(x))), expected, rtol=1e-5)


# ---------------------------------------------------------------- LeNet-5


def test_lenet_default_is_the_papers_tanh_and_subsampling():
    model = zoo.create_model("lenet5", rngs=0)
    f = model.features
    assert isinstance(f.act1, Activation) and f.act1.name == "tanh"
    assert isinstance(f.pool1, AvgPool) and isinstance(f.pool2, AvgPool)
    assert {s["fn"] for s in model.head.describe() if s["op"] == "activation"} == {"tanh"}
    # Subsampling is a plain 2x2 mean, no trainable coefficient.
    x = np.random.default_rng(2).standard_normal((1, 28, 28, 6)).astype(np.float32)
    expected = x.reshape(1, 14, 2, 14, 2, 6).mean(axis=(2, 4))
    np.testing.assert_allclose(np.asarray(f.pool1(jnp.asarray(x))), expected, rtol=1e-6, atol=1e-6)
    assert nnx.state(f.pool1, nnx.Param) == nnx.State({})


def test_lenet_relu_max_option():
    tanh_model = zoo.create_model("lenet5", rngs=0)
    relu_model = zoo.create_model("lenet5", activation="relu", pooling="max", rngs=0)
    f = relu_model.features
    assert f.act1.name == "relu" and isinstance(f.pool1, MaxPool) and isinstance(f.pool2, MaxPool)
    assert zoo.count_params(relu_model) == zoo.count_params(tanh_model) == 61_706
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
    relu_maps, tanh_maps = relu_model.features(x), tanh_model.features(x)
    assert bool(jnp.all(relu_maps >= 0))
    assert bool(jnp.any(tanh_maps < 0)) and bool(jnp.all(jnp.abs(tanh_maps) < 1))


def test_lenet_c5_is_the_first_dense_of_a_flatten_head():
    steps = abstract_model("lenet5").head.describe()
    dense = [s for s in steps if s["op"] == "dense"]
    assert steps[0] == {"op": "flatten"}
    assert [(s["in_features"], s["out_features"]) for s in dense] == [(5 * 5 * 16, 120), (120, 84), (84, 10)]


def test_lenet_on_28x28_with_padding_is_the_32x32_network():
    padded = zoo.create_model("lenet5", input_size=28, input_padding=2, rngs=0)
    assert zoo.count_params(padded) == 61_706
    x28 = jax.random.uniform(jax.random.key(3), (3, 28, 28, 1))
    padded.eval()
    logits = padded(x28)
    assert logits.shape == (3, 10)
    # Same weights in the plain 32x32 network, fed the zero-padded digits by hand.
    plain = zoo.create_model("lenet5", rngs=1)
    plain.eval()
    nnx.update(plain, nnx.state(padded, nnx.Param))
    x32 = jnp.pad(x28, ((0, 0), (2, 2), (2, 2), (0, 0)))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(plain(x32)), rtol=1e-5, atol=1e-6)


def test_lenet_on_28x28_without_padding_has_a_smaller_c5():
    # 28 -> 24 -> 12 -> 8 -> 4: C5 sees 4x4x16 instead of 5x5x16, 9 * 16 * 120 weights fewer.
    model = abstract_model("lenet5", input_size=28)
    assert zoo.count_params(model) == 61_706 - 9 * 16 * 120


def test_lenet_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="pooling"):
        zoo.create_model("lenet5", pooling="median")
    with pytest.raises(ValueError, match="activation"):
        zoo.create_model("lenet5", activation="sigmoidal")
    with pytest.raises(ValueError, match="input_padding"):
        zoo.create_model("lenet5", input_padding=-1)


def test_lenet_bfloat16_computation():
    model = zoo.create_model("lenet5", dtype=jnp.bfloat16, rngs=0)
    assert model(jnp.ones((1, 32, 32, 1))).dtype == jnp.bfloat16
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}


# ---------------------------------------------------------------- AlexNet


def test_alexnet_towers_in_the_kernel_shapes():
    two = abstract_model("alexnet").features
    one = abstract_model("alexnet", groups=1).features
    # HWIO kernels: a grouped conv's kernel sees only its tower's half of the input maps.
    assert two.conv2.kernel.shape == (5, 5, 48, 256) and one.conv2.kernel.shape == (5, 5, 96, 256)
    assert two.conv3.kernel.shape == one.conv3.kernel.shape == (3, 3, 256, 384)
    assert two.conv4.kernel.shape == (3, 3, 192, 384) and one.conv4.kernel.shape == (3, 3, 384, 384)
    assert two.conv5.kernel.shape == (3, 3, 192, 256) and one.conv5.kernel.shape == (3, 3, 384, 256)
    assert two.conv1.kernel.shape == one.conv1.kernel.shape == (11, 11, 3, 96)


def test_alexnet_two_tower_count_from_the_paper():
    # Grouping removes half the input maps of conv2, conv4, conv5: k*k*(cin/2)*cout weights each.
    saved = 5 * 5 * 48 * 256 + 3 * 3 * 192 * 384 + 3 * 3 * 192 * 256
    single = zoo.count_params(abstract_model("alexnet", groups=1))
    assert zoo.count_params(abstract_model("alexnet")) == single - saved == 60_965_224


def conv_same(x, kernel, bias):
    out = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out + bias


def test_alexnet_grouped_conv_is_two_separate_towers():
    features = zoo.create_model("alexnet", include_top=False, rngs=0).features
    conv2 = features.conv2
    x = jax.random.normal(jax.random.key(4), (1, 9, 9, 96))
    kernel, bias = conv2.kernel.get_value(), conv2.bias.get_value()
    towers = jnp.concatenate([
        conv_same(x[..., :48], kernel[..., :128], bias[:128]),   # GPU 1: maps 0..47 -> 0..127
        conv_same(x[..., 48:], kernel[..., 128:], bias[128:]),   # GPU 2: maps 48..95 -> 128..255
    ], axis=-1)
    np.testing.assert_allclose(np.asarray(conv2(x)), np.asarray(towers), rtol=1e-4, atol=1e-4)
    # conv3 is the layer where the towers talk: tower 2's input changes all its outputs.
    y = jax.random.normal(jax.random.key(5), (1, 5, 5, 256))
    bumped = y.at[..., 128:].add(1.0)
    changed = jnp.abs(features.conv3(bumped) - features.conv3(y)).max(axis=(0, 1, 2))
    assert bool(jnp.all(changed[:192] > 0)) and bool(jnp.all(changed[192:] > 0))
    changed4 = jnp.abs(features.conv4(jnp.zeros((1, 5, 5, 384)).at[..., 192:].set(1.0))
                       - features.conv4(jnp.zeros((1, 5, 5, 384)))).max(axis=(0, 1, 2))
    assert bool(jnp.all(changed4[:192] == 0)) and bool(jnp.all(changed4[192:] > 0))


def test_alexnet_bad_groups():
    with pytest.raises(ValueError, match="groups"):
        zoo.create_model("alexnet", groups=3)


# ---------------------------------------------------------------- VGG


@pytest.mark.parametrize("name,weight_layers", [("vgg11", 11), ("vgg13", 13), ("vgg16", 16), ("vgg19", 19)])
def test_vgg_depth_is_the_papers(name, weight_layers):
    model = abstract_model(name)
    convs = [s for s in model.features.step_names if s.startswith("conv")]
    dense = [s for s in model.head.describe() if s["op"] == "dense"]
    assert len(convs) + len(dense) == weight_layers
    assert all(model.features.__getattribute__(c).kernel.shape[:2] == (3, 3) for c in convs)
    assert [s for s in model.features.step_names if s.startswith("pool")] == [f"pool{i}" for i in range(1, 6)]


def test_vgg_flatten_head_follows_the_input_size():
    model = abstract_model("vgg16", input_size=64)
    first = model.head.describe()[1]
    assert first["in_features"] == 2 * 2 * 512  # 64 / 32 = 2
    # 138,357,544 at 224: the first Dense shrinks from 7*7*512 to 2*2*512 inputs.
    assert zoo.count_params(model) == 138_357_544 - (49 - 4) * 512 * 4096


# ---------------------------------------------------------------- GoogLeNet

# The paper's Table 1, copied here independently of zoo.googlenet:
# (input maps, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj).
PAPER_INCEPTION = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}


def test_googlenet_units_follow_the_paper_with_a_real_5x5_branch():
    features = abstract_model("googlenet").features
    for unit_name, (cin, c1, r3, c3, r5, c5, proj) in PAPER_INCEPTION.items():
        unit = getattr(features, unit_name)
        assert unit.branch1x1.kernel.shape == (1, 1, cin, c1)
        assert unit.branch3x3.kernel.shape == (3, 3, r3, c3)
        assert unit.branch5x5.kernel.shape == (5, 5, r5, c5)
        assert unit.pool_proj.kernel.shape == (1, 1, cin, proj)
        assert unit.branch5x5.bias.shape == (c5,)  # conv biases, no batch norm
    assert not any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(features))


def test_googlenet_aux_count_from_the_paper():
    # Each auxiliary classifier at 224: 1x1 conv to 128 maps on a 4x4 map, Dense 2048 -> 1024 -> 1000.
    def aux_params(cin):
        return (cin * 128 + 128) + (4 * 4 * 128 * 1024 + 1024) + (1024 * 1000 + 1000)

    plain = zoo.count_params(abstract_model("googlenet"))
    with_aux = zoo.count_params(abstract_model("googlenet", aux_logits=True))
    assert with_aux - plain == aux_params(512) + aux_params(528)


# A narrow test-only table with the paper's layout; equal widths mean few distinct kernel
# shapes, hence few XLA compilations, so the CPU runs the auxiliary heads quickly.
NARROW_TABLE = tuple(
    row if row in ("pool3", "pool4") else (row, 4, 4, 4, 4, 4, 4)
    for row in ("inception3a", "inception3b", "pool3", "inception4a", "inception4b", "inception4c",
                "inception4d", "inception4e", "pool4", "inception5a", "inception5b")
)


@pytest.fixture(scope="module")
def googlenet_with_aux():
    # 65x65 is the smallest input whose 4a/4d maps (5x5) fit the auxiliary 5x5 pool.
    return zoo.create_model("googlenet", num_classes=6, input_size=65, aux_logits=True,
                            table=NARROW_TABLE, rngs=0)


def test_googlenet_aux_logits_in_train_mode(googlenet_with_aux):
    model = googlenet_with_aux
    model.train()
    x = jax.random.normal(jax.random.key(6), (2, 65, 65, 3))
    logits, aux = googlenet.forward_with_aux(model, x)
    assert logits.shape == (2, 6)
    assert len(aux) == 2 and all(a.shape == (2, 6) for a in aux)
    assert not np.allclose(np.asarray(aux[0]), np.asarray(aux[1]))
    # Plain calls keep the protocol: main logits only, nothing left behind in the model, no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(x)
    assert out.shape == (2, 6)
    assert nnx.state(model, nnx.Intermediate) == nnx.State({})


def test_googlenet_aux_logits_absent_in_eval_mode(googlenet_with_aux):
    model = googlenet_with_aux
    model.eval()
    x = jax.random.normal(jax.random.key(7), (2, 65, 65, 3))
    logits, aux = googlenet.forward_with_aux(model, x)
    assert aux == ()
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(x)), rtol=1e-6)
    model.train()


def test_googlenet_aux_heads_read_4a_and_4d(googlenet_with_aux):
    model = googlenet_with_aux
    model.train()
    # Switch off only the auxiliary heads' dropout, so their logits can be recomputed by hand.
    for aux_name in ("aux1", "aux2"):
        getattr(model.features, aux_name).set_attributes(nnx.Dropout, deterministic=True)
    x = jax.random.normal(jax.random.key(8), (2, 65, 65, 3))
    _, (aux1, aux2) = googlenet.forward_with_aux(model, x)
    expected, y = {}, x
    for step in model.features.step_names:
        y = getattr(model.features, step)(y)
        if step in ("inception4a", "inception4d"):
            expected[step] = model.features.aux1(y) if step == "inception4a" else model.features.aux2(y)
    model.train()
    np.testing.assert_allclose(np.asarray(aux1), np.asarray(expected["inception4a"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux2), np.asarray(expected["inception4d"]), rtol=1e-4, atol=1e-5)


def test_googlenet_aux_losses_train_the_backbone_up_to_4d(googlenet_with_aux):
    model = googlenet_with_aux
    model.train()
    x = jax.random.normal(jax.random.key(8), (2, 65, 65, 3))

    def aux_loss(model):
        _, aux = googlenet.forward_with_aux(model, x)
        return sum(jnp.sum(a**2) for a in aux)

    grads = nnx.grad(aux_loss)(model)
    for reached in ("features.conv1", "features.inception4d", "features.aux1", "features.aux2"):
        assert param_grads_nonzero(grads, reached), reached
    for not_reached in ("features.inception4e", "features.inception5b", "head"):
        assert not param_grads_nonzero(grads, not_reached), not_reached


def test_googlenet_aux_option_errors():
    with pytest.raises(ValueError, match="include_top"):
        zoo.create_model("googlenet", include_top=False, aux_logits=True)
    with pytest.raises(ValueError, match="65x65"):
        zoo.eval_shape(lambda: zoo.create_model("googlenet", input_size=64, aux_logits=True))
    with pytest.raises(TypeError, match="GoogLeNet"):
        googlenet.forward_with_aux(zoo.create_model("lenet5", rngs=0), jnp.zeros((1, 32, 32, 1)))


def test_googlenet_se_option_adds_one_gate_per_unit():
    # SE on C channels with reduction r: Dense C -> C//r and C//r -> C, with biases.
    r = 16
    expected = 0
    for _, c1, _, c3, _, c5, proj in PAPER_INCEPTION.values():
        c = c1 + c3 + c5 + proj
        expected += (c * (c // r) + c // r) + (c // r * c + c)
    plain = abstract_model("googlenet")
    se = abstract_model("googlenet", se_reduction=r)
    assert zoo.count_params(se) - zoo.count_params(plain) == expected
    assert se.features.inception4e.se.reduce.kernel.shape == (832, 52)
    assert plain.features.inception4e.se is None
    with pytest.raises(ValueError, match="se_reduction"):
        zoo.create_model("googlenet", se_reduction=0)


def test_googlenet_se_gate_scales_the_unit_output():
    # The gate is created after the branches, so the same seed gives the same branch weights.
    gated_unit = googlenet.Inception(8, 4, 4, 4, 4, 4, 4, se_reduction=4, rngs=nnx.Rngs(0))
    plain_unit = googlenet.Inception(8, 4, 4, 4, 4, 4, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(9), (1, 6, 6, 8))
    gated, plain = np.asarray(gated_unit(x)), np.asarray(plain_unit(x))
    assert (gated == 0).sum() == (plain == 0).sum() < plain.size
    # One gate per channel in (0, 1), the same at every position: gated = plain * s[c].
    active = plain != 0
    checked = 0
    for ch in range(16):
        ratios = gated[..., ch][active[..., ch]] / plain[..., ch][active[..., ch]]
        if ratios.size:  # a channel may be all zero after ReLU
            assert np.allclose(ratios, ratios[0], rtol=1e-5) and 0 < ratios[0] < 1
            checked += 1
    assert checked >= 8
