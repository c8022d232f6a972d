"""oneDNN convolutions (zoo/onednn.py, zoo/native/onednn_conv.cc) against XLA's, and zoo's fallback without them.

Reference: `lax.conv_general_dilated`, differentiated by JAX, on the same inputs. The library is
built by scripts/setup-env (scripts/build-onednn); where it is not, the comparisons skip and the
fallback tests still run.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export, lax

from zoo import cpu_conv, onednn

NHWC = ("NHWC", "HWIO", "NHWC")
needs_onednn = pytest.mark.skipif(not onednn.available(), reason="the oneDNN library is not built (scripts/setup-env)")


def value_and_grads(conv, x, w, reference=None):
    """conv's value and (input, kernel) gradients; with a reference conv, both sides from one jit."""
    def side(conv):
        # a nonlinear read-out so every output element gets its own cotangent
        return jax.value_and_grad(lambda x, w: jnp.sin(conv(x, w)).sum(), argnums=(0, 1))

    if reference is None:
        return jax.jit(side(conv))(x, w)
    return jax.jit(lambda x, w: (side(conv)(x, w), side(reference)(x, w)))(x, w)


def assert_close(ours, ref):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5 * float(jnp.abs(b).max()))


@needs_onednn
@pytest.mark.parametrize("shape, kernel, cout, strides, pads, groups", [
    ((2, 13, 10, 5), 3, 7, (2, 2), ((1, 1), (0, 1)), 1),     # odd sizes, strided, asymmetric padding
    ((2, 9, 11, 3), 7, 8, (2, 2), ((3, 3), (3, 2)), 1),      # a stem: 7x7/2 over 3 channels
    ((2, 8, 9, 1), 3, 4, (1, 1), ((0, 2), (2, 0)), 1),       # one input channel, asymmetric padding
    ((1, 9, 9, 16), 7, 32, (1, 1), ((0, 0), (0, 0)), 1),     # fc6-like VALID 7x7
    ((2, 9, 8, 6), 3, 6, (2, 1), ((1, 1), (1, 1)), 6),       # depthwise, different strides per axis
    ((2, 8, 8, 8), 3, 12, (1, 1), ((1, 1), (1, 1)), 2),      # two groups
])
def test_conv_and_gradients_match_xla(shape, kernel, cout, strides, pads, groups):
    kx, kw = jax.random.split(jax.random.key(sum(shape) + kernel))
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, (kernel, kernel, shape[3] // groups, cout)) / np.sqrt(kernel * kernel * shape[3])
    assert onednn.supports(x, w, strides, pads, groups)
    assert_close(*value_and_grads(lambda x, w: onednn.conv(x, w, strides, pads, groups), x, w,
                                  lambda x, w: lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC,
                                                                        feature_group_count=groups)))


@needs_onednn
@pytest.mark.parametrize("plan", [(True, False, False), (False, True, False), (False, False, True)])
def test_each_part_can_be_onednn_alone(plan, monkeypatch):
    # cpu_conv mixes oneDNN's forward, input gradient and kernel gradient with its own paths.
    monkeypatch.setattr(cpu_conv, "MIN_WORK", 0)
    monkeypatch.setattr(cpu_conv, "_onednn_plan", lambda *args: plan)
    x = jax.random.normal(jax.random.key(0), (2, 9, 10, 12))
    w = jax.random.normal(jax.random.key(1), (3, 3, 12, 8)) / 6

    def conv(x, w):
        return cpu_conv.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=NHWC)

    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: conv(x, w).sum(), argnums=(0, 1)))(x, w))
    for used, target in zip(plan, onednn._TARGETS.values()):
        assert (target in jaxpr) == used
    assert_close(*value_and_grads(conv, x, w, lambda x, w: lax.conv_general_dilated(x, w, (2, 2), "SAME",
                                                                                     dimension_numbers=NHWC)))


@needs_onednn
def test_training_steps_send_large_convolutions_to_onednn_and_inference_its_forward():
    x = jax.ShapeDtypeStruct((8, 56, 56, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)
    conv = lambda x, w: cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)  # noqa: E731
    grads = jax.grad(lambda x, w: conv(x, w).sum(), argnums=(0, 1))
    assert all(target in str(jax.make_jaxpr(grads)(x, w)) for target in onednn._TARGETS.values())
    assert "fcnzoo_onednn_conv_fwd" in str(jax.make_jaxpr(conv)(x, w))  # inference: the forward
    pointwise = jax.ShapeDtypeStruct((1, 1, 64, 256), jnp.float32)
    assert "fcnzoo_onednn_conv_fwd" in str(jax.make_jaxpr(conv)(x, pointwise))  # 1x1 too
    # An MNIST net's 32->32 at 14x14: XLA's forward in inference, oneDNN's in training; at 56x56 oneDNN's.
    narrow = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)
    small = jax.ShapeDtypeStruct((128, 14, 14, 32), jnp.float32)
    assert "fcnzoo_onednn" not in str(jax.make_jaxpr(conv)(small, narrow))
    assert "fcnzoo_onednn_conv_fwd" in str(jax.make_jaxpr(grads)(small, narrow))
    assert "fcnzoo_onednn_conv_fwd" in str(jax.make_jaxpr(conv)(jax.ShapeDtypeStruct((8, 56, 56, 32), jnp.float32),
                                                                narrow))
    # Depthwise ones below MIN_WORK too (XLA's: 12 ms for this one, oneDNN's 0.08 ms).
    depthwise = lambda x, w: cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC,  # noqa: E731
                                                           feature_group_count=1152)
    assert "fcnzoo_onednn_conv_fwd" in str(jax.make_jaxpr(depthwise)(jax.ShapeDtypeStruct((8, 7, 7, 1152), jnp.float32),
                                                                     jax.ShapeDtypeStruct((3, 3, 1, 1152), jnp.float32)))
    with cpu_conv.without_onednn():  # a fresh function: JAX caches traces by function
        assert "fcnzoo_onednn" not in str(jax.make_jaxpr(lambda x, w: grads(x, w))(x, w))


@needs_onednn
def test_dense_inputs_are_materialized_without_changing_values_or_gradients():
    x = jax.random.normal(jax.random.key(4), (4, 3, 3, 8))
    k = jax.random.normal(jax.random.key(5), (72, 5))

    def dense(dot, x, k):  # a pooled map flattened into a product, as a VGG's head
        y = jnp.maximum(x, 0).reshape(4, -1)
        return dot(y, k, (((1,), (0,)), ((), ())))

    ours = jax.jit(functools.partial(dense, cpu_conv.dot_general))
    assert "fcnzoo_materialize" in ours.lower(x, k).as_text()
    assert_close(*value_and_grads(lambda x, k: ours(x, k), x, k,
                                  functools.partial(dense, lambda a, b, dn: jnp.dot(a, b))))


def test_symbolic_sizes_keep_zoo_paths():
    # jax.export with symbolic sizes (zoo export): no custom call, which an export could not carry.
    h, w = export.symbolic_shape("h, w", constraints=("h >= 64", "w >= 64"))
    x = jax.ShapeDtypeStruct((8, h, w, 64), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda x, k: cpu_conv.conv_general_dilated(x, k, (1, 1), "SAME",
                                                                          dimension_numbers=NHWC))(x, k))
    assert "fcnzoo_onednn" not in jaxpr and "custom_vjp" in jaxpr


def test_falls_back_with_one_warning_when_the_library_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "LIBRARY", tmp_path / "missing.so")
    monkeypatch.setattr(onednn, "_state", {})
    monkeypatch.setattr(cpu_conv, "MIN_WORK", 0)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 16))
    w = jax.random.normal(jax.random.key(3), (3, 3, 16, 16)) / 12

    def conv(x, w):
        return cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)

    with pytest.warns(UserWarning, match="oneDNN convolutions unavailable") as caught:
        jaxpr = str(jax.make_jaxpr(conv)(x, w))
        jax.make_jaxpr(conv)(x, w)  # asked again: no second warning
    assert len(caught) == 1 and "fcnzoo_onednn" not in jaxpr and onednn.version() is None
    assert_close(*value_and_grads(conv, x, w, lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                                                     dimension_numbers=NHWC)))


def test_environment_variable_turns_it_off_silently(monkeypatch):
    monkeypatch.setenv("FCNZOO_ONEDNN", "0")
    monkeypatch.setattr(onednn, "_state", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not onednn.available()


@needs_onednn
@pytest.mark.parametrize("factor,pads,channels", [(2, (2, 2), (3, 3)), (4, (5, 5), (5, 2)), (2, (1, 2), (4, 6))])
def test_transposed_convolutions_are_onednn_and_equal_xla(factor, pads, channels):
    # The FCN decoders' learned upsampling (convert.segment.TransposedConv): a convolution over the
    # factor-dilated input, which XLA computes zeros included.
    x = jax.random.normal(jax.random.key(6), (2, 5, 7, channels[0]))
    k = jax.random.normal(jax.random.key(7), (2 * factor, 2 * factor, *channels)) / factor

    def upsample(conv):
        return lambda x, k: conv(x, k, (1, 1), [pads, pads], lhs_dilation=(factor, factor), dimension_numbers=NHWC)

    ours = upsample(cpu_conv.conv_general_dilated)
    assert "fcnzoo_onednn_conv_bwd_data" in str(jax.make_jaxpr(ours)(x, k))
    assert_close(*value_and_grads(ours, x, k, upsample(lax.conv_general_dilated)))


@needs_onednn
@pytest.mark.parametrize("shape, window, strides, pads", [
    ((2, 128, 128, 65), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pooling, odd channels
    ((2, 129, 127, 65), (2, 2), (2, 2), ((0, 0), (0, 0))),  # VGG's, odd sizes (the last row/column unseen)
    ((1, 183, 183, 64), (3, 3), (2, 2), ((0, 1), (0, 1))),  # Xception's SAME: asymmetric padding
])
def test_max_pooling_is_onednn_and_equals_xla_with_its_gradient(shape, window, strides, pads):
    x = jax.random.normal(jax.random.key(shape[1]), shape)
    assert x.size >= cpu_conv.ONEDNN_POOL_MIN_SIZE and onednn.supports_max_pool(x, window, strides, pads)
    pool = lambda x: cpu_conv.max_pool(x, window, strides, pads)  # noqa: E731
    assert onednn._POOL_TARGET in str(jax.make_jaxpr(pool)(x))
    reference = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),  # noqa: E731
                                            ((0, 0), *pads, (0, 0)))
    np.testing.assert_array_equal(jax.jit(pool)(x), reference(x))  # a maximum is exact
    assert_close(*(jax.jit(jax.grad(lambda x, f=f: jnp.sin(f(x)).sum()))(x) for f in (pool, reference)))
