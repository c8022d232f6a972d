"""Small layers shared by every family: named activations, pooling as modules, LRN.

Flax NNX offers pooling and activations as plain functions. Wrapping them as
modules with their settings stored as static attributes lets a model be read
as data (the converter and `zoo.summarize` walk the module tree and see what
each step is), which a lambda never allows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from zoo import cpu_conv

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,  # a.k.a. swish, EfficientNet's activation
    "gelu": jax.nn.gelu,
    "identity": lambda x: x,
}


class Activation(nnx.Module):
    """An element-wise activation chosen by name (see `ACTIVATIONS`)."""

    def __init__(self, name: str):
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
        self.name = name

    def __call__(self, x):
        return ACTIVATIONS[self.name](x)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class _Pool(nnx.Module):
    """Settings shared by the pooling layers: `window`, `strides` (default: the window), `padding`."""

    def __init__(self, window=2, strides=None, padding: str = "VALID"):
        self.window = _pair(window)
        self.strides = _pair(strides if strides is not None else window)
        self.padding = padding


class MaxPool(_Pool):
    """Max pooling over `window` with `strides` and `padding` ('VALID' or 'SAME').

    x: (N, H, W, C) -> (N, H', W', C)
    """

    def __call__(self, x):
        if cpu_conv.enabled():
            pads = self.padding
            if isinstance(pads, str):
                pads = jax.lax.padtype_to_pads(x.shape[1:3], self.window, self.strides, pads)
            return _max_pool(x, self.window, self.strides, tuple((int(lo), int(hi)) for lo, hi in pads))
        return nnx.max_pool(x, self.window, strides=self.strides, padding=self.padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
    """Max pooling whose gradient XLA:CPU runs fast: x (N, H, W, C), pads ((top, bottom), (left, right)).

    XLA:CPU's gradient of max pooling (select-and-scatter) is slow: 30 ms for a batch of 128 at
    28x28x16 on the machine of docs/BENCHMARKS.md, against 0.5 ms forward. `_max_pool_grad` gives
    the same gradient (to the first maximum of each window, in row-major order, as
    select-and-scatter does) with one comparison and one strided pad per window position.
    """
    return _reduce_max(x, window, strides, pads)


def _reduce_max(x, window, strides, pads):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1),
                                 ((0, 0), *pads, (0, 0)))


def _max_pool_forward(x, window, strides, pads):
    y = _reduce_max(x, window, strides, pads)
    return y, (x, y)


def _max_pool_grad(window, strides, pads, residuals, dy):
    x, y = residuals
    if tuple(window) == tuple(strides) and not any(sum(pads, ())):
        return (_tiled_max_pool_grad(x, y, dy, window),)
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    n, hp, wp, c = padded.shape
    ho, wo = y.shape[1:3]
    (sh, sw), span_h, span_w = strides, (ho - 1) * strides[0] + 1, (wo - 1) * strides[1] + 1
    grad = jnp.zeros_like(padded)
    unclaimed = jnp.ones(y.shape, bool)
    for i in range(window[0]):
        for j in range(window[1]):
            tap = jax.lax.slice(padded, (0, i, j, 0), (n, i + span_h, j + span_w, c), (1, sh, sw, 1))
            hit = unclaimed & (tap == y)
            unclaimed = unclaimed & ~hit
            # Scatter back to the tap's strided positions: the transpose of the strided slice.
            grad = grad + jax.lax.pad(jnp.where(hit, dy, 0).astype(x.dtype), jnp.zeros((), x.dtype),
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


class AvgPool(_Pool):
    """Average pooling; with SAME padding the border windows average real pixels only.

    x: (N, H, W, C) -> (N, H', W', C)
    """

    def __call__(self, x):
        # VALID windows hold no padding, so counting it is the same and avoids XLA folding a
        # per-window divisor constant at every compile (seconds on large images).
        return nnx.avg_pool(x, self.window, strides=self.strides, padding=self.padding,
                            count_include_pad=self.padding == "VALID")


class Flatten(nnx.Module):
    """(N, h, w, c) -> (N, h*w*c), in row-major (h, w, c) order."""

    def __call__(self, x):
        return x.reshape(x.shape[0], -1)


class GlobalAvgPool(nnx.Module):
    """(N, h, w, c) -> (N, c): the mean over all positions."""

    def __call__(self, x):
        return x.mean(axis=(1, 2))


class LocalResponseNorm(nnx.Module):
    """Local response normalization across channels (Krizhevsky et al. 2012, sec. 3.3).

    b[c] = a[c] / (k + alpha * sum_{c' in window(c)} a[c']^2) ** beta, window of `size`
    channels centred on c (clipped at the edges). The paper's constants are the
    defaults. Note the paper's alpha multiplies the plain sum; some frameworks
    divide alpha by `size` (PyTorch) and would need alpha * size to match.

    x: (N, H, W, C) -> same shape
    """

    def __init__(self, size: int = 5, k: float = 2.0, alpha: float = 1e-4, beta: float = 0.75):
        self.size, self.k, self.alpha, self.beta = size, k, alpha, beta

    def __call__(self, x):
        squared = jnp.square(x.astype(jnp.float32))
        half = self.size // 2
        # Sum of squares over a window of channels, as a 1-D reduce_window on the last axis.
        window_sum = jax.lax.reduce_window(
            squared, 0.0, jax.lax.add, (1, 1, 1, self.size), (1, 1, 1, 1),
            [(0, 0), (0, 0), (0, 0), (half, self.size - 1 - half)],
        )
        return (x / (self.k + self.alpha * window_sum) ** self.beta).astype(x.dtype)


class SqueezeExcite(nnx.Module):
    """Squeeze-and-excitation: recalibrate channels by a gate computed from their means.

    Hu et al. 2017, "Squeeze-and-Excitation Networks", https://arxiv.org/abs/1709.01507.
    s = gate(W2 act(W1 mean_hw(x) + b1) + b2); y = x * s. Any block (a ResNet unit,
    an Inception unit, EfficientNet's MBConv) takes it as an option.

    Args:
        channels: channels of x.
        squeeze_channels: width of the bottleneck (ResNet: channels // 16).
        activation: name of the activation between the two layers.
    x: (N, H, W, channels) -> same shape
    """

    def __init__(self, channels: int, squeeze_channels: int, *, activation: str = "relu",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.reduce = nnx.Linear(channels, squeeze_channels, dtype=dtype, rngs=rngs)
        self.act = Activation(activation)
        self.expand = nnx.Linear(squeeze_channels, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        s = x.mean(axis=(1, 2))
        s = jax.nn.sigmoid(self.expand(self.act(self.reduce(s))))
        return x * s[:, None, None, :].astype(x.dtype)


class NamedSequential(nnx.Module):
    """Layers applied in order, each stored under its own attribute name.

    Unlike `nnx.Sequential` (`layers.0`, `layers.1`, ...), parameter paths read
    like the paper (`features.conv1.kernel`, `features.lrn1`), and stay stable
    when an optional layer is added or removed.

    Args:
        steps: (name, module) pairs; names must be identifiers and unique.
    x: (N, H, W, C) -> whatever the last step returns
    """

    def __init__(self, steps: Sequence[tuple[str, nnx.Module]]):
        names = []
        for name, layer in steps:
            if not name.isidentifier() or name in names or hasattr(self, name):
                raise ValueError(f"step name {name!r} must be a new Python identifier")
            setattr(self, name, layer)
            names.append(name)
        self.step_names = tuple(names)

    def __call__(self, x):
        for name in self.step_names:
            x = getattr(self, name)(x)
        return x


class ZeroPad(nnx.Module):
    """Zero-pad `padding` pixels on every side of H and W.

    x: (N, H, W, C) -> (N, H + 2 * padding, W + 2 * padding, C)
    """

    def __init__(self, padding: int):
        self.padding = padding

    def __call__(self, x):
        p = self.padding
        return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
