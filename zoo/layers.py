"""Small layers shared by every family: named activations, pooling as modules, LRN.

Flax NNX offers pooling and activations as plain functions. Wrapping them as
modules with their settings stored as static attributes lets a model be read
as data (the converter and `zoo.summarize` walk the module tree and see what
each step is), which a lambda never allows.
"""

from __future__ import annotations

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
        if cpu_conv.enabled():  # same values, a gradient XLA:CPU runs faster
            return cpu_conv.max_pool(x, self.window, self.strides, self.padding)
        return nnx.max_pool(x, self.window, strides=self.strides, padding=self.padding)


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
