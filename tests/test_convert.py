"""The converter: FCN outputs against the classifier they came from, window by window.

The reference is always the source classifier run on its own input (at the
training size, or on the exact window a cell claims to judge), plus numpy for
the per-position head; geometry is cross-checked three ways (layer walk,
output shapes, gradient support).
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convert
import zoo
from model_sets import smallest_of_each_family
from convert import ConversionError, to_fcn
from convert.geometry import shape_geometry, walk_geometry
from zoo.classifier import Classifier, dense_head
from zoo.layers import Activation, Flatten, GlobalAvgPool, MaxPool, SqueezeExcite

TOL = 1e-5


def close(a, b, tol=TOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)))


# ---------------------------------------------------------------- user-style models (no zoo protocol)
def mnist_cnn_plain(rngs):
    """The classic MNIST CNN written with plain functions, as users write it."""
    return nnx.Sequential(
        nnx.Conv(1, 32, (3, 3), padding="VALID", rngs=rngs), jax.nn.relu,
        functools.partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2)),
        lambda x: x.reshape(x.shape[0], -1),
        nnx.Linear(13 * 13 * 32, 128, rngs=rngs), jax.nn.relu, nnx.Linear(128, 10, rngs=rngs))


def mnist_cnn_layers(rngs):
    return nnx.Sequential(
        nnx.Conv(1, 8, (3, 3), padding="VALID", rngs=rngs), Activation("relu"), MaxPool(2),
        nnx.Conv(8, 16, (3, 3), padding="VALID", rngs=rngs), Activation("relu"), MaxPool(2),
        Flatten(), nnx.Linear(5 * 5 * 16, 32, rngs=rngs), Activation("relu"), nnx.Dropout(0.5, rngs=rngs),
        nnx.Linear(32, 10, rngs=rngs))


class MnistModule(nnx.Module):
    """The MNIST CNN as a small Module whose __call__ chains its layers."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 16, (3, 3), padding="VALID", rngs=rngs)
        self.act = Activation("relu")
        self.pool = MaxPool(2)
        self.flatten = Flatten()
        self.hidden = nnx.Linear(13 * 13 * 16, 24, rngs=rngs)
        self.act2 = Activation("relu")
        self.out = nnx.Linear(24, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(self.act2(self.hidden(self.flatten(self.pool(self.act(self.conv(x)))))))


def protocol_flatten(rngs):
    """zoo protocol, Flatten head with BatchNorm in the backbone, VALID."""
    features = nnx.Sequential(nnx.Conv(3, 8, (5, 5), strides=2, padding="VALID", rngs=rngs),
                              nnx.BatchNorm(8, rngs=rngs), Activation("relu"), MaxPool(3, 2),
                              nnx.Conv(8, 12, (3, 3), padding="VALID", rngs=rngs), Activation("tanh"))
    head = dense_head("flatten", 3 * 3 * 12, 4, hidden=(20, 16), dropout=0.5, rngs=rngs)
    return Classifier(features, head, input_shape=(25, 25, 3), min_size=(25, 25), name="protocol_flatten")


def protocol_avg(rngs, padding="VALID"):
    """zoo protocol, global-average head with Dense -> relu -> Dense (the pool must stay before the relu)."""
    features = nnx.Sequential(nnx.Conv(3, 8, (3, 3), padding=padding, rngs=rngs), nnx.BatchNorm(8, rngs=rngs),
                              Activation("relu"), MaxPool(2),
                              nnx.Conv(8, 16, (3, 3), strides=2, padding=padding, rngs=rngs), Activation("relu"))
    head = dense_head("avg", 16, 5, hidden=(12,), dropout=0.2, dropout_first=True, rngs=rngs)
    return Classifier(features, head, input_shape=(24, 24, 3), min_size=(24, 24), name="protocol_avg")


def randomize_batch_stats(model, seed=0):
    """Non-trivial BatchNorm statistics, so that eval-mode BatchNorm is not the identity."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.BatchStat):
            shape = var.get_value().shape
            var.set_value(jnp.asarray(rng.uniform(0.5, 1.5, shape) if path[-1] == "var" else rng.normal(0, 0.3, shape),
                                      jnp.float32))
    return model


class FunctionCallsModule(nnx.Module):
    """Functions between the submodule calls: not a chain, so it is read from its trace (convert.trace)."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), padding="VALID", rngs=rngs)
        self.fc = nnx.Linear(12 * 12 * 4, 6, rngs=rngs)
        self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(jax.nn.relu(self.conv(x)), (2, 2), strides=(2, 2))
        return self.out(jnp.tanh(self.fc(x.reshape(x.shape[0], -1))))


USER_MODELS = {
    "mnist_cnn_plain": (mnist_cnn_plain, (28, 28, 1), True),
    "mnist_cnn_layers": (mnist_cnn_layers, (28, 28, 1), True),
    "mnist_module": (MnistModule, (28, 28, 1), True),
    "function_calls_module": (FunctionCallsModule, (26, 26, 1), True),
    "protocol_flatten": (protocol_flatten, (25, 25, 3), True),
    "protocol_avg": (protocol_avg, (24, 24, 3), True),
    "protocol_avg_same": (functools.partial(protocol_avg, padding="SAME"), (24, 24, 3), False),
}


def build(name, seed=0):
    factory, shape, valid = USER_MODELS[name]
    model = randomize_batch_stats(factory(nnx.Rngs(seed)))
    model.eval()
    return model, shape, valid


def images(shape, n=2, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, *shape))


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", list(USER_MODELS))
def test_fcn_equals_classifier_at_training_size(name):
    model, shape, _ = build(name)
    fcn = to_fcn(model, shape)
    x = images(shape)
    out = fcn(x)
    assert out.shape == (2, 1, 1, model(x).shape[-1])
    assert close(out[:, 0, 0], model(x)) <= TOL


@pytest.mark.parametrize("name", [n for n, (_, _, valid) in USER_MODELS.items() if valid])
def test_every_cell_is_the_classifier_on_its_window(name):
    model, shape, _ = build(name)
    fcn = to_fcn(model, shape)
    g = fcn.geometry
    assert g.valid and g.offset == (0, 0)
    x = images((shape[0] + 3 * g.stride[0] + 1, shape[1] + 2 * g.stride[1] + 3, shape[2]), n=1, seed=2)
    out = np.asarray(fcn(x))
    assert out.shape[1:3] == ((x.shape[1] - g.receptive_field[0]) // g.stride[0] + 1,
                              (x.shape[2] - g.receptive_field[1]) // g.stride[1] + 1)
    windows, cells = [], []
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            top, left, h, w = g.window(i, j)
            windows.append(x[0, top:top + h, left:left + w])
            cells.append(out[0, i, j])
    assert close(np.stack(cells), model(jnp.stack(windows))) <= TOL


def test_avg_head_pool_must_precede_the_first_nonlinearity():
    """Pooling after the whole head (the naive conversion) is wrong whenever the head has Dense->act->Dense."""
    model, shape, _ = build("protocol_avg")
    fcn = to_fcn(model, shape)
    ops = [s["op"] for s in fcn.describe()]
    assert ops.index("avg_pool") < ops.index("activation")
    x = images(shape)
    naive = fcn.score_map(x).mean(axis=(1, 2))  # every layer per position, mean at the end
    assert close(naive, model(x)) > 1e-3
    assert close(fcn(x)[:, 0, 0], model(x)) <= TOL


def test_avg_head_score_map_is_the_head_at_each_position():
    model, shape, _ = build("protocol_avg")
    fcn = to_fcn(model, shape)
    x = images((40, 32, 3), n=1)
    scores = np.asarray(fcn.score_map(x))
    fmap = np.asarray(model.features(x))
    # numpy reference: Dense -> relu -> Dense on every position's feature vector (dropout is off in eval).
    dense = [l for l in model.head.layers if isinstance(l, nnx.Linear)]
    hidden = np.maximum(fmap @ np.asarray(dense[0].kernel.get_value()) + np.asarray(dense[0].bias.get_value()), 0)
    reference = hidden @ np.asarray(dense[1].kernel.get_value()) + np.asarray(dense[1].bias.get_value())
    assert scores.shape == reference.shape
    assert close(scores, reference) <= TOL


def test_trained_weights_convert_exactly():
    """Train the MNIST CNN a few steps on random digits, then convert: no retraining, same answers."""
    model = mnist_cnn_layers(nnx.Rngs(3))
    before = np.asarray(model.layers[7].kernel.get_value()).copy()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((32, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 32))

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert not np.allclose(before, np.asarray(model.layers[7].kernel.get_value()))
    model.eval()
    fcn = to_fcn(model, (28, 28, 1))
    assert close(fcn(x[:4])[:, 0, 0], model(x[:4])) <= TOL
    big = jnp.asarray(rng.random((1, 36, 44, 1)), jnp.float32)
    out = fcn(big)
    top, left, h, w = fcn.geometry.window(2, 3)
    assert close(out[0, 2, 3], model(big[:, top:top + h, left:left + w])[0]) <= TOL


def test_flatten_kernel_is_the_dense_kernel_in_row_major_hwc_order():
    model, shape, _ = build("mnist_cnn_layers")
    fcn = to_fcn(model, shape)
    dense = np.asarray(model.layers[7].kernel.get_value())  # (5*5*16, 32)
    conv = np.asarray(fcn.head[0].kernel.get_value())  # (5, 5, 16, 32)
    for y, x, c in [(0, 0, 0), (1, 3, 5), (4, 4, 15), (2, 0, 9)]:
        np.testing.assert_array_equal(conv[y, x, c], dense[(y * 5 + x) * 16 + c])


def test_fcn_is_a_copy():
    model, shape, _ = build("protocol_flatten")
    fcn = to_fcn(model, shape)
    x = images(shape)
    expected = np.asarray(fcn(x))
    model.features.layers[0].kernel.set_value(model.features.layers[0].kernel.get_value() * 0)
    np.testing.assert_array_equal(np.asarray(fcn(x)), expected)


def test_softmax_after_the_logits_runs_per_position():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Conv(1, 4, (3, 3), padding="VALID", rngs=rngs), jax.nn.relu, Flatten(),
                           nnx.Linear(6 * 6 * 4, 3, rngs=rngs), jax.nn.softmax)
    fcn = to_fcn(model, (8, 8, 1))
    x = images((11, 9, 1), n=1)
    out = fcn(x)
    np.testing.assert_allclose(np.asarray(out.sum(-1)), 1.0, rtol=1e-6)
    assert close(out[0, 3, 1], model(x[:, 3:11, 1:9])[0]) <= TOL


# ---------------------------------------------------------------- property test
@st.composite
def valid_stacks(draw):
    layers, channels = [], draw(st.integers(1, 3))
    in_channels = channels
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(2, 6))
        layers.append(("conv", in_channels, out, draw(st.integers(1, 3)), draw(st.integers(1, 2))))
        if draw(st.booleans()):
            layers.append(("pool", draw(st.sampled_from(["max", "avg"])), draw(st.integers(2, 3)), draw(st.integers(1, 2))))
        in_channels = out
    head = draw(st.sampled_from(["flatten", "avg"]))
    hidden = draw(st.lists(st.integers(2, 8), max_size=2))
    extra = (draw(st.integers(0, 5)), draw(st.integers(0, 5)))
    return channels, layers, head, tuple(hidden), extra


def build_stack(channels, layers, head, hidden, seed):
    rngs = nnx.Rngs(seed)
    modules = []
    for layer in layers:
        if layer[0] == "conv":
            _, cin, cout, k, s = layer
            modules += [nnx.Conv(cin, cout, (k, k), strides=s, padding="VALID", rngs=rngs), jax.nn.relu]
        else:
            _, kind, k, s = layer
            fn = nnx.max_pool if kind == "max" else nnx.avg_pool
            modules.append(functools.partial(fn, window_shape=(k, k), strides=(s, s)))
    return modules, rngs


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_stacks(), st.integers(0, 1000))
def test_random_valid_stacks(stack, seed):
    channels, layers, head, hidden, extra = stack
    modules, rngs = build_stack(channels, layers, head, hidden, seed)
    backbone = nnx.Sequential(*modules)
    # The smallest input giving one cell, from the walk; then train at a few cells more.
    g0 = walk_geometry(backbone, (64, 64, channels))
    train = g0.receptive_field[0] + g0.stride[0] * extra[0]
    train_w = g0.receptive_field[1] + g0.stride[1] * extra[1]
    fmap = zoo.output_shape(backbone, (1, train, train_w, channels))
    width = fmap[1] * fmap[2] * fmap[3] if head == "flatten" else fmap[3]
    head_layers = [Flatten() if head == "flatten" else GlobalAvgPool()]
    for h in hidden:
        head_layers += [nnx.Linear(width, h, rngs=rngs), jax.nn.relu]
        width = h
    head_layers.append(nnx.Linear(width, 3, rngs=rngs))
    model = nnx.Sequential(*modules, *head_layers)
    fcn = to_fcn(model, (train, train_w, channels))
    x = jax.random.normal(jax.random.key(seed), (1, train + 2 * g0.stride[0] + 1, train_w + g0.stride[1], channels))
    out = np.asarray(fcn(x))
    g = fcn.geometry
    assert g.valid and g.stride == g0.stride
    # Shapes alone say the same stride and field (an independent derivation).
    assert shape_geometry(backbone, channels, max_size=96) == (g0.stride, g0.receptive_field)
    assert out.shape[1:3] == tuple((n - r) // s + 1 for n, r, s in zip(x.shape[1:3], g.receptive_field, g.stride))
    for i, j in {(0, 0), (out.shape[1] - 1, out.shape[2] - 1), (out.shape[1] // 2, 0)}:
        top, left, h, w = g.window(i, j)
        assert close(out[0, i, j], model(x[:, top:top + h, left:left + w])[0]) <= TOL


# ---------------------------------------------------------------- geometry
def test_geometry_walk_matches_shapes_and_gradient_support():
    model, shape, _ = build("mnist_cnn_layers")
    backbone = nnx.Sequential(*model.layers[:6])
    walked = walk_geometry(backbone, shape)
    measured = walk_geometry(backbone, shape, measure_all=True)
    assert (walked.stride, walked.receptive_field, walked.offset) == ((4, 4), (10, 10), (0, 0))
    assert (measured.stride, measured.receptive_field, measured.offset) == (walked.stride, walked.receptive_field,
                                                                              walked.offset)
    assert shape_geometry(backbone, 1) == (walked.stride, walked.receptive_field)
    assert walked.method == "walk" and measured.method == "measured"


def test_same_padding_geometry_has_negative_offset():
    features = nnx.Sequential(nnx.Conv(1, 2, (3, 3), padding="SAME", rngs=nnx.Rngs(0)),
                              nnx.Conv(2, 2, (3, 3), strides=2, padding="SAME", rngs=nnx.Rngs(1)))
    walked = walk_geometry(features, (16, 16, 1))
    measured = walk_geometry(features, (16, 16, 1), measure_all=True)
    # Hand computation: field 3 then 3 + 2*1 = 5; SAME pads 1 then 0 before (16 even, stride 2): offset -1.
    assert walked.receptive_field == (5, 5) and walked.offset == (-1, -1) and not walked.valid
    assert (measured.receptive_field, measured.stride) == ((5, 5), (2, 2))


# ---------------------------------------------------------------- registered models
def small_input(spec):
    return max(spec.min_size[0], 32), max(spec.min_size[1], 32)


@pytest.mark.parametrize("name", smallest_of_each_family())
def test_registered_model_converts_exactly(name):
    spec = zoo.get_spec(name)
    model = zoo.create_model(name, num_classes=3, input_size=small_input(spec), rngs=0)
    randomize_batch_stats(model)
    model.eval()
    shape = (*small_input(spec), spec.input_shape[2])
    fcn = to_fcn(model, shape)
    x = images(shape, n=1)
    forward = nnx.jit(lambda module, x: module(x))  # one compile instead of one per operation
    logits = forward(model, x)
    diff = close(forward(fcn, x)[:, 0, 0], logits)
    assert diff <= TOL * max(1.0, float(jnp.max(jnp.abs(logits)))), diff


def test_lenet5_slides_exactly():
    spec = zoo.get_spec("lenet5")
    model = zoo.create_model("lenet5", num_classes=3, rngs=0)
    model.eval()
    fcn = to_fcn(model)
    g = fcn.geometry
    # Hand computation: conv5, pool2, conv5, pool2 -> field 5, 6, 14, 16 at stride 4; the 5x5 head
    # kernel at stride 4 adds 4*4: 32, the whole training image.
    assert g.valid and g.stride == (4, 4) and g.receptive_field == (32, 32) and g.offset == (0, 0)
    x = images((spec.input_shape[0] + g.stride[0], spec.input_shape[1] + 2 * g.stride[1], spec.input_shape[2]), n=1)
    out = fcn(x)
    assert out.shape[1:3] == (2, 3)
    windows = [x[0, t:t + h, l:l + w] for t, l, h, w in (g.window(i, j) for i in range(2) for j in range(3))]
    assert close(out[0].reshape(6, -1), model(jnp.stack(windows))) <= TOL


def test_alexnet_geometry_by_hand():
    """AlexNet pads conv2-5 (as in the paper), so it is not VALID: its windows reach into padding."""
    model = nnx.eval_shape(lambda: zoo.create_model("alexnet", num_classes=3))  # abstract: nothing is run
    g = walk_geometry(model.features, (227, 227, 3))
    # conv1 11/4: r 11, j 4; pool 3/2: r 19, j 8; conv2 5 pad 2: r 51, a -16; pool: r 67, j 16;
    # conv3-5 3 pad 1: r 99, 131, 163, a -32, -48, -64; pool: r 195, j 32.
    assert (g.stride, g.receptive_field, g.offset, g.valid) == ((32, 32), (195, 195), (-64, -64), False)
    assert zoo.output_shape(model.features, (1, 227, 227, 3)) == (1, 6, 6, 256)


def test_resnet18_geometry_by_hand():
    """ResNet stages are `nnx.List`s of residual blocks: the walk opens them and measures block by block."""
    model = zoo.create_model("resnet18", num_classes=3, input_size=32, rngs=0)
    model.eval()
    g = walk_geometry(model.features, (32, 32, 3))  # a 32 px image: the 435 px field is the network's
    # stem conv 7/2 pad 3: r 7, a -3; max pool 3/2 pad 1: r 11, j 4, a -5. Then 16 convs 3x3 pad 1,
    # each adding 2*j to r and -j to a; the first conv of stages 2-4 has stride 2 (j doubles after it):
    # stage 1: 4 at j 4; stage 2: 1 at j 4, 3 at j 8; stage 3: 1 at 8, 3 at 16; stage 4: 1 at 16, 3 at 32.
    jumps = [4] * 4 + [4] + [8] * 3 + [8] + [16] * 3 + [16] + [32] * 3
    assert g.stride == (32, 32) and not g.valid and not g.global_context
    assert g.receptive_field == (11 + 2 * sum(jumps),) * 2 == (435, 435)
    assert g.offset == (-5 - sum(jumps),) * 2 == (-217, -217)


class DepthwiseSEResidual(nnx.Module):
    """x + SE(depthwise 5x5(x)): one block (not a chain) with a local window and global context."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.depthwise = nnx.Conv(channels, channels, (5, 5), padding="SAME", feature_group_count=channels, rngs=rngs)
        self.se = SqueezeExcite(channels, 2, rngs=rngs)

    def __call__(self, x):
        return x + self.se(self.depthwise(x))


def test_squeeze_excitation_geometry_by_hand():
    """SE reaches every pixel through a spatial mean: the walk flags global context, and the field
    counts only the local windows (as in EfficientNet's MBConv blocks: B0's field measures 851,
    its hand value, see docs/BENCHMARKS.md)."""
    rngs = nnx.Rngs(0)
    features = nnx.Sequential(nnx.Conv(3, 8, (3, 3), strides=2, padding="SAME", rngs=rngs),
                              DepthwiseSEResidual(8, rngs), SqueezeExcite(8, 2, rngs=rngs),
                              nnx.Conv(8, 8, (3, 3), padding="SAME", rngs=rngs))
    g = walk_geometry(features, (32, 32, 3))
    # conv 3/2: r 3, j 2; the block's depthwise 5: + 4 * 2 = 11; SE alone: + 0; conv 3: + 2 * 2 = 15.
    # (Counting the 33-pixel probes the SE gradients cover would give 3 + 2*32*2 + 4 = 135 instead.)
    assert g.stride == (2, 2) and g.receptive_field == (15, 15) and g.global_context and g.method == "measured"


# ---------------------------------------------------------------- bad input
def test_dense_inside_the_backbone_is_refused_by_name():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Conv(1, 4, (3, 3), padding="VALID", rngs=rngs), Flatten(),
                           nnx.Linear(6 * 6 * 4, 6 * 6 * 2, rngs=rngs), lambda x: x.reshape(-1, 6, 6, 2),
                           nnx.Conv(2, 3, (3, 3), padding="VALID", rngs=rngs), Flatten(),
                           nnx.Linear(4 * 4 * 3, 2, rngs=rngs))
    with pytest.raises(ConversionError, match=r"layers\.3.*Dense inside the convolutional part"):
        to_fcn(model, (8, 8, 1))


def test_unknown_head_layer_is_refused_by_name():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Conv(1, 4, (3, 3), padding="VALID", rngs=rngs), Flatten(),
                           nnx.Linear(144, 5, rngs=rngs), nnx.LayerNorm(5, rngs=rngs), nnx.Linear(5, 2, rngs=rngs))
    with pytest.raises(ConversionError, match=r"layers\.3.*LayerNorm.*not a Dense"):
        to_fcn(model, (8, 8, 1))


def test_batch_mixing_function_in_head_is_refused():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Conv(1, 4, (3, 3), padding="VALID", rngs=rngs), Flatten(),
                           lambda x: x - x.mean(axis=0), nnx.Linear(144, 2, rngs=rngs))
    with pytest.raises(ConversionError, match=r"layers\.2"):
        to_fcn(model, (8, 8, 1))


def test_global_max_pool_is_not_mistaken_for_average():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Conv(1, 4, (3, 3), padding="VALID", rngs=rngs), lambda x: x.max(axis=(1, 2)),
                           nnx.Linear(4, 2, rngs=rngs))
    with pytest.raises(ConversionError, match="neither a row-major flatten nor a global average pool"):
        to_fcn(model, (8, 8, 1))


def test_headless_and_already_convolutional_models_are_refused():
    rngs = nnx.Rngs(0)
    with pytest.raises(ConversionError, match="no layer .* turns"):
        to_fcn(nnx.Sequential(nnx.Conv(1, 4, (3, 3), rngs=rngs)), (8, 8, 1))
    model = Classifier(nnx.Sequential(nnx.Conv(1, 4, (3, 3), rngs=rngs)), None, input_shape=(8, 8, 1),
                       min_size=(1, 1), name="headless")
    with pytest.raises(ConversionError, match="include_top=False"):
        to_fcn(model)


def test_wrong_training_shape_and_too_small_image():
    model, shape, _ = build("mnist_cnn_layers")
    with pytest.raises(ValueError, match="input_shape"):
        to_fcn(model)
    with pytest.raises(ValueError, match=r"layers\.7.*\(1, 576\).*input_shape the model was trained on"):
        to_fcn(model, (32, 32, 1))
    fcn = to_fcn(model, shape)
    # 28 -> 26 -> 13 -> 11 -> 5: the last two rows and columns never reach a cell, so windows are 26x26.
    with pytest.raises(ValueError, match="at least 26x26"):
        fcn(jnp.zeros((1, 20, 40, 1)))
    with pytest.raises(ValueError, match="channel"):
        fcn(jnp.zeros((1, 28, 28, 3)))


# ---------------------------------------------------------------- checkpoints
def test_saved_classifier_converts_to_a_saved_fcn(tmp_path):
    from zoo import saving
    from zoo.cli import main

    model = zoo.create_model("lenet5", num_classes=4, rngs=1)
    saving.save_model(model, tmp_path / "clf", model_name="lenet5", kwargs={"num_classes": 4})
    assert main(["convert", str(tmp_path / "clf"), "--out", str(tmp_path / "fcn")]) == 0
    config = json.loads((tmp_path / "fcn" / "fcn.json").read_text())
    assert config["format"] == "fcnzoo-fcn" and config["source"]["model"] == "lenet5"
    assert [s["op"] for s in config["head"]][0] == "flatten_head"
    assert sorted(p.name for p in (tmp_path / "fcn").iterdir()) == ["fcn.json", "weights.safetensors"]
    loaded = convert.load_fcn(tmp_path / "fcn")
    model.eval()
    x = images((40, 36, 1), n=1)
    ref = to_fcn(model)(x)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(ref))
    assert close(loaded(x[:, :32, :32])[:, 0, 0], model(x[:, :32, :32])) <= TOL


def test_cli_errors_are_one_line(tmp_path, capsys):
    from zoo.cli import main

    assert main(["convert", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.json is missing" in err
    with pytest.raises(FileNotFoundError, match="zoo convert"):
        (tmp_path / "clf").mkdir()
        (tmp_path / "clf" / "model.json").write_text("{}")
        convert.load_fcn(tmp_path / "clf")


@pytest.mark.parametrize("kind", ["model", "fcn", "pretrained"])
def test_damaged_or_foreign_json_records_are_refused(tmp_path, kind):
    from zoo import pretrained, saving

    readers = {  # file name, what reads it
        "model": ("model.json", lambda: saving.load_model(tmp_path)),
        "fcn": ("fcn.json", lambda: convert.load_fcn(tmp_path)),
        "pretrained": ("lenet5-x.json", lambda: pretrained.metadata("lenet5", "x", weights_dir=tmp_path)),
    }
    name, read = readers[kind]
    (tmp_path / "lenet5-x.safetensors").write_bytes(b"")  # shipped weights are listed only with their file
    (tmp_path / name).write_text('{"format": "fcnzoo-')  # cut short while being written by hand
    with pytest.raises(ValueError, match=rf"{name} is not valid JSON .*damaged"):
        read()
    (tmp_path / name).write_text('{"format": "keras"}')
    with pytest.raises(ValueError, match=rf"{name} is not an fcnzoo .*format='keras', expected 'fcnzoo-"):
        read()
    (tmp_path / name).write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{name} is not an fcnzoo .*format='list'"):
        read()
