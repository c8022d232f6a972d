"""A drop-in `conv_general_dilated` that XLA:CPU runs faster, as matrix products where they win.

Measured on the 2-core machine of docs/BENCHMARKS.md (batch 8 at 56x56 unless noted):
  - 1x1 convolutions (half of ResNet-50's FLOPs) run as one matrix product: 64->256 takes
    15 ms instead of 31 ms forward;
  - the kernel gradient (a convolution that contracts over the batch and the image) falls to
    a slow path in XLA:CPU: 540 ms for that 1x1 conv, 540 ms for a 3x3 32->32 at 28x28 with
    batch 128. Written as one product per kernel tap,
        dW[i, j] = x[:, i::s, j::s, :]^T  @  dy     ((C_in, N*H*W) @ (N*H*W, C_out)),
    it takes 120 ms and 110 ms;
  - kernels over few input channels (an MNIST net's first layer) run as im2col products,
    forward and backward (1 ms instead of 6 ms forward for 1->16 at 28x28, batch 128);
  - depthwise convolutions (EfficientNet, Xception) run as a sum of shifted views times
    per-channel weights: 8 ms instead of 198 ms forward for 3x3 over 112x112x32.
Other convolutions keep XLA's forward kernel and input gradient.

`use_cpu_conv(model)` sets this function on every `nnx.Conv` of a model (an NNX Conv may
carry its own `conv_general_dilated`); `zoo.create_model` does so for every zoo model. On
other backends, and for what it does not cover (dilation, groups other than depthwise, layouts other than
NHWC/HWIO), it is `lax.conv_general_dilated` unchanged. Results equal XLA's convolution up to
float rounding (tests/test_cpu_conv.py).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

_ENABLED = [True]


def enabled() -> bool:
    """Whether the CPU fast paths apply to what is traced now (see `xla_ops_only`)."""
    return _ENABLED[0] and jax.default_backend() == "cpu"


@contextlib.contextmanager
def xla_ops_only():
    """Within this block, trace convolutions and max-pooling with XLA's own operations.

    The reference side of scripts/bench_cpu_conv.py and of the tests; it acts at trace time,
    so use it around the first call of a freshly jitted function.
    """
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = True


# Up to this many (taps x input channels), gather all taps into one matrix (im2col):
# one big product beats many thin ones, and the patches are small.
IM2COL_MAX_DEPTH = 64


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated`, as matrix products on CPU where they are faster (module docstring)."""
    plain = (enabled() and lhs.ndim == 4 and all(v is None for v in kwargs.values())
             and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and _is_nhwc(dimension_numbers, lhs.ndim))
    depthwise = feature_group_count == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[2] == 1
    if not plain or (feature_group_count != 1 and not depthwise):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if depthwise:
        return _depthwise(lhs, rhs, strides, pads)
    return _conv(lhs, rhs, strides, pads, precision)


def _is_nhwc(dimension_numbers, ndim) -> bool:
    if dimension_numbers is None:
        return False
    dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
    return dn == lax.conv_dimension_numbers((1,) * 4, (1,) * 4, ("NHWC", "HWIO", "NHWC"))


_DN = ("NHWC", "HWIO", "NHWC")


def _taps(x, kernel_hw, out_hw, strides):
    """The (kh * kw) strided views of the padded input that meet each kernel tap: each (N, Ho, Wo, C)."""
    (kh, kw), (ho, wo), (sh, sw) = kernel_hw, out_hw, strides
    return [lax.slice(x, (0, i, j, 0), (x.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, x.shape[3]),
                      (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def _im2col(x, kernel_hw, out_hw, strides):
    """(N, Ho, Wo, kh * kw * C): every tap's view side by side, in HWIO kernel order."""
    taps = _taps(x, kernel_hw, out_hw, strides)
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _uses_dot(kernel_shape) -> bool:
    """1x1 kernels, and kernels over few input channels, run as (im2col) matrix products."""
    kh, kw, cin, _ = kernel_shape
    return kh == kw == 1 or kh * kw * cin <= IM2COL_MAX_DEPTH


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, precision):
    return _forward(x, w, strides, pads, precision)


def _forward(x, w, strides, pads, precision):
    kh, kw, cin, cout = w.shape
    if not _uses_dot(w.shape):
        return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DN, precision=precision)
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_hw = ((padded.shape[1] - kh) // strides[0] + 1, (padded.shape[2] - kw) // strides[1] + 1)
    patches = _im2col(padded, (kh, kw), out_hw, strides)
    return jnp.dot(patches, w.reshape(kh * kw * cin, cout), precision=precision)


def _conv_fwd(x, w, strides, pads, precision):
    return _forward(x, w, strides, pads, precision), (x, w)


def _conv_bwd(strides, pads, precision, residuals, dy):
    x, w = residuals
    kh, kw, cin, cout = w.shape
    # The input gradient of either forward form, as autodiff writes it (a transposed
    # convolution, or a matrix product and a strided pad).
    _, input_grad = jax.vjp(lambda x: _forward(x, w, strides, pads, precision), x)
    (dx,) = input_grad(dy)
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    dy_rows = dy.reshape(-1, cout)
    by_rows = (((0,), (0,)), ((), ()))  # contract over the N*H*W rows of both
    taps = _taps(padded, (kh, kw), dy.shape[1:3], strides)
    if _uses_dot(w.shape):
        patches = jnp.concatenate(taps, axis=-1).reshape(-1, kh * kw * cin)
        dw = lax.dot_general(patches, dy_rows, by_rows, precision=precision)
    else:
        dw = jnp.stack([lax.dot_general(tap.reshape(-1, cin), dy_rows, by_rows, precision=precision)
                        for tap in taps])
    return dx.astype(x.dtype), dw.reshape(kh, kw, cin, cout).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _depthwise(x, w, strides, pads):
    """Depthwise convolution (one kh x kw filter per channel): x (N, H, W, C), w (kh, kw, 1, C).

    A sum over kernel taps of shifted views times per-channel weights: one fused elementwise
    pass, and autodiff's gradient of it is elementwise too. XLA:CPU's grouped convolution is
    10-25x slower forward and 3-12x slower backward (EfficientNet-B0's layers, batch 8).
    """
    kh, kw, _, _ = w.shape
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_hw = ((padded.shape[1] - kh) // strides[0] + 1, (padded.shape[2] - kw) // strides[1] + 1)
    taps = _taps(padded, (kh, kw), out_hw, strides)
    return sum(tap * w[i // kw, i % kw, 0] for i, tap in enumerate(taps))


def use_cpu_conv(model: nnx.Module) -> int:
    """Make every `nnx.Conv` in `model` use this module's convolution; returns how many were changed."""
    changed = 0
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Conv) and module.conv_general_dilated is lax.conv_general_dilated:
            module.conv_general_dilated = conv_general_dilated
            changed += 1
    return changed
