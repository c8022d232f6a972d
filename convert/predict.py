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


class DensePredictor:
    """Runs an FCN or a segmentation net on images of any size with a bounded number of compilations.

    Two kinds of network, one predictor:
    - a converted classifier (`convert.to_fcn`): one score vector per window of its receptive
      field (`DenseScores.window`), inputs as the classifier takes them;
    - a segmentation net (`convert.grow_segmentation`): one score vector per pixel, inputs in
      [0, 1]. Images are padded with black (0) to a bucket of sizes S*k (S the total stride) and
      the scores cropped back; images with a side above `tile` run as tiles of `tile` pixels with
      a margin of context on every side from the net's receptive field, of which only the cores
      are kept (equal to the whole image wherever the field fits in the margin).

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
        tile: segmentation nets: the largest side run whole; larger images are tiled.
    """

    def __init__(self, network, *, bucketing: bool | None = None, ratio: float = 1.25, score_map: bool = False,
                 dtype=jnp.float32, tile: int = 1024):
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
            self.tile = int(tile)
            half_field = math.ceil(network.receptive_field / 2)
            self.tile_margin = min(math.ceil((half_field + stride) / stride) * stride, self.tile // 2)
        else:
            self.use_score_map = score_map and network.pool == "avg"
            self.geometry = network.score_map_geometry if self.use_score_map else network.geometry
            self.bucketing = self.geometry.valid if bucketing is None else bucketing
            self.channels = network.input_shape[-1]
            self.min_size = tuple(network.min_size)
            self.tile = None
        self.ratio = ratio
        self.dtype = jnp.dtype(dtype)
        self._graphdef, self._state = nnx.split(network)
        if self.dtype != jnp.float32:
            self._state = jax.tree.map(lambda a: a.astype(self.dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                                       else a, self._state)
        self._executables: dict[tuple[int, int], object] = {}
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

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h', w') of the unpadded image's output grid (VALID: floor((H - R) / S) + 1)."""
        g = self.geometry
        if g.valid:
            return tuple((n - r) // s + 1 for n, r, s in zip((height, width), g.receptive_field, g.stride))
        shape = jax.eval_shape(self._apply, self._state, jax.ShapeDtypeStruct((1, height, width, self.channels),
                                                                              jnp.float32)).shape
        return shape[1], shape[2]

    def _apply(self, state, x):
        fcn = nnx.merge(self._graphdef, state)
        return (fcn.score_map(x) if self.use_score_map else fcn(x)).astype(jnp.float32)

    def executable(self, bucket: tuple[int, int], batch: int = 1):
        """The compiled function for inputs (batch, *bucket, C): compiled ahead of time on first use."""
        key = (batch, *bucket)
        if key not in self._executables:
            import time

            start = time.perf_counter()
            spec = jax.ShapeDtypeStruct((batch, *bucket, self.channels), self.dtype)
            self._executables[key] = jax.jit(self._apply).lower(self._state, spec).compile()
            self.compile_seconds += time.perf_counter() - start
            self.compilations += 1
        return self._executables[key]

    @property
    def buckets(self) -> list[tuple[int, ...]]:
        """The (batch, H_b, W_b) shapes compiled so far."""
        return list(self._executables)

    # -- prediction -----------------------------------------------------------------------------
    def _run(self, padded: np.ndarray) -> np.ndarray:
        run = self.executable(padded.shape[1:3], padded.shape[0])
        return np.asarray(run(self._state, jnp.asarray(padded, self.dtype)))

    def predict(self, image) -> DenseScores:
        """Scores of every window (FCN) or pixel (segmentation net) of `image` (H, W, C); see `DenseScores`."""
        array = validate_image(image, self.channels, self.min_size)
        height, width = array.shape[:2]
        if self.per_pixel and max(height, width) > self.tile:
            return self._predict_tiled(array)
        used_h, used_w = self.used_size(height, width)
        bucket = self.bucket_for(used_h, used_w)
        padded = np.zeros((1, *bucket, self.channels), np.float32)
        padded[0, :used_h, :used_w] = array[:used_h, :used_w]
        scores = self._run(padded)
        if self.per_pixel:
            oh, ow = height, width
        else:
            oh, ow = self.output_size(used_h, used_w) if bucket != (used_h, used_w) else scores.shape[1:3]
        return DenseScores(scores[0, :oh, :ow], self.geometry, (height, width), bucket)

    def _predict_tiled(self, image: np.ndarray) -> DenseScores:
        """Per-pixel scores of a large image, tile by tile at one bucket (one compilation)."""
        height, width = image.shape[:2]
        core, margin = self.tile, self.tile_margin
        side = self.bucket_for(core + 2 * margin, core + 2 * margin)
        framed = np.zeros((height + 2 * margin + core, width + 2 * margin + core, self.channels), np.float32)
        framed[margin:margin + height, margin:margin + width] = image
        out = None
        for top in range(0, height, core):
            for left in range(0, width, core):
                tile = np.zeros((1, *side, self.channels), np.float32)
                tile[0, :core + 2 * margin, :core + 2 * margin] = \
                    framed[top:top + core + 2 * margin, left:left + core + 2 * margin]
                scores = self._run(tile)[0, margin:margin + core, margin:margin + core]
                if out is None:
                    out = np.zeros((height, width, scores.shape[-1]), np.float32)
                h, w = min(core, height - top), min(core, width - left)
                out[top:top + h, left:left + w] = scores[:h, :w]
        return DenseScores(out, self.geometry, (height, width), side)


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
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ValueError(f"{path} is {width}x{height} ({width * height / 1e6:.0f} megapixels); the limit is "
                                 f"{max_pixels / 1e6:.0f} megapixels. Downscale it or cut it into parts.")
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")  # a picture is whole or absent, never half-written
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path
