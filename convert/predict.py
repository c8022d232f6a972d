"""Dense prediction on images of any size, with one compilation per shape bucket.

JAX compiles a function once per input shape, so a stream of differently sized
images would compile for every image. The predictor pads each image (bottom and
right) up to a bucket from a small geometric ladder of sizes, compiles once per
bucket ahead of time (`jax.jit(...).lower(...).compile()`), caches the
executable, and crops the output to the cells of the unpadded image.

For VALID-padded networks the crop is exact: a cell whose window lies inside
the image never sees the padding (results agree to float32 rounding, as XLA may
sum in a different order for a different shape). Bucket sizes are R + k*S (R the receptive
field, S the total stride), so no padded pixel is wasted on a partial window.
SAME-padded networks zero-pad at every layer, so padding the image changes the
cells near its bottom/right edge; bucketing is off for them unless asked for
(then one compilation per distinct image shape otherwise).

    predictor = DensePredictor(fcn)
    result = predictor.predict(image)       # image: (H, W, C)
    result.scores                           # (h', w', K)
    result.window(i, j)                     # (top, left, height, width) in pixels
    predictor.compilations                  # executables compiled so far
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.geometry import Geometry
from zoo.fuse import conv_epilogues


def enable_compilation_cache(directory: str | os.PathLike) -> None:
    """Keep compiled executables on disk so later processes skip compilation (JAX persistent cache)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


@dataclasses.dataclass
class DenseScores:
    """Class scores of every window of one image.

    scores: (h', w', K) logits, cell (i, j) judging the window `window(i, j)`.
    geometry: stride, receptive field, offset of the grid in input pixels.
    image_size: (H, W) of the image.
    bucket: (H_b, W_b) the image was padded to before running.
    """

    scores: np.ndarray
    geometry: Geometry
    image_size: tuple[int, int]
    bucket: tuple[int, int]

    def window(self, i: int, j: int) -> tuple[int, int, int, int]:
        return self.geometry.window(i, j)

    def probabilities(self) -> np.ndarray:
        """Softmax over classes, (h', w', K)."""
        return np.asarray(jax.nn.softmax(jnp.asarray(self.scores), axis=-1))

    def labels(self) -> np.ndarray:
        """The best class of every cell, (h', w') int32."""
        return self.scores.argmax(-1).astype(np.int32)

    def top_classes(self, k: int = 5) -> list[tuple[int, float]]:
        """(class, highest probability over all windows), best first."""
        best = self.probabilities().reshape(-1, self.scores.shape[-1]).max(axis=0)
        order = np.argsort(-best)[:k]
        return [(int(c), float(best[c])) for c in order]


def validate_image(image, channels: int, min_size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) float32 array from `image`, or a ValueError that says what is wrong.

    Integer pixels are read as `read_image` reads a file: uint8 / 255, uint16 / 65535 (so an array
    and the same image saved as a PNG give the same answer); floats are taken as they are; other
    integer types are refused (their range is unknown).
    """
    array = np.asarray(image)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"the image must be a numeric array, got dtype {array.dtype}")
    if array.dtype in (np.uint8, np.uint16):
        array = array.astype(np.float32) / np.float32(np.iinfo(array.dtype).max)
    elif np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"an image of dtype {array.dtype} has no known range; pass uint8 (0-255), uint16 or floats "
                         f"scaled as the network expects ([0, 1] for segmentation nets and `zoo predict-dense`)")
    if array.ndim == 2 and channels == 1:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"expected one image shaped (H, W, {channels}), got shape {array.shape}")
    if array.shape[-1] != channels:
        raise ValueError(f"the model expects {channels} channel(s), the image has {array.shape[-1]} "
                         f"(shape {array.shape}); convert it (e.g. Pillow's Image.convert('L' or 'RGB'))")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"the image has {bad} NaN or infinite pixel value(s); clean or clip it first")
    if array.shape[0] < min_size[0] or array.shape[1] < min_size[1]:
        raise ValueError(f"the image is {array.shape[0]}x{array.shape[1]} but the network needs at least "
                         f"{min_size[0]}x{min_size[1]} pixels (its receptive field / training size) "
                         f"for one output cell; pad or upscale it")
    return array.astype(np.float32)


def bucket_ladder(minimum: int, stride: int, maximum: int, ratio: float) -> list[int]:
    """Sizes minimum + k*stride growing by about `ratio`, up to at least `maximum`."""
    sizes, cells = [], 1
    while True:
        size = minimum + (cells - 1) * stride
        sizes.append(size)
        if size >= maximum:
            return sizes
        cells = max(cells + 1, math.ceil(cells * ratio))


PIXEL_GEOMETRY = Geometry(stride=(1, 1), receptive_field=(1, 1), offset=(0, 0), valid=False)


def default_tile(platform: str) -> int:
    """The longest side run whole by default: 384 on CPU, 1024 elsewhere.

    On CPU, windows of about 400 pixels (the bucket of 384) ran 1.6x faster per image pixel than
    624-pixel ones and 2.1x faster than 1216-pixel ones (in half their memory), halo included
    (docs/BENCHMARKS.md, "Huge images and image streams"); accelerators want larger ones.
    """
    return 384 if platform == "cpu" else 1024


def default_halo(network) -> int:
    """Pixels of context kept around each tile's core (see `convert.tiles`), from the network's geometry.

    Converted classifiers: (R - S) / 2, rounded up, so that every kept cell's whole receptive field is
    inside its tile (exact to float rounding). Segmentation nets: half their receptive field rounded
    up to the stride, the smallest halo at which the tiled scores of the shipped nets reach float
    rounding (docs/BENCHMARKS.md, "Huge images and image streams").
    """
    from convert.segment import SegmentationFCN

    if isinstance(network, SegmentationFCN):
        stride = network.total_stride
        return math.ceil(network.receptive_field / 2 / stride) * stride
    g = network.geometry
    return max(math.ceil((r - s) / 2) for r, s in zip(g.receptive_field, g.stride))


class DensePredictor:
    """Runs an FCN or a segmentation net on images of any size with a bounded number of compilations.

    Two kinds of network, one predictor:
    - a converted classifier (`convert.to_fcn`): one score vector per window of its receptive
      field (`DenseScores.window`), inputs as the classifier takes them;
    - a segmentation net (`convert.grow_segmentation`): one score vector per pixel, inputs in
      [0, 1], padded with black (0) to a bucket of sizes S*k (S the total stride) and cropped back.

    An image whose bucket exceeds the tile's along a side runs in tiles of the tile's bucket
    (`plan`, `convert.tiles`): overlapping windows at multiples of the stride, each keeping the cells
    whose stride cell plus `halo` pixels lies inside it; at the default halo the stitched scores equal
    the whole-image run's to float rounding (exactly for VALID networks). Every tile of an image has
    one shape, so an image costs one compilation (two when its last batch of tiles is smaller).
    Batches are split over `devices` with `jax.sharding` (data parallelism; a batch smaller than the
    device count runs on the first device).

    Args:
        network: a `convert.FCN` or a `convert.segment.SegmentationFCN`.
        bucketing: pad to shape buckets; default: on for VALID-padded FCNs (exact) and for
            segmentation nets, off for SAME-padded FCNs (padding would change the cells at the
            bottom/right edge).
        ratio: growth factor of the bucket ladder (each axis); larger = fewer compilations,
            more padding.
        score_map: for average-pool heads, return the raw per-position scores instead of
            one score per training-size window.
        dtype: computation dtype; bfloat16 halves memory traffic on accelerators.
        tile: sides whose bucket is at most this side's bucket run whole; longer ones are tiled.
            Default `default_tile(platform)`: 384 on CPU, 1024 elsewhere.
        halo: pixels of context around each tile's core; default `default_halo(network)`.
        batch: images or tiles per device per call (at most).
        devices: where to run; default every local device (`jax.local_devices()`).
        fold: fold every BatchNorm that follows a convolution into it first (`convert.fold_batchnorm`):
            the predictor runs in eval mode, where that is the same affine map, one pass fewer per
            BatchNorm. `folded_batchnorms` says how many were folded. `network` is not modified.
        fuse: run each convolution's bias, residual sum and activation in its oneDNN call
            (`zoo.fuse.conv_epilogues`; CPU with oneDNN only, the same scores to float rounding).
    """

    def __init__(self, network, *, bucketing: bool | None = None, ratio: float = 1.25, score_map: bool = False,
                 dtype=jnp.float32, tile: int | None = None, halo: int | None = None, batch: int = 1,
                 devices=None, fold: bool = True, fuse: bool = True):
        from convert.segment import SegmentationFCN

        self.fcn = network
        self.per_pixel = isinstance(network, SegmentationFCN)
        if self.per_pixel:
            self.use_score_map = False
            self.geometry = PIXEL_GEOMETRY
            self.bucketing = True if bucketing is None else bucketing
            self.channels = network.in_channels
            self.min_size = (1, 1)
            stride = network.total_stride
            self.bucket_step = stride * max(1, math.ceil(16 / stride))
            self.bucket_minimum = self.bucket_step * 2
            self.align = (stride, stride)
        else:
            self.use_score_map = score_map and network.pool == "avg"
            self.geometry = network.score_map_geometry if self.use_score_map else network.geometry
            self.bucketing = self.geometry.valid if bucketing is None else bucketing
            self.channels = network.input_shape[-1]
            self.min_size = tuple(network.min_size)
            self.align = tuple(self.geometry.stride)
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.halo = default_halo(network) if halo is None else int(halo)
        # The default tile grows for networks whose halo it could not hold (a ResNet-50 FCN's is ~300 px).
        self.tile = max(default_tile(self.devices[0].platform), 2 * self.halo + 8 * max(self.align)) \
            if tile is None else int(tile)
        if self.tile < 1 or self.halo < 0 or batch < 1:
            raise ValueError(f"tile and batch must be positive and halo non-negative; got tile={tile}, halo={halo}, "
                             f"batch={batch}")
        self.batch = int(batch)
        self.ratio = ratio
        self.dtype = jnp.dtype(dtype)
        runs = network
        self.folded_batchnorms = 0
        if fold:
            from convert.fold import FoldedBatchNorm, fold_batchnorm

            # Traced at a size the predictor itself runs: a segmentation net's smallest bucket, a
            # converted classifier's training size.
            trace_shape = ((self.bucket_minimum, self.bucket_minimum, self.channels) if self.per_pixel
                           else tuple(network.input_shape))
            runs = fold_batchnorm(network, trace_shape)
            self.folded_batchnorms = sum(isinstance(node, FoldedBatchNorm) for _, node in nnx.iter_graph(runs)) \
                - sum(isinstance(node, FoldedBatchNorm) for _, node in nnx.iter_graph(network))
        self._graphdef, self._state = nnx.split(runs)
        if self.dtype != jnp.float32:
            self._state = jax.tree.map(lambda a: a.astype(self.dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                                       else a, self._state)
        self._state = jax.device_put(self._state, self.devices[0])
        self._mesh_state = None
        self._compiled_apply = conv_epilogues(self._apply) if fuse else self._apply
        self._executables: dict[tuple[int, int, int], object] = {}
        self._shapes: dict[tuple[int, int], tuple[int, ...]] = {}
        self.compilations = 0
        self.compile_seconds = 0.0

    # -- shapes ---------------------------------------------------------------------------------
    def bucket_for(self, height: int, width: int) -> tuple[int, int]:
        """The padded (H_b, W_b) an image of (height, width) runs at (after `used_size`)."""
        if not self.bucketing:
            return height, width
        out = []
        for axis, n in enumerate((height, width)):
            if self.per_pixel:
                first, step = self.bucket_minimum, self.bucket_step
            else:
                first = self.geometry.receptive_field[axis] if self.geometry.valid else self.min_size[axis]
                step = self.geometry.stride[axis]
            out.append(next(size for size in bucket_ladder(first, step, n, self.ratio) if size >= n))
        return tuple(out)

    def used_size(self, height: int, width: int) -> tuple[int, int]:
        """Pixels any window reads: for VALID nets the rows/cols past the last whole window are dropped."""
        if not self.geometry.valid:
            return height, width
        g = self.geometry
        return tuple(r + (n - r) // s * s for n, r, s in zip((height, width), g.receptive_field, g.stride))

    def _output_shape(self, height: int, width: int) -> tuple[int, ...]:
        """(h', w', K) of the network's output for one (height, width) input (shapes only, cached)."""
        if (height, width) not in self._shapes:
            spec = jax.ShapeDtypeStruct((1, height, width, self.channels), jnp.float32)
            self._shapes[(height, width)] = tuple(jax.eval_shape(self._apply, self._state, spec).shape[1:])
        return self._shapes[(height, width)]

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h', w') of the unpadded image's output grid (VALID: floor((H - R) / S) + 1)."""
        g = self.geometry
        if self.per_pixel:
            return height, width
        if g.valid:
            return tuple((n - r) // s + 1 for n, r, s in zip((height, width), g.receptive_field, g.stride))
        return self._output_shape(height, width)[:2]

    @property
    def num_outputs(self) -> int:
        """K, the scores per cell."""
        if self.per_pixel:
            return self.fcn.num_classes
        side = max(*self.min_size, *self.geometry.receptive_field)
        return self._output_shape(side, side)[-1]

    def _tile_window(self, canvas: int, axis: int) -> int:
        """The window along `axis` for a canvas longer than the tile: the tile's bucket, on the canvas's grid."""
        if self.bucketing:
            return self.bucket_for(self.tile, self.tile)[axis]
        step = self.align[axis]
        window = self.tile - (self.tile - canvas) % step  # canvas - window: a multiple of the stride
        return window if window >= self.min_size[axis] else window + step

    def plan(self, height: int, width: int):
        """The `convert.tiles.TilePlan` of an image of (height, width): one window when it fits the tile."""
        from convert.tiles import TilePlan, clean_cells, plan_axis

        canvas = self.bucket_for(*self.used_size(height, width))
        window = tuple(min(c, self._tile_window(c, axis)) for axis, c in enumerate(canvas))
        cells = (height, width) if self.per_pixel else self.output_size(*self.used_size(height, width))
        window_cells = self.output_size(*window)
        g = self.geometry
        axes = []
        for axis in range(2):
            clean = clean_cells(window[axis], window_cells[axis], stride=g.stride[axis], field=g.receptive_field[axis],
                                offset=g.offset[axis], halo=self.halo, valid=g.valid)
            axes.append(plan_axis(canvas[axis], window[axis], cells[axis], window_cells[axis], clean,
                                  cell_step=g.stride[axis], align=self.align[axis]))
        return TilePlan(*axes)

    def _apply(self, state, x):
        fcn = nnx.merge(self._graphdef, state)
        return (fcn.score_map(x) if self.use_score_map else fcn(x)).astype(jnp.float32)

    def _sharded(self, batch: int) -> bool:
        return len(self.devices) > 1 and batch % len(self.devices) == 0

    def _shardings(self):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.asarray(self.devices), ("data",))
        return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))

    def executable(self, bucket: tuple[int, int], batch: int = 1):
        """The compiled function for inputs (batch, *bucket, C): compiled ahead of time on first use.

        A batch that is a multiple of the device count is split over the devices (data parallel).
        """
        key = (batch, *bucket)
        if key not in self._executables:
            import time

            start = time.perf_counter()
            spec = jax.ShapeDtypeStruct((batch, *bucket, self.channels), self.dtype)
            if self._sharded(batch):
                replicated, split = self._shardings()
                state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), self._state)
                spec = jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=split)
                compiled = jax.jit(self._compiled_apply, in_shardings=(replicated, split),
                                   out_shardings=split).lower(state, spec).compile()
            else:
                compiled = jax.jit(self._compiled_apply).lower(self._state, spec).compile()
            self._executables[key] = compiled
            self.compile_seconds += time.perf_counter() - start
            self.compilations += 1
        return self._executables[key]

    @property
    def buckets(self) -> list[tuple[int, ...]]:
        """The (batch, H_b, W_b) shapes compiled so far."""
        return list(self._executables)

    def batch_for(self, count: int) -> int:
        """The batch `count` images or tiles run at: a power of two per device, at most `batch` per device.

        Fewer than one per device run on the first device alone, in a power-of-two batch.
        """
        devices = len(self.devices)
        count = max(1, min(count, devices * self.batch))
        if count < devices:
            return min(1 << (count - 1).bit_length(), devices)
        per_device = -(-count // devices)
        return devices * min(1 << (per_device - 1).bit_length(), self.batch)

    # -- prediction -----------------------------------------------------------------------------
    def _run(self, padded: np.ndarray) -> np.ndarray:
        run = self.executable(padded.shape[1:3], padded.shape[0])
        if self._sharded(padded.shape[0]):
            replicated, split = self._shardings()
            if self._mesh_state is None:
                self._mesh_state = jax.device_put(self._state, replicated)
            return np.asarray(run(self._mesh_state, jax.device_put(padded.astype(self.dtype), split)))
        return np.asarray(run(self._state, jax.device_put(padded.astype(self.dtype), self.devices[0])))

    def run_plan(self, plan, source, outputs, *, progress=None) -> None:
        """Run every window of `plan` on `source` and write the kept cells to `outputs`.

        Args:
            plan: `self.plan(source.height, source.width)`.
            source: a `convert.tiles.ImageSource`.
            outputs: (kind, sink) pairs: kind "scores" (h', w', K) float32, "labels" (h', w') best class,
                "confidence" (h', w') its softmax probability; a sink has `write(top, left, block)`.
            progress: a tqdm bar to advance by one per window, or None.
        """
        windows = list(plan.windows())
        size = self.batch_for(len(windows))
        rows, cols = plan.window
        for first in range(0, len(windows), size):
            chunk = windows[first:first + size]
            batch = np.zeros((self.batch_for(len(chunk)), rows, cols, self.channels), np.float32)
            for i, (top, left, *_) in enumerate(chunk):
                batch[i] = source.read(top, left, rows, cols)
            scores = self._run(batch)
            for i, (_, _, (r0, r1), (c0, c1), row_cell, col_cell) in enumerate(chunk):
                write_outputs(outputs, r0, c0, scores[i, r0 - row_cell:r1 - row_cell, c0 - col_cell:c1 - col_cell])
            if progress is not None:
                progress.update(len(chunk))

    def predict(self, image) -> DenseScores:
        """Scores of every window (FCN) or pixel (segmentation net) of `image` (H, W, C); see `DenseScores`."""
        from convert.tiles import ArraySink, ArraySource

        array = validate_image(image, self.channels, self.min_size)
        height, width = array.shape[:2]
        plan = self.plan(height, width)
        sink = ArraySink((*plan.output_size, self.num_outputs), np.float32)
        self.run_plan(plan, ArraySource(array, self.channels), [("scores", sink)])
        return DenseScores(sink.array, self.geometry, (height, width), plan.window)

    def predict_batch(self, images) -> list[DenseScores]:
        """`predict` for images whose plans are one window of the same shape, run as one batch."""
        from convert.tiles import ArraySource

        arrays = [validate_image(image, self.channels, self.min_size) for image in images]
        plans = [self.plan(*a.shape[:2]) for a in arrays]
        if any(p.tiled or p.window != plans[0].window for p in plans):
            raise ValueError("predict_batch takes images of one bucket that need no tiles; use predict for others")
        results = []
        for first in range(0, len(arrays), self.batch_for(len(arrays))):
            chunk = arrays[first:first + self.batch_for(len(arrays))]
            batch = np.zeros((self.batch_for(len(chunk)), *plans[0].window, self.channels), np.float32)
            for i, array in enumerate(chunk):
                batch[i] = ArraySource(array, self.channels).read(0, 0, *plans[0].window)
            scores = self._run(batch)
            for i, array in enumerate(chunk):
                h, w = plans[first + i].output_size
                results.append(DenseScores(scores[i, :h, :w], self.geometry, array.shape[:2], plans[0].window))
        return results


def write_outputs(outputs, top: int, left: int, scores: np.ndarray) -> None:
    """Write one block of scores (h, w, K) at (top, left) to each (kind, sink) of `outputs` (see `run_plan`)."""
    labels = confidence = None
    for kind, sink in outputs:
        if kind == "scores":
            sink.write(top, left, scores)
        elif kind == "labels":
            labels = scores.argmax(-1) if labels is None else labels
            sink.write(top, left, labels)
        elif kind == "confidence":
            if confidence is None:
                shifted = np.exp(scores - scores.max(-1, keepdims=True))
                confidence = 1.0 / shifted.sum(-1)
            sink.write(top, left, confidence)
        else:
            raise ValueError(f"unknown output {kind!r}; use scores, labels or confidence")


MAX_PIXELS = 64_000_000  # larger images are refused before decoding (memory); tiling handles the rest


def read_image(path: str | os.PathLike, channels: int, *, invert: bool | None = False,
               max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, dict]:
    """(H, W, channels) float32 in [0, 1] from any image file Pillow opens, and what was done to it.

    The one image reader of `zoo predict-dense` and `zoo segment`, for every mode Pillow opens: 8-bit
    images / 255, 16-bit / 65535, float images as they are when in [0, 1] (else, like integers of
    no known range, by their own range); palette, CMYK, YCbCr ... become RGB or gray; transparent
    pixels are composited over the colour opposite to the ink (so they become background); a
    multi-frame file (TIFF, GIF) gives its first frame (noted). `invert`: True flips
    intensities, None flips when the median is light (dark ink on paper, for light-on-dark nets).
    The size is checked before decoding, so no file can take the machine's memory.

    Raises:
        FileNotFoundError, or a ValueError naming the file: not an image, truncated, too large,
        or with channels that cannot become `channels`.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found")
    notes = {}
    bomb_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # the size is checked here, against max_pixels, before decoding
        with Image.open(path) as img:
            Image.MAX_IMAGE_PIXELS = bomb_limit
            width, height = img.size
            if width * height > max_pixels:
                raise ValueError(f"{path} is {width}x{height} ({width * height / 1e6:.0f} megapixels); the limit is "
                                 f"{max_pixels / 1e6:.0f} megapixels for images decoded whole. Save it as .npy or "
                                 f"uncompressed TIFF/PGM/BMP, read in tiles at any size (zoo segment IMAGE --out "
                                 f"DIR/), or downscale it.")
            img.load()
            notes["mode"] = img.mode
            if getattr(img, "n_frames", 1) > 1:
                notes["frames"] = f"first of {img.n_frames}"
            has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raw = np.asarray(img, np.float32)
                if img.mode.startswith("I;16") or (img.mode == "I" and 255 < raw.max() <= 65535 and raw.min() >= 0):
                    array, notes["scaled"] = raw / 65535.0, "16-bit: / 65535"
                elif img.mode == "I" and 0 <= raw.min() and raw.max() <= 255:
                    array, notes["scaled"] = raw / 255.0, "8-bit values: / 255"
                elif img.mode == "F" and 0.0 <= raw.min() and raw.max() <= 1.0:
                    array = raw
                else:  # values of unknown range: the image's own range becomes [0, 1]
                    span = float(raw.max() - raw.min())
                    array = (raw - raw.min()) / span if span > 0 else np.zeros_like(raw)
                    notes["scaled"] = "by the image's own range"
                array = array[..., None]
            elif has_alpha:
                rgba = np.asarray(img.convert("RGBA"), np.float32) / 255.0
                alpha = rgba[..., 3:]
                gray = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
                opaque = alpha[..., 0] > 0.5
                paper = 1.0 if opaque.any() and float(gray[opaque].mean()) < 0.5 else 0.0
                array = rgba[..., :3] * alpha + paper * (1 - alpha)
                notes["alpha"] = f"composited over {'white' if paper else 'black'}"
            else:
                array = np.asarray(img.convert("L" if img.mode in ("1", "L") else "RGB"), np.float32) / 255.0
                array = array[..., None] if array.ndim == 2 else array
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image Pillow can read (PNG, JPEG, BMP, ...)") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {e}") from None
    except (OSError, SyntaxError) as e:  # truncated or corrupt data
        raise ValueError(f"{path} could not be decoded ({e}); the file is truncated or damaged") from None
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit
    if channels == 1 and array.shape[-1] == 3:
        array = array @ np.array([0.299, 0.587, 0.114], np.float32)[:, None]
    elif channels == 3 and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] != channels:
        raise ValueError(f"{path} has {array.shape[-1]} channel(s) but the model expects {channels}")
    if invert is None:
        invert = float(np.median(array)) > 0.5
    if invert:
        array = 1.0 - array
    notes["inverted"] = bool(invert)
    return np.ascontiguousarray(array, np.float32), notes


def load_image(path: str | os.PathLike, channels: int) -> np.ndarray:
    """(H, W, channels) float32 in [0, 1] from an image file (`read_image` without the notes)."""
    return read_image(path, channels)[0]


def save_heatmap(image: np.ndarray, result: DenseScores, path: str | os.PathLike, *, class_index: int | None = None,
                 title: str | None = None) -> Path:
    """Overlay the probability of `class_index` (default: the best class anywhere) on the image.

    Each cell is drawn as the stride x stride square centred on its window's centre.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = result.probabilities()
    num_classes = probs.shape[-1]
    if class_index is None:
        class_index = result.top_classes(1)[0][0]
    if not 0 <= class_index < num_classes:
        raise ValueError(f"--class must be between 0 and {num_classes - 1}, got {class_index}")
    g = result.geometry
    rows, cols = probs.shape[:2]
    centre = [o + (r - 1) / 2 for o, r in zip(g.offset, g.receptive_field)]
    extent = (centre[1] - g.stride[1] / 2, centre[1] + (cols - 0.5) * g.stride[1],
              centre[0] + (rows - 0.5) * g.stride[0], centre[0] - g.stride[0] / 2)
    height, width = image.shape[:2]
    fig, ax = plt.subplots(figsize=(8, 8 * height / max(width, 1) + 0.5))
    shown = image[..., 0] if image.shape[-1] == 1 else image
    ax.imshow(shown, cmap="gray" if image.shape[-1] == 1 else None, extent=(0, width, height, 0))
    # Colour range = this class's own range, so a weak but localized answer is still visible.
    overlay = ax.imshow(probs[..., class_index], cmap="jet", alpha=0.45, vmin=0,
                        vmax=max(float(probs[..., class_index].max()), 1e-6), extent=extent, interpolation="nearest")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.04, label=f"P(class {class_index})")
    ax.set_title(title or f"class {class_index}: {rows}x{cols} windows of {g.receptive_field[0]}x"
                 f"{g.receptive_field[1]} px, stride {g.stride[0]}")
    from zoo.saving import save_figure

    return save_figure(fig, path, dpi=100, bbox_inches="tight")
