"""Where each output cell of a fully convolutional network looks in the input image.

For a chain of layers with kernel k, stride s and leading padding p (per axis),
the standard recurrence (Dumoulin & Visin 2016, "A guide to convolution
arithmetic for deep learning", https://arxiv.org/abs/1603.07285) gives

    jump  j <- j * s                     input pixels between neighbouring cells
    field r <- r + (k_eff - 1) * j       k_eff = dilation * (k - 1) + 1
    start a <- a - p * j                 top-left pixel of cell 0's window

so output cell (i, j) judges the input window rows [a + i*J, a + i*J + R).
`walk_geometry` applies it to every layer it can read (convolutions, pooling,
element-wise and per-position layers, chains of them). A block it cannot read
as a chain (a residual unit, an Inception module) is measured instead: the
support of the gradient of its centre cell says how far it reaches.
`shape_geometry` derives stride and field from output shapes alone, which is
exact for VALID-only networks and serves as an independent cross-check.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.trace import ConversionError, _record_chain, _shape_of, is_composite, is_elementwise
from zoo.layers import Activation, AvgPool, LocalResponseNorm, MaxPool

# Probe size for blocks measured by gradient: larger than any single block's reach,
# so a block whose gradient covers all of it looks at the whole map (e.g. squeeze-excitation).
MEASURE_SIZE = 33
# Relative sensitivity below which a global block's pixels count as outside its local window:
# through a spatial mean on a 33x33 probe they stand at 2e-5 to 3e-4 (EfficientNet-B0's blocks,
# random weights), inside the window at 1e-2 and above.
GLOBAL_PART_LEVEL = 1e-3


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Pixel geometry of an output grid, per axis (rows, cols).

    stride: input pixels between neighbouring output cells.
    receptive_field: size of the input window one cell depends on.
    offset: top-left input pixel of cell (0, 0)'s window; negative when the
        window reaches into zero padding (SAME-padded networks).
    valid: no padding anywhere: every window lies inside the image, and the cell
        equals the classifier applied to exactly that window.
    global_context: some layer looks at the whole map (squeeze-excitation, ...):
        cells also depend, weakly, on pixels outside their window.
    method: "walk" when every layer was read, "measured" when a block was measured.
    """

    stride: tuple[int, int]
    receptive_field: tuple[int, int]
    offset: tuple[int, int]
    valid: bool
    global_context: bool = False
    method: str = "walk"

    def window(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the input window output cell (i, j) judges."""
        return (self.offset[0] + i * self.stride[0], self.offset[1] + j * self.stride[1],
                *self.receptive_field)

    def then(self, kernel: tuple[int, int], stride: tuple[int, int] = (1, 1)) -> "Geometry":
        """The geometry after one more VALID layer with `kernel` and `stride` (in cells)."""
        return dataclasses.replace(
            self,
            receptive_field=tuple(r + (k - 1) * s for r, k, s in zip(self.receptive_field, kernel, self.stride)),
            stride=tuple(s * t for s, t in zip(self.stride, stride)),
        )

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class _Axis:
    jump: int = 1
    field: int = 1
    start: int = 0
    padded: bool = False

    def add(self, kernel: int, stride: int, pad_before: int, pad_total: int):
        self.start -= pad_before * self.jump
        self.field += (kernel - 1) * self.jump
        self.jump *= stride
        self.padded |= pad_total > 0


def _pair(v, default=1) -> tuple[int, int]:
    if v is None:
        return (default, default)
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else tuple(int(t) for t in v)


def _padding(padding, size: int, kernel: int, stride: int, axis: int) -> tuple[int, int]:
    """(before, total) padding of one axis, as XLA applies it."""
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return 0, 0
        if padding.upper() == "SAME":
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            return total // 2, total
        raise _NotWalkable(f"padding {padding!r}")
    if isinstance(padding, int):
        return padding, 2 * padding
    pads = list(padding)
    p = pads[axis]
    before, after = (p, p) if isinstance(p, int) else p
    return int(before), int(before) + int(after)


class _NotWalkable(Exception):
    pass


_POOL_FUNCTIONS = {nnx.max_pool, nnx.avg_pool, nnx.min_pool}


def _window_of(layer: Callable, in_shape: tuple[int, ...]):
    """((kernel, stride, padding) of a windowed layer) | "identity" | None (not a single known layer)."""
    if isinstance(layer, nnx.Conv):
        if _pair(layer.input_dilation) != (1, 1):
            raise _NotWalkable("transposed/input-dilated convolution")
        dilation = _pair(layer.kernel_dilation)
        kernel = tuple(d * (k - 1) + 1 for d, k in zip(dilation, _pair(layer.kernel_size)))
        return kernel, _pair(layer.strides), layer.padding
    if isinstance(layer, (MaxPool, AvgPool)):
        return layer.window, layer.strides, layer.padding
    if isinstance(layer, functools.partial) and layer.func in _POOL_FUNCTIONS:
        bound = inspect.signature(layer.func).bind_partial(None, *layer.args, **layer.keywords).arguments
        window = _pair(bound["window_shape"])
        return window, _pair(bound.get("strides"), 1), bound.get("padding", "VALID")
    if isinstance(layer, (Activation, nnx.BatchNorm, nnx.Dropout, nnx.LayerNorm, nnx.Linear, LocalResponseNorm)):
        return "identity"
    if not isinstance(layer, nnx.Module) and is_elementwise(layer, in_shape):
        return "identity"
    return None


def _measure_block(layer: Callable, in_shape: tuple[int, ...]) -> tuple[list[tuple[int, int, int, int]], bool]:
    """Per axis (kernel, stride, pad_before, pad_total) of a block, from the gradient of its centre cell.

    Returns the per-axis values and whether the block sees the whole probe (global context).
    The union over a few random inputs and cotangents covers max-pool argmax and dead ReLUs.
    """
    size = (max(in_shape[1], MEASURE_SIZE), max(in_shape[2], MEASURE_SIZE))
    shape = (1, *size, in_shape[3])
    if isinstance(layer, nnx.Module):
        graphdef, state = nnx.split(layer)
        fn = lambda x: nnx.merge(graphdef, state)(x)  # noqa: E731  (a copy: the block is not modified)
    else:
        fn = layer
    out_shape = _shape_of(layer, shape)
    centre = (out_shape[1] // 2, out_shape[2] // 2)

    # Three random inputs and output weightings; one compiled call measures both cells on all three.
    probes, weightings = zip(*((np.random.default_rng(seed).standard_normal(shape),
                                np.random.default_rng(seed + 100).standard_normal(out_shape[-1])) for seed in range(3)))
    probes, weightings = jnp.asarray(np.stack(probes), jnp.float32), jnp.asarray(np.stack(weightings), jnp.float32)

    # The stride is how far the window moves from one cell to the next (shapes alone cannot
    # tell VALID from SAME); with a single cell in an axis, the size ratio is all there is.
    neighbour = (min(centre[0] + 1, out_shape[1] - 1), min(centre[1] + 1, out_shape[2] - 1))

    @jax.jit
    def sensitivity(probes, weightings):
        """(2, H, W) for the centre and neighbour cells: max over inputs and channels of
        |d cell / d pixel|, each input's map scaled to max 1."""
        def maps(x, w):
            return jax.jacrev(lambda x: fn(x)[0, (centre[0], neighbour[0]), (centre[1], neighbour[1])] @ w)(x)

        grads = jnp.abs(jax.vmap(maps)(probes, weightings)[:, :, 0]).max(axis=-1)  # (3, 2, H, W)
        return (grads / jnp.maximum(grads.max(axis=(2, 3), keepdims=True), 1e-30)).max(axis=0)

    centre_map, neighbour_map = np.asarray(sensitivity(probes, weightings))

    def support(sensitivity_map, threshold):
        inside = sensitivity_map > threshold
        return np.nonzero(inside.any(axis=1))[0], np.nonzero(inside.any(axis=0))[0]

    rows, cols = support(centre_map, 0.0)
    whole = rows[0] == 0 and rows[-1] == size[0] - 1 and cols[0] == 0 and cols[-1] == size[1] - 1
    # A block with global context (squeeze-excitation's spatial mean) reaches every pixel, but only
    # through a 1/(H*W) factor: its local window is where the sensitivity stands far above that.
    threshold = GLOBAL_PART_LEVEL if whole else 0.0
    rows, cols = support(centre_map, threshold)
    next_rows, next_cols = support(neighbour_map, threshold) if neighbour != centre else (rows, cols)
    result = []
    for axis, (idx, nxt) in enumerate(((rows, next_rows), (cols, next_cols))):
        if idx.size == 0:
            raise _NotWalkable("its centre cell does not depend on its input")
        clipped = idx[0] == 0 and idx[-1] == size[axis] - 1  # the window does not fit in the probe
        if neighbour[axis] != centre[axis] and nxt.size and not clipped:
            stride = max(1, int(nxt[0] - idx[0]))
        else:
            stride = max(1, round(size[axis] / out_shape[axis + 1]))
        kernel = int(idx[-1] - idx[0] + 1)
        pad_before = centre[axis] * stride - int(idx[0])
        valid_cells = (size[axis] - kernel) // stride + 1
        pad_total = max(pad_before, 0) + max(out_shape[axis + 1] - valid_cells, 0) * stride
        result.append((kernel, stride, pad_before, pad_total))
    return result, bool(whole)


def walk_geometry(backbone: Callable, input_shape: tuple[int, int, int], *, measure_all: bool = False) -> Geometry:
    """Geometry of `backbone`'s output grid for images of `input_shape` (H, W, C).

    Reads kernel/stride/padding layer by layer; blocks that are not a chain of
    readable layers are measured (see `_measure_block`). `measure_all=True`
    measures the whole backbone as one block (for cross-checks).
    """
    axes = [_Axis(), _Axis()]
    flags = {"measured": False, "global": False}
    measured: dict = {}

    def visit(layer, shape):
        out = _shape_of(layer, shape)
        window = None if measure_all else _window_of(layer, shape)
        if window == "identity":
            return out
        if window is not None:
            kernel, stride, padding = window
            kernel, stride = _pair(kernel), _pair(stride)
            for axis in range(2):
                before, total = _padding(padding, shape[axis + 1], kernel[axis], stride[axis], axis)
                axes[axis].add(kernel[axis], stride[axis], before, total)
            return out
        if not measure_all and (isinstance(layer, nnx.Sequential) or is_composite(layer)):
            try:
                steps = ([(l, None) for l in layer.layers] if isinstance(layer, nnx.Sequential)
                         else [(s.layer, s.in_shape) for s in _record_chain(layer, shape, jnp.float32)])
            except ConversionError:
                steps = None
            if steps is not None:
                current = shape
                for sub, _ in steps:
                    current = visit(sub, current)
                return out
        # Blocks of one structure on one input shape (a stage's repeated blocks) measure alike:
        # measure each kind once.
        key = (nnx.graphdef(layer), shape) if isinstance(layer, nnx.Module) else (id(layer), shape)
        if key not in measured:
            measured[key] = _measure_block(layer, shape)
        per_axis, whole = measured[key]
        flags["measured"] = True
        flags["global"] |= whole
        for axis, (kernel, stride, before, total) in enumerate(per_axis):
            axes[axis].add(kernel, stride, before, total)
        return out

    visit(backbone, (1, *input_shape))
    return Geometry(
        stride=(axes[0].jump, axes[1].jump),
        receptive_field=(axes[0].field, axes[1].field),
        offset=(axes[0].start, axes[1].start),
        valid=not (axes[0].padded or axes[1].padded),
        global_context=flags["global"],
        method="measured" if flags["measured"] else "walk",
    )


def shape_geometry(backbone: Callable, channels: int, *, max_size: int = 256) -> tuple[tuple[int, int], tuple[int, int]]:
    """(stride, receptive_field) from abstract output shapes only, assuming VALID padding everywhere.

    For a VALID chain the output length is floor((n - R) / J) + 1, so the smallest
    input giving one cell is R and each J more pixels give one more cell.
    """
    def length(n: int, axis: int) -> int:
        shape = [1, max_size, max_size, channels]
        shape[axis + 1] = n
        try:
            return _shape_of(backbone, tuple(shape))[axis + 1]
        except Exception:  # too small for some layer
            return 0

    stride, field = [], []
    for axis in range(2):
        lo, hi = 1, max_size
        while lo < hi:  # smallest n with at least one output cell
            mid = (lo + hi) // 2
            if length(mid, axis) >= 1:
                hi = mid
            else:
                lo = mid + 1
        n = lo
        while length(n, axis) < 2:
            n += 1
        field.append(lo)
        stride.append(n - lo)
    return tuple(stride), tuple(field)
