"""The CPU fast paths (zoo/cpu_conv.py, zoo.layers.MaxPool) against XLA's own operations.

Reference: `lax.conv_general_dilated` and `nnx.max_pool` (reduce-window, whose gradient is
XLA's select-and-scatter), differentiated by JAX, on the same inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import zoo
from zoo import cpu_conv
from zoo.layers import MaxPool

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def every_size_takes_the_fast_path(monkeypatch):
    # The tests' operations are small; below cpu_conv.MIN_WORK / MIN_POOL_SIZE they would stay XLA's own.
    monkeypatch.setattr(cpu_conv, "MIN_WORK", 0)
    monkeypatch.setattr(cpu_conv, "MIN_POOL_SIZE", 0)


@pytest.fixture(params=["onednn", "xla-paths"])
def paths(request):
    """Run a test with zoo's oneDNN convolutions (where built; zoo/onednn.py) and without them."""
    if request.param == "onednn":
        yield
    else:
        with cpu_conv.without_onednn():
            yield


def value_and_grads(conv, x, w, strides, padding):
    def loss(x, w):  # a nonlinear read-out so every output element gets its own cotangent
        return jnp.sin(conv(x, w, strides, padding, dimension_numbers=NHWC)).sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("size, cin, cout, kernel, stride, padding", [
    (12, 1, 8, 3, 1, "SAME"),            # few input channels: im2col product
    (10, 16, 8, 3, 1, "SAME"),           # the kernel gradient as one product of im2col patches
    (11, 8, 4, 7, 2, "SAME"),            # ResNet-stem-like: 7x7, stride 2, odd size
    (9, 16, 8, 3, 2, "VALID"),
    (8, 40, 24, 1, 1, "VALID"),          # 1x1: one matrix product
    (9, 40, 24, 1, 2, "SAME"),           # strided 1x1 (ResNet shortcut)
    (9, 4, 4, 5, 1, ((2, 1), (0, 3))),   # explicit, asymmetric padding
])
def test_conv_matches_xla(size, cin, cout, kernel, stride, padding, paths):
    check_against_lax(size, cin, cout, kernel, stride, padding)


@pytest.mark.parametrize("size, cin, cout, kernel, stride, padding", [(10, 16, 8, 3, 1, "SAME"),
                                                                     (11, 8, 4, 7, 2, "SAME")])
def test_kernel_gradient_per_tap_matches_xla(size, cin, cout, kernel, stride, padding, monkeypatch):
    # Patches beyond KERNEL_GRAD_IM2COL_MAX: one product per kernel tap instead (XLA's paths only:
    # oneDNN would take these kernel gradients itself).
    monkeypatch.setattr(cpu_conv, "KERNEL_GRAD_IM2COL_MAX", 0)
    with cpu_conv.without_onednn():
        check_against_lax(size, cin, cout, kernel, stride, padding)


def check_against_lax(size, cin, cout, kernel, stride, padding):
    kx, kw = jax.random.split(jax.random.key(size * cin + kernel))
    x = jax.random.normal(kx, (3, size, size + 1, cin))
    w = jax.random.normal(kw, (kernel, kernel, cin, cout)) / np.sqrt(kernel * kernel * cin)
    ref_value, ref_grads = value_and_grads(lax.conv_general_dilated, x, w, (stride, stride), padding)
    value, grads = value_and_grads(cpu_conv.conv_general_dilated, x, w, (stride, stride), padding)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-4)
    for ours, ref in zip(grads, ref_grads):
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("size, channels, kernel, stride", [(9, 6, 3, 1), (9, 6, 3, 2), (10, 4, 5, 2)])
def test_depthwise_conv_matches_xla(size, channels, kernel, stride, paths):
    kx, kw = jax.random.split(jax.random.key(size + kernel))
    x = jax.random.normal(kx, (2, size, size, channels))
    w = jax.random.normal(kw, (kernel, kernel, 1, channels))
    results = []
    for conv in (lax.conv_general_dilated, cpu_conv.conv_general_dilated):
        grouped = functools.partial(conv, feature_group_count=channels)
        results.append(value_and_grads(grouped, x, w, (stride, stride), "SAME"))
    for ours, ref in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[0])):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


def test_small_operations_stay_xla_own(monkeypatch):
    monkeypatch.setattr(cpu_conv, "MIN_WORK", 1 << 22)
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    jaxpr = str(jax.make_jaxpr(lambda x, w: cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME",
                                                                          dimension_numbers=NHWC))(x, w))
    assert "conv_general_dilated" in jaxpr and "custom_vjp" not in jaxpr


def test_empty_maps_keep_xla_shapes():
    # zoo.output_shape probes inputs too small for a model: the map must come out empty, not fail.
    x = jax.ShapeDtypeStruct((1, 1, 1, 8), jnp.float32)
    w = jax.ShapeDtypeStruct((1, 1, 8, 4), jnp.float32)
    conv = jax.eval_shape(lambda x, w: cpu_conv.conv_general_dilated(x, w, (2, 2), "VALID", dimension_numbers=NHWC),
                          jnp.zeros((1, 0, 0, 8)), w)
    assert conv.shape == (1, 0, 0, 4)
    pooled = jax.eval_shape(lambda x: cpu_conv.max_pool(x, (3, 3), (2, 2), "VALID"), x)
    assert pooled.shape == (1, 0, 0, 8)


def test_conv_falls_back_for_what_it_does_not_cover():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 2, 6))  # two feature groups
    args = dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC,
                feature_group_count=2)
    np.testing.assert_array_equal(cpu_conv.conv_general_dilated(x, w, **args), lax.conv_general_dilated(x, w, **args))


def test_every_zoo_conv_uses_it_and_logits_do_not_change():
    model = zoo.create_model("lenet5", rngs=0)
    convs = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv)]
    assert convs and all(c.conv_general_dilated is cpu_conv.conv_general_dilated for c in convs)
    x = jax.random.normal(jax.random.key(2), (4, 32, 32, 1))
    ours = model(x)
    with cpu_conv.xla_ops_only():
        reference = model(x)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, window, strides, padding", [
    ((4, 12, 12, 3), 2, 2, "VALID"),           # windows tile the image: the reshape path
    ((4, 13, 11, 3), 2, 2, "VALID"),           # ... with a row and a column no window sees
    ((2, 15, 15, 3), 3, 2, "SAME"),            # overlapping windows (ResNet stem)
    ((2, 15, 14, 3), 3, 2, "VALID"),           # AlexNet
    ((2, 9, 9, 2), 3, 2, ((1, 1), (1, 1))),    # explicit padding
])
def test_max_pool_gradient_matches_select_and_scatter(shape, window, strides, padding):
    # Half-integers make ties common (as ReLU zeros do): the gradient must go to the first
    # maximum of each window, as select-and-scatter sends it, not be split among ties.
    x = jnp.round(2 * jax.random.normal(jax.random.key(3), shape)) / 2
    pool = MaxPool(window, strides, padding)

    def ours(x):
        return jnp.sin(pool(x)).sum()

    def reference(x):
        return jnp.sin(nnx.max_pool(x, pool.window, strides=pool.strides, padding=padding)).sum()

    np.testing.assert_array_equal(jax.jit(ours)(x), jax.jit(reference)(x))
    np.testing.assert_array_equal(jax.jit(jax.grad(ours))(x), jax.jit(jax.grad(reference))(x))
