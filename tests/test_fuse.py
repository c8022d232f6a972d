"""Convolution epilogues in oneDNN's calls (zoo/fuse.py, `onednn.forward_post`) against the same
network without them.

References: `lax.conv_general_dilated` followed by jnp's add and jax.nn's activations, and the
network's own unfused, unfolded forward pass; which chains fuse is read off the architecture.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from convert.fold import fold_batchnorm
from zoo import cpu_conv, onednn
from zoo.fuse import conv_epilogues, fusions

NHWC = ("NHWC", "HWIO", "NHWC")
needs_onednn = pytest.mark.skipif(not onednn.available(), reason="the oneDNN library is not built (scripts/setup-env)")
ACTIVATIONS = {None: lambda v: v, "relu": jax.nn.relu, "swish": jax.nn.silu, "sigmoid": jax.nn.sigmoid}


@needs_onednn
@pytest.mark.parametrize("activation, residual, groups", [
    (None, True, 1), ("relu", False, 1), ("relu", True, 1), ("swish", False, 1), ("sigmoid", True, 1),
    ("swish", False, 12),  # depthwise
])
def test_forward_post_matches_lax(activation, residual, groups):
    kx, kw, kb, kr = jax.random.split(jax.random.key(groups + bool(residual)), 4)
    x = jax.random.normal(kx, (2, 11, 9, 12))
    w = jax.random.normal(kw, (3, 3, 12 // groups, 12)) / 6
    b, r = jax.random.normal(kb, (12,)), jax.random.normal(kr, (2, 6, 5, 12))
    strides, pads = (2, 2), ((1, 1), (1, 1))
    assert onednn.supports_post(x, w, strides, pads, groups, activation=activation, residual=residual)
    want = lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC, feature_group_count=groups) + b
    want = ACTIVATIONS[activation](want + r if residual else want)
    got = jax.jit(lambda x, w, b, r: onednn.forward_post(x, w, b, r if residual else None, strides, pads, groups,
                                                         activation))(x, w, b, r)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class Network(nnx.Module):
    """A residual block with a convolutional shortcut, a swish layer and a convolution whose output
    two ops read. x: (N, 24, 24, 16) -> (N, 24, 24, 32), (N, 32)."""

    def __init__(self, rngs):
        conv = lambda i, o: nnx.Conv(i, o, (3, 3), padding="SAME", use_bias=False, rngs=rngs)  # noqa: E731
        self.conv1, self.conv2, self.shortcut = conv(16, 32), conv(32, 32), conv(16, 32)
        self.bn1, self.bn2, self.bn_shortcut = (nnx.BatchNorm(32, use_running_average=True, rngs=rngs)
                                                for _ in range(3))
        self.conv3 = nnx.Conv(32, 32, (3, 3), padding="SAME", rngs=rngs)
        self.conv4 = conv(32, 32)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = nnx.relu(self.bn2(self.conv2(h)) + self.bn_shortcut(self.shortcut(x)))
        h = nnx.silu(self.conv3(h))
        h = self.conv4(h)
        return nnx.relu(h), h.mean(axis=(1, 2))


def randomized(network):
    rng = np.random.default_rng(0)
    for _, bn in nnx.iter_graph(network):
        if isinstance(bn, nnx.BatchNorm):
            for name, low, high in (("scale", 0.5, 1.5), ("bias", -0.3, 0.3), ("mean", -0.3, 0.3), ("var", 0.5, 1.5)):
                getattr(bn, name)[...] = jnp.asarray(rng.uniform(low, high, 32), jnp.float32)
    return network


def folded_network():
    """(unfused forward, its state, the folded network's forward, its state, x) of `Network`."""
    network = randomized(Network(nnx.Rngs(0)))
    cpu_conv.use_cpu_conv(network)
    graphdef, state = nnx.split(network)
    folded_graphdef, folded = nnx.split(fold_batchnorm(network, (24, 24, 16)))
    return (lambda s, x: nnx.merge(graphdef, s)(x), state, lambda s, x: nnx.merge(folded_graphdef, s)(x), folded,
            jax.random.normal(jax.random.key(1), (2, 24, 24, 16)))


@needs_onednn
def test_a_folded_network_fuses_its_epilogues_and_keeps_its_outputs():
    unfused, state, forward, folded, x = folded_network()
    # The block's two branches meet in one sum: the first convolution traced takes it and the ReLU,
    # the shortcut keeps its bias. conv4's output (no bias) is read twice: it stays as it is.
    assert fusions(forward, folded, x) == {"bias+relu": 1, "bias+sum+relu": 1, "bias": 1, "bias+swish": 1}
    assert str(jax.make_jaxpr(conv_epilogues(forward))(folded, x)).count(onednn._POST_TARGET) == 4
    want = jax.jit(unfused)(state, x)
    got = jax.jit(conv_epilogues(forward))(folded, x)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


@needs_onednn
def test_nothing_fuses_without_onednn_calls():
    network = Network(nnx.Rngs(0))  # no use_cpu_conv: lax's convolutions
    graphdef, state = nnx.split(network)
    forward = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    x = jnp.ones((2, 24, 24, 16))
    assert not fusions(forward, state, x)
    got, want = jax.jit(conv_epilogues(forward))(state, x), jax.jit(forward)(state, x)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@needs_onednn
def test_a_convolution_the_function_returns_is_left_alone():
    x, w = jnp.ones((2, 24, 24, 32)), jnp.ones((3, 3, 32, 32)) / 288
    conv = lambda x, w: cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)  # noqa: E731
    assert onednn._TARGETS["fwd"] in str(jax.make_jaxpr(conv)(x, w)) and not fusions(conv, x, w)
    returned_and_added = lambda x, w: (conv(x, w), conv(x, w) + 1.0)  # noqa: E731
    assert not fusions(returned_and_added, x, w)
    np.testing.assert_array_equal(jax.jit(conv_epilogues(conv))(x, w), jax.jit(conv)(x, w))


@needs_onednn
def test_zero_padding_before_a_convolution_becomes_its_padding():
    x = jax.random.normal(jax.random.key(2), (2, 25, 25, 64))
    w, b = jax.random.normal(jax.random.key(3), (3, 3, 64, 64)) / 24, jnp.linspace(-1, 1, 64)
    conv = lambda x: cpu_conv.conv_general_dilated(x, w, (2, 2), "VALID", dimension_numbers=NHWC)  # noqa: E731
    variants = {  # padding -> what fuses
        "zeros, bottom/right (EfficientNet's)": (lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))), "pad+bias+relu"),
        "lax.pad, all sides": (lambda x: lax.pad(x, 0.0, ((0, 0, 0), (1, 1, 0), (2, 1, 0), (0, 0, 0))), "pad+bias+relu"),
        "ones": (lambda x: jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=1.0), "bias+relu"),
        "over channels": (lambda x: jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 1)))[..., :64], "bias+relu"),
    }
    for name, (pad, fused) in variants.items():
        forward = lambda x, pad=pad: jax.nn.relu(conv(pad(x)) + b)  # noqa: E731
        assert fusions(forward, x) == {fused: 1}, name
        np.testing.assert_allclose(jax.jit(conv_epilogues(forward))(x), jax.jit(forward)(x), rtol=1e-5, atol=1e-5,
                                   err_msg=name)


@needs_onednn
def test_a_chain_onednn_cannot_take_whole_fuses_its_longest_part_it_can(monkeypatch):
    unfused, state, forward, folded, x = folded_network()
    supports = onednn.supports_post
    monkeypatch.setattr(onednn, "supports_post",
                        lambda *args, activation=None, **kw: activation != "swish" and supports(
                            *args, activation=activation, **kw))
    assert fusions(forward, folded, x) == {"bias+relu": 1, "bias+sum+relu": 1, "bias": 2}  # conv3: no swish
    want = jax.jit(unfused)(state, x)
    for a, b in zip(jax.jit(conv_epilogues(forward))(folded, x), want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
