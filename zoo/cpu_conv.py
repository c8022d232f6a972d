"""Convolutions and max-pooling that XLA:CPU runs faster: a drop-in `conv_general_dilated`
(matrix products where they win) and a max-pool with a cheaper gradient.

Measured on the 2-core machine of docs/BENCHMARKS.md (batch 8 at 56x56 unless noted):
  - 1x1 convolutions (half of ResNet-50's FLOPs) run as one matrix product: 64->256 takes
    15 ms instead of 31 ms forward alone (inside a whole model XLA finds this rewrite too);
  - the kernel gradient (a convolution that contracts over the batch and the image) falls to
    a slow path in XLA:CPU: 540 ms for that 1x1 conv, 540 ms for a 3x3 32->32 at 28x28 with
    batch 128. Written as one product per kernel tap,
        dW[i, j] = x[:, i::s, j::s, :]^T  @  dy     ((C_in, N*H*W) @ (N*H*W, C_out)),
    it takes 120 ms and 110 ms (and as one product of the im2col patches, while they are
    small, less: `KERNEL_GRAD_IM2COL_MAX`);
  - kernels over few input channels (an MNIST net's first layer) run as im2col products,
    forward and backward (1 ms instead of 6 ms forward for 1->16 at 28x28, batch 128);
  - depthwise convolutions (EfficientNet, Xception) run as a sum of shifted views times
    per-channel weights: 8 ms instead of 198 ms forward for 3x3 over 112x112x32;
  - max-pooling's gradient skips select-and-scatter (`max_pool`, used by `zoo.layers.MaxPool`);
  - in a training step, oneDNN (zoo/onednn.py, when built) runs most forward convolutions and their
    input and kernel gradients, depthwise ones included (`_onednn_plan` says which, and why);
    in inference the forward of the same ones, narrow ones over small maps excepted (`_conv`, `_grouped`),
    and large max-poolings' forward (`ONEDNN_POOL_MIN_SIZE`); `zoo.fuse` then runs a convolution's
    bias, residual sum and activation in its oneDNN call at inference.
Other convolutions keep XLA's forward kernel and input gradient, and so do small ones
(`MIN_WORK`; depthwise ones go to oneDNN at any size). Whole models, side by side:
scripts/bench_cpu_conv.py (ResNet-50 training step 1.9x, EfficientNet-B0 5.8x, Xception 4.1x).

`use_cpu_conv(model)` sets this function on every `nnx.Conv` of a model (an NNX Conv may
carry its own `conv_general_dilated`); `zoo.create_model` does so for every zoo model. On
other backends, and for what it does not cover (dilation, groups other than depthwise, layouts other than
NHWC/HWIO), it is `lax.conv_general_dilated` unchanged. Results equal XLA's convolution up to
float rounding (tests/test_cpu_conv.py).

Sizes may be symbolic (`jax.export` with symbolic height and width, `zoo export`): the paths
are the same, the padding stays an expression of the size, and a size the export's
constraints leave open counts as large (an exported network serves images of any size).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import export, lax
from jax.errors import InconclusiveDimensionOperation

from zoo import onednn

_ENABLED = [True]
_ONEDNN = [True]


def _dim(size):
    """A static size as an int; a symbolic one (jax.export) as it is."""
    return size if export.is_symbolic_dim(size) else int(size)


def _less(size, bound) -> bool:
    """size < bound for a size that may be symbolic; undecided by the export's constraints: False."""
    try:
        return bool(size < bound)
    except InconclusiveDimensionOperation:
        return False


def _is_zero(size) -> bool:
    """size == 0, only where that is certain (a symbolic size is not, unless it is the constant 0)."""
    return not export.is_symbolic_dim(size) and int(size) == 0


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


@contextlib.contextmanager
def without_onednn():
    """Within this block, trace convolutions with zoo's XLA paths only (no oneDNN custom calls):
    the reference side of scripts/bench_onednn.py. Acts at trace time, like `xla_ops_only`."""
    _ONEDNN[0] = False
    try:
        yield
    finally:
        _ONEDNN[0] = True


# Below this many multiply-adds (for pooling: input elements) an operation stays XLA's own:
# it is fast enough there, and fewer, larger operations compile faster (the test suite's
# EfficientNet-B0 forward/backward at 32x32 compiles in 12 s instead of 24 s).
MIN_WORK = 1 << 22
MIN_POOL_SIZE = 1 << 18  # input elements (an MNIST net's batch of 128 pools 1.6 M)
# From this many input elements, oneDNN runs max pooling's forward pass: batch 8, 3x3/2 over ResNet-50's
# 112x112x64 in 1.5 ms, XLA's reduce_window in 8.6 ms (Xception's 147x147x128: 4.2 and 26 ms). It wins
# alone on smaller maps too, but inside an MNIST net's inference (batch 128; pools of 1.6 M and 0.8 M
# between XLA's convolutions) the call took 6.1 ms with both on oneDNN and 3.5 ms with neither.
ONEDNN_POOL_MIN_SIZE = 1 << 21

# Up to this many (taps x input channels), gather all taps into one matrix (im2col):
# one big product beats many thin ones, and the patches are small.
IM2COL_MAX_DEPTH = 64

# Up to this many patch elements (N x Ho x Wo x taps x C_in), a kernel gradient XLA computes (without
# oneDNN, or where it does not take the convolution) is one product of the im2col patches with dy
# rather than one product per tap: ResNet-50's 7x7 stem
# (batch 8: 59 MB of patches) made the training step 1.15x faster, an MNIST net's narrow layers
# 1.11x, Xception's 32->64 1.04x (per tap, XLA:CPU splits each long product into many small
# oneDNN sgemm calls, each taking a workspace from malloc). Beyond it, the per-tap products save the
# memory (a batch of 256 would need 1.9 GB of patches for that stem).
KERNEL_GRAD_IM2COL_MAX = 1 << 26


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated`, as matrix products on CPU where they are faster (module docstring)."""
    plain = (enabled() and lhs.ndim == 4 and all(v is None for v in kwargs.values())
             and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and _is_nhwc(dimension_numbers, lhs.ndim))
    depthwise = feature_group_count == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[2] == 1
    if (not plain and enabled() and lhs.ndim == 4 and _is_nhwc(dimension_numbers, lhs.ndim)
            and feature_group_count == 1 and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and all(v is None for v in kwargs.values()) and not isinstance(padding, str)):
        upsampled = _dilated_input_conv(lhs, rhs, tuple(lhs_dilation or (1, 1)), padding, tuple(window_strides))
        if upsampled is not None:
            return upsampled
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((_dim(lo), _dim(hi)) for lo, hi in padding)
    out_hw = _out_size(lhs.shape[1:3], rhs.shape[:2], strides, pads)
    small = _less(lhs.shape[0] * out_hw[0] * out_hw[1] * rhs.size, MIN_WORK)
    if small and depthwise and _onednn_plan(lhs, rhs, strides, pads, feature_group_count) is not None:
        # Not for depthwise ones: XLA:CPU runs them as one tiny product per channel (batch 8, 3x3
        # over 7x7x1152: 12 ms, oneDNN's 0.08 ms; 3x3/2 over 29x29x240: 8.8 ms and 0.10 ms).
        small = False
    if any(_less(n, 1) for n in out_hw) or small:
        # Small (or empty: zoo.output_shape probes too-small inputs) convolutions: XLA's op.
        return _xla_conv(lhs, rhs, strides, pads, dimension_numbers=dimension_numbers,
                         feature_group_count=feature_group_count, precision=precision)
    if (_ONEDNN[0] and all(s == 1 for s in rhs.shape[:2]) and any(s != 1 for s in strides)
            and all(_is_zero(p) for p in sum(pads, ())) and not any(map(export.is_symbolic_dim, lhs.shape))
            and onednn.available()):
        # A strided 1x1 convolution (ResNet's shortcuts) reads every s-th pixel: slice them, then
        # convolve with stride 1, which oneDNN runs faster than strided (autodiff pads the gradient back).
        lhs = lhs[:, ::strides[0], ::strides[1], :]
        strides = (1, 1)
    plan = _onednn_plan(lhs, rhs, strides, pads, feature_group_count)
    if plan is not None and feature_group_count != 1:
        return _grouped(lhs, rhs, strides, pads, feature_group_count, plan[0])
    if feature_group_count != 1 and not depthwise:  # other grouped convolutions: XLA's
        return _xla_conv(lhs, rhs, strides, pads, dimension_numbers=dimension_numbers,
                         feature_group_count=feature_group_count, precision=precision)
    if depthwise:
        return _depthwise(lhs, rhs, strides, pads)
    return _conv(lhs, rhs, strides, pads, precision, plan or (False, False, False))


def _dilated_input_conv(x, k, dilation, padding, strides):
    """A convolution over the stride-dilated input (a transposed convolution: the FCN decoders'
    learned upsampling) as oneDNN's input gradient of the strided convolution it transposes, or
    None where that does not apply. XLA:CPU convolves the dilated input, zeros included: for an
    FCN-32s decoder (kernel 64, stride 32) that is 1024 times the work.

    y = conv(x dilated by s, k, padding (pl, ph)) is the input gradient of a stride-s convolution
    with the kernel k flipped and its in/out channels swapped, padding (kh - 1 - pl, kh - 1 - ph).
    """
    if (not _ONEDNN[0] or all(d == 1 for d in dilation) or any(s != 1 for s in strides)
            or x.dtype != jnp.float32 or any(export.is_symbolic_dim(d) for d in (*x.shape, *k.shape))):
        return None
    kh, kw = k.shape[:2]
    (pl_h, ph_h), (pl_w, ph_w) = ((int(lo), int(hi)) for lo, hi in padding)
    pads = ((kh - 1 - pl_h, kh - 1 - ph_h), (kw - 1 - pl_w, kw - 1 - ph_w))
    out_hw = tuple((n - 1) * d + 1 + lo + hi - size + 1
                   for n, d, (lo, hi), size in zip(x.shape[1:3], dilation, padding, (kh, kw)))
    out_shape = (x.shape[0], *out_hw, k.shape[3])
    forward_kernel = jax.ShapeDtypeStruct((kh, kw, k.shape[3], k.shape[2]), k.dtype)
    if (min(*out_hw) < 1 or any(p < 0 for p in sum(pads, ()))
            or not onednn.supports(jax.ShapeDtypeStruct(out_shape, x.dtype), forward_kernel, dilation, pads)
            or _out_size(out_hw, (kh, kw), dilation, pads) != tuple(x.shape[1:3])):
        return None
    return _transposed(x, k, dilation, pads, out_shape)


def _forward_kernel(k):
    """The kernel of the strided convolution that `_transposed` transposes: flipped, I and O swapped."""
    return jnp.transpose(k[::-1, ::-1], (0, 1, 3, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _transposed(x, k, strides, pads, out_shape):
    return onednn.input_grad(x, _forward_kernel(k), out_shape, strides, pads)


def _transposed_fwd(x, k, strides, pads, out_shape):
    return _transposed(x, k, strides, pads, out_shape), (x, k)


def _transposed_bwd(strides, pads, out_shape, residuals, dy):
    # y is the adjoint of the strided convolution F(., w): dx = F(dy, w), and its kernel gradient is
    # F's kernel gradient with dy as F's input and x as F's output gradient.
    x, k = residuals
    w = _forward_kernel(k)
    dx = onednn.forward(dy, w, strides, pads)
    dw = onednn.kernel_grad(dy, x, w.shape, strides, pads)
    return dx, _forward_kernel(dw)


_transposed.defvjp(_transposed_fwd, _transposed_bwd)


def _onednn_plan(x, w, strides, pads, groups):
    """Which of (forward, input gradient, kernel gradient) oneDNN runs in a training step, or None
    for none of them (in inference the forward where it runs it in training: `_conv`).

    From scripts/bench_onednn.py (batch 8, ResNet/VGG/EfficientNet/Xception/MNIST layers; current
    path time / oneDNN's): oneDNN's forward is 1.1-1.4x faster on 3x3 and 1x1 kernels and 2.5x
    on an FCN's 7x7x512->4096 fc6, its input gradient 1.1-3.3x, its kernel gradient 1.6-4.5x
    (3.4x on a 3x3 64->64 at 56x56); depthwise 1.3-2.3x forward, 1.3-16x and 4-11x backward;
    few-channel stems 1.8x (ResNet's 7x7/2, 9.8 -> 5.4 ms) and 3.0x (AlexNet's 11x11/4), with
    freed memory retained (with glibc's page faults the 7x7/2 lost, 0.56x), and so are the kernel
    gradients of narrow layers over small maps (batch 128: MNIST's 16->32 and 32->32 at 14x14,
    32->64 at 7x7 in 0.9, 1.8 and 0.7 ms against 4.8, 8.9 and 2.3 ms as XLA's product of the im2col
    patches; the MNIST net's training step 25.8 -> 19.3 ms; with page faults they had lost, 0.43x).
    It loses on the input gradient of a one-channel 3x3 (0.27x: the im2col product's stays; a first
    layer's input gradient is rarely needed).
    """
    if not _ONEDNN[0] or not onednn.supports(x, w, strides, pads, groups):
        return None
    if groups != 1:
        return True, True, True
    kh, kw, cin, cout = w.shape
    im2col = kh * kw * cin <= IM2COL_MAX_DEPTH
    input_grad = not im2col or kh == kw == 1
    return True, input_grad, True


def _xla_conv(x, w, strides, pads, **kwargs):
    """XLA's convolution (NHWC) with explicit padding, which lax takes as ints only: padding that is an
    expression of a symbolic size is applied first as zeros, then the convolution is VALID."""
    if any(export.is_symbolic_dim(p) for p in sum(pads, ())):
        x, pads = jnp.pad(x, ((0, 0), *pads, (0, 0))), ((0, 0), (0, 0))
    return lax.conv_general_dilated(x, w, strides, pads, **kwargs)


def _out_size(in_hw, kernel_hw, strides, pads):
    return tuple((size + lo + hi - k) // s + 1 for size, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, pads))


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, pads, precision, plan):
    """The convolution; plan: whether oneDNN runs the (forward, input gradient, kernel gradient) of a
    training step. Not differentiated (inference), oneDNN runs the forward of the same convolutions,
    except narrow ones over small maps (`_narrow_on_small_map`). Whole models, inference at batch 8:
    ResNet-50 1.14x, Xception 1.29x, VGG-16 1.49x faster than XLA's convolutions, EfficientNet-B0
    and an MNIST net unchanged (docs/BENCHMARKS.md, "oneDNN in inference"); VGG-16 needs
    `dot_general`'s materialized input. 1x1 kernels too, since freed memory is retained
    (zoo/allocator.py): Xception 1.09x, ResNet-50 1.00-1.02x, EfficientNet-B0 1.00-1.04x against
    XLA's fused matrix products (with glibc's page faults they lost: ResNet-50 0.97x)."""
    if plan[0] and not _narrow_on_small_map(x, w, strides, pads):
        return onednn.forward(x, w, strides, pads)
    return _forward(x, w, strides, pads, precision)


def _narrow_on_small_map(x, w, strides, pads) -> bool:
    """A convolution whose inference forward XLA runs faster than oneDNN: few channels in and out
    (in x out <= 2048, not an im2col product) over an output of at most 16x16 pixels. Measured in an
    MNIST net's inference (batch 128; 16->32 and 32->32 at 14x14, 32->64 at 7x7), these layers on XLA
    made the call 1.08-1.19x faster; Xception's 32->64 at 147x147 is 1.08x faster on oneDNN."""
    kh, kw, cin, cout = w.shape
    out_h, out_w = _out_size(x.shape[1:3], (kh, kw), strides, pads)
    return kh * kw * cin > IM2COL_MAX_DEPTH and cin * cout <= 2048 and _less(out_h * out_w, 257)


def _forward(x, w, strides, pads, precision, use_onednn=False):
    kh, kw, cin, cout = w.shape
    if use_onednn:
        return onednn.forward(x, w, strides, pads)
    if not _uses_dot(w.shape):
        return _xla_conv(x, w, strides, pads, dimension_numbers=_DN, precision=precision)
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_hw = ((padded.shape[1] - kh) // strides[0] + 1, (padded.shape[2] - kw) // strides[1] + 1)
    patches = _im2col(padded, (kh, kw), out_hw, strides)
    return jnp.dot(patches, w.reshape(kh * kw * cin, cout), precision=precision)


def _conv_fwd(x, w, strides, pads, precision, plan):
    return _forward(x, w, strides, pads, precision, plan[0]), (x, w)


def _conv_bwd(strides, pads, precision, plan, residuals, dy):
    x, w = residuals
    kh, kw, cin, cout = w.shape
    if plan[1]:
        dx = onednn.input_grad(dy, w, x.shape, strides, pads)
    elif _uses_dot(w.shape) or any(export.is_symbolic_dim(d) for d in (*x.shape, *dy.shape)):
        # The input gradient of the matrix-product form as autodiff writes it (a product and a
        # strided pad); under symbolic sizes the transposed convolution autodiff writes.
        _, input_grad = jax.vjp(lambda x: _forward(x, w, strides, pads, precision), x)
        (dx,) = input_grad(dy)
    else:
        dx = _transposed_conv(dy, w, x.shape[1:3], strides, pads, precision)
    if plan[2]:
        return dx.astype(x.dtype), onednn.kernel_grad(x, dy, w.shape, strides, pads)
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    if any(export.is_symbolic_dim(d) for d in dy.shape):
        # lax cannot always prove a symbolic N*H*W >= 0 for a reshape: contract over (N, H, W) as they are.
        as_rows, by_rows = (lambda a: a), (((0, 1, 2), (0, 1, 2)), ((), ()))
    else:
        as_rows, by_rows = (lambda a: a.reshape(-1, a.shape[-1])), (((0,), (0,)), ((), ()))  # the N*H*W rows
    dy_rows = as_rows(dy)
    taps = _taps(padded, (kh, kw), dy.shape[1:3], strides)
    patch_elements = dy.shape[0] * dy.shape[1] * dy.shape[2] * kh * kw * cin
    if _uses_dot(w.shape) or _less(patch_elements, KERNEL_GRAD_IM2COL_MAX):
        patches = as_rows(jnp.concatenate(taps, axis=-1))
        dw = lax.dot_general(patches, dy_rows, by_rows, precision=precision)
    else:
        dw = jnp.stack([lax.dot_general(as_rows(tap), dy_rows, by_rows, precision=precision) for tap in taps])
    return dx.astype(x.dtype), dw.reshape(kh, kw, cin, cout).astype(w.dtype)


def _transposed_conv(dy, w, in_hw, strides, pads, precision):
    """dx of y = conv(x, w) (NHWC, HWIO): dy (N, Ho, Wo, O) -> (N, H, W, I), one convolution of the
    stride-dilated dy with the flipped kernel, its I and O swapped in memory.

    Autodiff writes the same convolution with the swap in its dimension numbers (kernel "01oi"),
    and where the step runs inside a loop (`lax.scan`: train.loop's accumulation or steps_per_call > 1)
    XLA:CPU keeps that form, which its fast convolution does not take: the generic loop it falls back to
    made an MNIST net's training step 2.5x slower. The optimization barrier keeps XLA from folding
    the transpose back into the dimension numbers.
    """
    kh, kw = w.shape[:2]
    flipped = lax.optimization_barrier(jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2)))
    padding = []
    for size, k, s, (lo, _), out in zip(in_hw, (kh, kw), strides, pads, dy.shape[1:3]):
        before = k - 1 - lo
        padding.append((before, size + k - 1 - ((out - 1) * s + 1) - before))
    return lax.conv_general_dilated(dy, flipped, (1, 1), padding, lhs_dilation=strides, dimension_numbers=_DN,
                                    precision=precision)


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _grouped(x, w, strides, pads, groups, onednn_forward):
    """A grouped (or depthwise) convolution whose gradients are oneDNN's, and its forward too when
    onednn_forward (inference included: EfficientNet-B0 and Xception 1.04-1.05x)."""
    if onednn_forward:
        return onednn.forward(x, w, strides, pads, groups)
    if groups == x.shape[-1] == w.shape[-1]:
        return _depthwise(x, w, strides, pads)
    return _xla_conv(x, w, strides, pads, dimension_numbers=_DN, feature_group_count=groups)


def _grouped_fwd(x, w, strides, pads, groups, onednn_forward):
    return _grouped(x, w, strides, pads, groups, onednn_forward), (x, w)


def _grouped_bwd(strides, pads, groups, onednn_forward, residuals, dy):
    x, w = residuals
    return (onednn.input_grad(dy, w, x.shape, strides, pads, groups),
            onednn.kernel_grad(x, dy, w.shape, strides, pads, groups))


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


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


def max_pool(x, window, strides, padding):
    """Max pooling, x (N, H, W, C) -> (N, H', W', C); padding "VALID", "SAME" or ((t, b), (l, r)).

    XLA:CPU's gradient of max pooling (select-and-scatter) is slow: 30 ms for a batch of 128 at
    28x28x16, against 0.5 ms forward. `_max_pool_grad` gives the same gradient (to the first
    maximum of each window, in row-major order, as select-and-scatter does) with one comparison
    and one strided pad per window position (10 ms).
    """
    window, strides = tuple(window), tuple(strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], window, strides, padding)
    pads = tuple((_dim(lo), _dim(hi)) for lo, hi in padding)
    out_hw = _out_size(x.shape[1:3], window, strides, pads)
    if any(_less(n, 1) for n in out_hw) or _less(x.size, MIN_POOL_SIZE):
        return _reduce_max(x, window, strides, pads)  # small or empty: XLA's own gradient
    return _max_pool(x, window, strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
    """XLA's max pooling with `_max_pool_grad` as its gradient; pads ((top, bottom), (left, right))."""
    return _reduce_max(x, window, strides, pads)


def _reduce_max(x, window, strides, pads):
    if _ONEDNN[0] and not _less(x.size, ONEDNN_POOL_MIN_SIZE) and onednn.supports_max_pool(x, window, strides, pads):
        return onednn.max_pool(x, window, strides, pads)
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),
                             ((0, 0), *pads, (0, 0)))


def _max_pool_forward(x, window, strides, pads):
    y = _reduce_max(x, window, strides, pads)
    return y, (x, y)


def _max_pool_grad(window, strides, pads, residuals, dy):
    x, y = residuals
    if tuple(window) == tuple(strides) and all(_is_zero(p) for p in sum(pads, ())):
        return (_tiled_max_pool_grad(x, y, dy, window),)
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    n, hp, wp, c = padded.shape
    ho, wo = y.shape[1:3]
    (sh, sw), span_h, span_w = strides, (ho - 1) * strides[0] + 1, (wo - 1) * strides[1] + 1
    grad = jnp.zeros_like(padded)
    unclaimed = jnp.ones(y.shape, bool)
    for i in range(window[0]):
        for j in range(window[1]):
            tap = lax.slice(padded, (0, i, j, 0), (n, i + span_h, j + span_w, c), (1, sh, sw, 1))
            hit = unclaimed & (tap == y)
            unclaimed = unclaimed & ~hit
            # Scatter back to the tap's strided positions: the transpose of the strided slice.
            grad = grad + lax.pad(jnp.where(hit, dy, 0).astype(x.dtype), jnp.zeros((), x.dtype),
                                  ((0, 0, 0), (i, hp - i - span_h, sh - 1), (j, wp - j - span_w, sw - 1),
                                   (0, 0, 0)))
    (top, _), (left, _) = pads
    return (grad[:, top:top + x.shape[1], left:left + x.shape[2], :],)


def _tiled_max_pool_grad(x, y, dy, window):
    """`_max_pool_grad` for windows that tile the image (stride = window, no padding): the
    windows are a reshape away, so no strided scatter is needed (about 2x faster again)."""
    n, h, w, c = x.shape
    (kh, kw), (ho, wo) = window, y.shape[1:3]
    tiles = x[:, :ho * kh, :wo * kw].reshape(n, ho, kh, wo, kw, c)
    unclaimed = jnp.ones(y.shape, bool)
    rows = []
    for i in range(kh):
        row = []
        for j in range(kw):
            hit = unclaimed & (tiles[:, :, i, :, j] == y)
            unclaimed = unclaimed & ~hit
            row.append(jnp.where(hit, dy, 0).astype(x.dtype))
        rows.append(jnp.stack(row, axis=3))
    grad = jnp.stack(rows, axis=2).reshape(n, ho * kh, wo * kw, c)
    return jnp.pad(grad, ((0, 0), (0, h - ho * kh), (0, w - wo * kw), (0, 0)))  # rows/cols no window saw


_max_pool.defvjp(_max_pool_forward, _max_pool_grad)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`lax.dot_general` whose left operand, on CPU with oneDNN, is first written to memory
    (`onednn.materialize`, which costs nothing).

    Without it XLA:CPU fuses what computes a Dense layer's input into the product (YNNPACK): after
    oneDNN's convolutions a VGG-16's last bias, ReLU and pooling went into its classifier's first
    product, which then took 750 ms instead of 24 ms. Symbolic sizes (jax.export) keep the plain product.
    """
    if (enabled() and _ONEDNN[0] and onednn.available() and lhs.dtype == jnp.float32
            and not any(export.is_symbolic_dim(d) for d in lhs.shape)):
        lhs = _materialized(lhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)


@jax.custom_vjp
def _materialized(x):
    return onednn.materialize(x)


_materialized.defvjp(lambda x: (_materialized(x), None), lambda _, g: (g,))


def use_cpu_conv(model: nnx.Module) -> int:
    """Make every `nnx.Conv` in `model` use this module's convolution, and every `nnx.Linear` its
    `dot_general`; returns how many convolutions were changed."""
    changed = 0
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Conv) and module.conv_general_dilated is lax.conv_general_dilated:
            module.conv_general_dilated = conv_general_dilated
            changed += 1
        elif isinstance(module, nnx.Linear) and module.dot_general is lax.dot_general:
            module.dot_general = dot_general
    return changed
