"""A drop-in `conv_general_dilated` whose gradients XLA:CPU computes as matrix products.

XLA's CPU backend runs forward convolutions through a fast library kernel, but the gradient
with respect to the kernel (a convolution that contracts over the batch and the image) falls
to a much slower path: on the 2-core machine of docs/BENCHMARKS.md, for a batch of 128,
a 3x3 conv 32->32 at 28x28 takes 31 ms forward and 540 ms for its kernel gradient. The
same gradient written as one matrix product per kernel tap,

    dW[i, j] = x[:, i::s, j::s, :]^T  @  dy        ((C_in, N*H*W) @ (N*H*W, C_out)),

takes 110 ms; for few input channels (the first layer of an MNIST net) the im2col form
(all taps in one product) is faster still. The input gradient stays XLA's own.

`use_matmul_gradients(model)` sets this function on every `nnx.Conv` of a model (NNX lets a
Conv carry its own `conv_general_dilated`); the training loop does so on CPU. Results equal
`lax.conv_general_dilated`'s up to float rounding (tests/test_train.py). Cases it does not
cover (dilation, grouped or non-NHWC convolutions) go to `lax.conv_general_dilated` unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

# Up to this many (taps x input channels), gather all taps into one matrix (im2col):
# one big product beats many thin ones, and the patches are small.
IM2COL_MAX_DEPTH = 64


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated` with matmul gradients for 2-D NHWC/HWIO convolutions."""
    plain = (lhs.ndim == 4 and feature_group_count == 1 and not kwargs.get("preferred_element_type")
             and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and _is_nhwc(dimension_numbers, lhs.ndim))
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
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
    return jnp.concatenate(_taps(x, kernel_hw, out_hw, strides), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, precision):
    return _forward(x, w, strides, pads, precision)


def _forward(x, w, strides, pads, precision):
    kh, kw, cin, cout = w.shape
    if kh * kw * cin <= IM2COL_MAX_DEPTH:
        xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        ho = (xp.shape[1] - kh) // strides[0] + 1
        wo = (xp.shape[2] - kw) // strides[1] + 1
        patches = _im2col(xp, (kh, kw), (ho, wo), strides)
        return jnp.dot(patches, w.reshape(kh * kw * cin, cout), precision=precision)
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DN, precision=precision)


def _conv_fwd(x, w, strides, pads, precision):
    return _forward(x, w, strides, pads, precision), (x, w)


def _conv_bwd(strides, pads, precision, residuals, dy):
    x, w = residuals
    kh, kw, cin, cout = w.shape
    _, dx_fn = jax.vjp(lambda x: lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DN,
                                                          precision=precision), x)
    (dx,) = dx_fn(dy)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_hw = dy.shape[1:3]
    dy_rows = dy.reshape(-1, cout)
    if kh * kw * cin <= IM2COL_MAX_DEPTH:
        patches = _im2col(xp, (kh, kw), out_hw, strides).reshape(-1, kh * kw * cin)
        dw = jnp.dot(patches.T, dy_rows, precision=precision).reshape(kh, kw, cin, cout)
    else:
        dw = jnp.stack([jnp.dot(tap.reshape(-1, cin).T, dy_rows, precision=precision)
                        for tap in _taps(xp, (kh, kw), out_hw, strides)]).reshape(kh, kw, cin, cout)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def use_matmul_gradients(model: nnx.Module) -> int:
    """Make every `nnx.Conv` in `model` use this module's convolution; returns how many were changed."""
    changed = 0
    for _, module in model.iter_modules():
        if isinstance(module, nnx.Conv) and module.conv_general_dilated is lax.conv_general_dilated:
            module.conv_general_dilated = conv_general_dilated
            changed += 1
    return changed
