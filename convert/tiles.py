"""Images of any size in tiles: the tile plan, lazy readers and incremental writers.

A network's output cell depends on the input pixels of its receptive field only. A tile whose
window holds a cell's whole field (plus the image's own border, where the window ends at the
image's edge) computes that cell exactly as a run on the whole image does, so a huge image can be
cut into overlapping windows, each keeping the cells it computes exactly (its core) and dropping
the rest (its halo), and the cores stitched back together (the halo of bioimage.io, the
overlapping windows of MONAI's `sliding_window_inference`; here cropped, never blended).

Per axis, the plan (`plan_axis`) places windows of one size, taken from the predictor's shape
buckets, at multiples of the network's stride, so that every window's output grid lies on the
image's: cell j of a window starting at pixel s is the image's cell s / S + j. The first window
starts at pixel 0 and the last one ends at the image's (bucketed) edge, so the borders see the
padding a whole-image run sees.

- VALID networks (no padding inside): every cell of every window is exact; windows overlap by
  R - S pixels (receptive field R, stride S) and the stitched map equals the whole-image run to
  float rounding.
- Padded networks (SAME convolutions, LeNet-5's input padding, segmentation nets): a cell is kept
  from a window when its stride cell, grown by the halo on every side, lies inside the window.
  A halo of (R - S) / 2 keeps exactly the cells whose whole field is inside (exact, to rounding);
  a smaller halo is cheaper and approximate (docs/BENCHMARKS.md measures the error against it).

Reading (`open_image_source`): .npy files are read lazily with `os.pread` of the rows a window
needs (not through a memory map, whose touched pages would stay resident and grow with the file),
and so are uncompressed 8-bit strips that Pillow describes as raw (PGM/PPM, BMP, uncompressed
striped TIFF), at the offsets Pillow's header parser gives. Compressed formats (PNG, JPEG, compressed or tiled TIFF,
WebP, GIF) cannot be decoded in parts by Pillow: they are decoded whole by `read_image`, within
its pixel limit. Writing (`NpyFileSink`): a .npy created by `numpy.lib.format.open_memmap` at a
temporary name, its space reserved up front (`posix_fallocate`: a full disk fails at once, not
after an hour), filled with `os.pwrite` (not through a memory map, which would turn a full disk
into SIGBUS and count every written page as resident) and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------
# the plan


@dataclasses.dataclass(frozen=True)
class AxisPlan:
    """Windows along one axis and the output cells each one keeps.

    window: pixels per window. starts: each window's first pixel (multiples of the alignment).
    keep: per window, the output cells [first, stop) it writes, in image cells (they tile
    [0, cells) without gaps or overlaps). offset: per window, its first cell's image index.
    cells: output cells along this axis. window_cells: cells one window computes.
    """

    window: int
    starts: tuple[int, ...]
    keep: tuple[tuple[int, int], ...]
    offset: tuple[int, ...]
    cells: int
    window_cells: int


def clean_cells(window: int, window_cells: int, *, stride: int, field: int, offset: int, halo: int,
                valid: bool) -> tuple[int, int]:
    """[lo, hi): the cells of a window that count as exact: stride cell + halo inside the window.

    Cell j's window in the input is [offset + j*stride, offset + j*stride + field); its stride cell
    is the stride-wide band around that window's centre. VALID networks: every cell.
    """
    if valid:
        return 0, window_cells
    # In half pixels: centre = 2*offset + field + 2*j*stride, stride cell +- stride, halo +- 2*halo.
    lo = math.ceil((2 * halo + stride - 2 * offset - field) / (2 * stride))
    hi = math.floor((2 * window - 2 * halo - stride - 2 * offset - field) / (2 * stride)) + 1
    return max(lo, 0), min(hi, window_cells)


def plan_axis(canvas: int, window: int, cells: int, window_cells: int, clean: tuple[int, int], *,
              cell_step: int, align: int) -> AxisPlan:
    """Windows of `window` pixels over a canvas of `canvas` pixels that give `cells` output cells.

    Args:
        canvas: pixels the whole-image run sees (the bucketed image); windows lie inside it.
        window: pixels per window (a bucket size); canvas - window must be a multiple of `align`.
        cells: output cells wanted (the whole-image run's, cropped to the image).
        window_cells: output cells of one window.
        clean: [lo, hi) cells of an inner window that are exact (`clean_cells`); a window that starts
            at 0 is exact from its first cell, one that ends at the canvas's edge to its last.
        cell_step: input pixels per output cell (the stride; 1 for one score per pixel).
        align: window starts are multiples of this (a multiple of cell_step).
    Raises:
        ValueError: the window is too small to keep `align` exact pixels beside its halo.
    """
    if canvas <= window:
        return AxisPlan(window, (0,), ((0, cells),), (0,), cells, window_cells)
    if (canvas - window) % align:
        raise AssertionError(f"canvas {canvas} and window {window} differ by no multiple of {align}: a bug")
    lo, hi = clean
    starts, keep, offsets, done, start = [], [], [], 0, 0
    while done < cells:
        last = start + window >= canvas
        if last:
            start = canvas - window
        first = start // cell_step
        stop = min(cells, first + (window_cells if last else hi))
        if stop <= done or first + (0 if start == 0 else lo) > done:
            raise ValueError(f"tiles of {window} pixels keep no exact cells beside a halo this wide; use a larger "
                             f"tile or a smaller halo")
        starts.append(start)
        keep.append((done, stop))
        offsets.append(first)
        done = stop
        following = (done - lo) * cell_step // align * align
        if done < cells and following <= start:
            raise ValueError(f"tiles of {window} pixels are too small for the halo: each keeps fewer than {align} "
                             f"pixels; use a larger tile or a smaller halo")
        start = following
    return AxisPlan(window, tuple(starts), tuple(keep), tuple(offsets), cells, window_cells)


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Windows over an image: the product of a row plan and a column plan."""

    rows: AxisPlan
    cols: AxisPlan

    @property
    def window(self) -> tuple[int, int]:
        return self.rows.window, self.cols.window

    @property
    def output_size(self) -> tuple[int, int]:
        return self.rows.cells, self.cols.cells

    @property
    def tiled(self) -> bool:
        return len(self.rows.starts) > 1 or len(self.cols.starts) > 1

    def __len__(self) -> int:
        return len(self.rows.starts) * len(self.cols.starts)

    def windows(self):
        """(top, left, rows kept [first, stop), cols kept, first row cell, first col cell) in reading order."""
        for top, row_keep, row_offset in zip(self.rows.starts, self.rows.keep, self.rows.offset):
            for left, col_keep, col_offset in zip(self.cols.starts, self.cols.keep, self.cols.offset):
                yield top, left, row_keep, col_keep, row_offset, col_offset


# ---------------------------------------------------------------------------------------------
# reading

NPY_SUFFIX = ".npy"


def to_unit_range(array: np.ndarray) -> np.ndarray:
    """float32 pixels in [0, 1] from uint8 (/255), uint16 (/65535) or bool; floats as they are."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    return array.astype(np.float32)


def match_channels(array: np.ndarray, channels: int, name: str) -> np.ndarray:
    """(h, w, c) -> (h, w, channels): RGB to gray by luma, gray repeated to RGB; else a ValueError."""
    if array.shape[-1] == channels:
        return array
    if channels == 1 and array.shape[-1] == 3:
        return array @ np.array([0.299, 0.587, 0.114], np.float32)[:, None]
    if channels == 3 and array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    raise ValueError(f"{name} has {array.shape[-1]} channel(s) but the model expects {channels}")


class ImageSource:
    """An (H, W, C) image read by windows: `read(top, left, height, width)` -> float32 in the net's channels.

    Pixels outside the image read as 0. Subclasses give `_read_raw` (the clipped region, source dtype
    and channels); this class converts, inverts and checks it.
    """

    name: str
    height: int
    width: int
    lazy: bool
    channels: int
    invert: bool
    notes: dict

    def _read_raw(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        raise NotImplementedError

    def _convert(self, raw: np.ndarray) -> np.ndarray:
        block = match_channels(to_unit_range(raw if raw.ndim == 3 else raw[..., None]), self.channels, self.name)
        if self.invert:
            block = 1.0 - block
        if not np.all(np.isfinite(block)):
            raise ValueError(f"{self.name} has NaN or infinite pixel values; clean or clip it first")
        return block

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        out = np.zeros((height, width, self.channels), np.float32)
        rows, cols = min(height, self.height - top), min(width, self.width - left)
        if rows > 0 and cols > 0:
            out[:rows, :cols] = self._convert(self._read_raw(top, left, rows, cols))
        return out

    def close(self) -> None:
        """Release the open file, if any (a later read opens it again)."""

    def read_all(self) -> np.ndarray:
        return self.read(0, 0, self.height, self.width)

    def preview(self, step: int) -> np.ndarray:
        """Every `step`-th pixel of every `step`-th row, (ceil(H/step), ceil(W/step), C) float32."""
        rows = [self._convert(self._read_raw(r, 0, 1, self.width)[:, ::step]) for r in range(0, self.height, step)]
        return np.concatenate(rows, axis=0)

    def median(self, samples: int = 1_000_000) -> float:
        """The median pixel (of the net's channels), from a regular sample of about `samples` pixels."""
        step = max(1, int(math.sqrt(self.height * self.width / samples)))
        return float(np.median(self.preview(step)))

    def _decide_inversion(self, invert: bool | None) -> None:
        self.invert = False
        if invert is None:
            invert = self.median() > 0.5
        self.invert = bool(invert)
        self.notes["inverted"] = self.invert


class ArraySource(ImageSource):
    """An image already in memory, (H, W) or (H, W, C), its values taken as they are (as float32)."""

    def __init__(self, array: np.ndarray, channels: int, *, name: str = "the image", invert: bool | None = False,
                 notes: dict | None = None):
        array = np.asarray(array)
        self.array = array if array.ndim == 3 else array[..., None]
        self.name, self.channels, self.lazy = name, channels, False
        self.height, self.width = self.array.shape[:2]
        self.notes = dict(notes or {})
        match_channels(np.zeros((1, 1, self.array.shape[-1]), np.float32), channels, name)
        self._decide_inversion(invert)

    def _read_raw(self, top, left, height, width):
        return self.array[top:top + height, left:left + width].astype(np.float32, copy=False)


class _FileRows:
    """An open file descriptor for os.pread, opened on first use."""

    path: Path
    _fd: int | None = None

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


class NpySource(_FileRows, ImageSource):
    """A .npy file (H, W) or (H, W, C), C order, read by rows with os.pread (never mapped: bounded memory)."""

    def __init__(self, path: str | os.PathLike, channels: int, *, invert: bool | None = False):
        path = Path(path)
        self.name, self.channels, self.lazy, self.notes = str(path), channels, True, {"format": "npy"}
        try:
            mapped = np.load(path, mmap_mode="r")  # reads the header; no page of data is touched
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path} is not a readable .npy array ({e}); the file is truncated or damaged") from None
        shape, dtype, offset = mapped.shape, mapped.dtype, mapped.offset
        fortran = mapped.flags.f_contiguous and not mapped.flags.c_contiguous
        del mapped
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[-1] not in (1, 3)):
            raise ValueError(f"{path} holds an array of shape {shape}; an image is (H, W) or (H, W, 1 or 3)")
        if fortran:
            raise ValueError(f"{path} is in Fortran order; save it in C order (np.save(path, np.ascontiguousarray(a)))")
        if not (np.issubdtype(dtype, np.number) or dtype == bool) or np.issubdtype(dtype, np.complexfloating):
            raise ValueError(f"{path} holds {dtype} values; an image holds numbers")
        self.height, self.width = shape[:2]
        self.depth = shape[2] if len(shape) == 3 else 1
        self.dtype, self.offset = dtype, offset
        self.row_bytes = self.width * self.depth * dtype.itemsize
        if os.path.getsize(path) < offset + self.height * self.row_bytes:
            raise ValueError(f"{path} is truncated: its header promises {shape} {dtype}")
        self.path = path
        match_channels(np.zeros((1, 1, self.depth), np.float32), channels, self.name)
        self._decide_inversion(invert)

    def _read_raw(self, top, left, height, width):
        fd, item = self._file(), self.depth * self.dtype.itemsize
        if left == 0 and width == self.width:
            data = os.pread(fd, height * self.row_bytes, self.offset + top * self.row_bytes)
        else:
            data = b"".join(os.pread(fd, width * item, self.offset + r * self.row_bytes + left * item)
                            for r in range(top, top + height))
        if len(data) != height * width * item:
            raise ValueError(f"{self.name} is truncated (a read came back short)")
        return np.frombuffer(data, self.dtype).reshape(height, width, self.depth)


# Pillow raw modes whose bytes are pixels as they are: bytes per pixel, channel order.
RAW_MODES = {"L": (1, None), "RGB": (3, None), "BGR": (3, (2, 1, 0))}


class RawImageSource(_FileRows, ImageSource):
    """8-bit gray or RGB strips stored uncompressed (PGM/PPM, BMP, uncompressed striped TIFF), read by rows.

    Pillow parses the header and describes where each strip's bytes lie (`Image.tile`); the rows a
    window needs are read from those offsets with os.pread, nothing else is decoded.
    """

    def __init__(self, path: Path, strips: list[tuple[int, int, int, int, int]], mode: str, size: tuple[int, int],
                 channels: int, *, invert: bool | None = False, image_format: str = ""):
        self.path, self.name, self.channels, self.lazy = path, str(path), channels, True
        self.width, self.height = size
        self.strips = strips  # (first row, stop row, file offset, row stride (signed), bytes per pixel)
        self.order = RAW_MODES[mode][1]
        self.depth = 3 if mode in ("RGB", "BGR") else 1
        self.notes = {"format": image_format, "read": "by rows (uncompressed)"}
        needed = max((offset + max(stride * (stop - first - 1), 0) + self.width * item
                      for first, stop, offset, stride, item in strips), default=0)
        if os.path.getsize(path) < needed:
            raise ValueError(f"{path} is truncated: its header promises {self.width}x{self.height} pixels")
        match_channels(np.zeros((1, 1, self.depth), np.float32), channels, self.name)
        self._decide_inversion(invert)

    def _read_raw(self, top, left, height, width):
        fd = self._file()
        out = np.empty((height, width, self.depth), np.uint8)
        for first, stop, offset, stride, item in self.strips:
            for r in range(max(top, first), min(top + height, stop)):
                data = os.pread(fd, width * item, offset + (r - first) * stride + left * item)
                if len(data) != width * item:
                    raise ValueError(f"{self.name} is truncated (row {r} is short)")
                out[r - top] = np.frombuffer(data, np.uint8).reshape(width, item)
        return out[..., list(self.order)] if self.order else out


def _raw_strips(img) -> tuple[list, str] | None:
    """Row strips of an image Pillow has not decoded yet, when they are uncompressed 8-bit pixels; else None."""
    if img.mode not in ("L", "RGB") or not img.tile:
        return None
    width = img.size[0]
    strips, rawmode = [], None
    for tile in img.tile:
        codec, extents, offset, args = tile[0], tile[1], tile[2], tile[3]
        if codec != "raw":
            return None
        args = (args,) if isinstance(args, str) else tuple(args)
        mode, stride, ystep = (list(args) + [0, 1])[:3]
        if mode not in RAW_MODES or (rawmode is not None and mode != rawmode) or ystep not in (1, -1):
            return None
        x0, y0, x1, y1 = extents
        if (x0, x1) != (0, width):
            return None  # tiled (not striped) layout: left to Pillow
        item = RAW_MODES[mode][0]
        stride = stride or width * item
        if ystep == 1:
            strips.append((y0, y1, offset, stride, item))
        else:  # bottom-up rows (BMP): row y0 is stored last
            strips.append((y0, y1, offset + (y1 - y0 - 1) * stride, -stride, item))
        rawmode = mode
    return strips, rawmode


def open_image_source(path: str | os.PathLike, channels: int, *, invert: bool | None = False,
                      max_pixels: int | None = None) -> ImageSource:
    """The image at `path` as an `ImageSource`: read lazily when its format allows, else decoded whole.

    Lazy (any size, memory bounded by the window): .npy (uint8, uint16 scaled to [0, 1]; floats as
    they are), and 8-bit gray/RGB stored uncompressed in strips (PGM/PPM, BMP, uncompressed TIFF).
    Decoded whole by `convert.predict.read_image` (its pixel limit applies): everything else Pillow
    opens (PNG, JPEG, compressed TIFF, WebP, 16-bit, alpha, palette images).

    Raises:
        FileNotFoundError, or a ValueError naming the file (not an image, truncated, wrong channels).
    """
    from PIL import Image, UnidentifiedImageError

    from convert.predict import MAX_PIXELS, read_image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found")
    if path.suffix.lower() == NPY_SUFFIX:
        return NpySource(path, channels, invert=invert)
    layout, bomb_limit = None, Image.MAX_IMAGE_PIXELS
    try:
        # Only the header is parsed here: Pillow's decompression-bomb limit (179 megapixels) guards
        # decoding, which lazy reading never does, and read_image's own limit guards the rest.
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(path) as img:
            layout = _raw_strips(img)
            size, image_format = img.size, img.format
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image Pillow can read (PNG, JPEG, BMP, ...)") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {e}") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path} could not be decoded ({e}); the file is truncated or damaged") from None
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit
    if layout is not None:
        strips, rawmode = layout
        return RawImageSource(path, strips, rawmode, size, channels, invert=invert, image_format=image_format)
    array, notes = read_image(path, channels, invert=invert, max_pixels=max_pixels or MAX_PIXELS)
    source = ArraySource(array, channels, name=str(path), notes={"format": image_format, **notes})
    source.notes["inverted"] = notes["inverted"]  # read_image inverted it already
    return source


# ---------------------------------------------------------------------------------------------
# writing


class OutOfSpace(ValueError):
    """A result could not be written: the disk (or a file size limit) is full. Later writes would fail too."""


def write_error(path, e: OSError, needed: int | None = None) -> ValueError:
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        size = f" ({needed / 1e6:.1f} MB needed)" if needed else ""
        return OutOfSpace(f"cannot write {path}: {e.strerror}{size}; free space or write elsewhere")
    return ValueError(f"cannot write {path}: {e.strerror or e}")


class ArraySink:
    """Output kept in memory: `array`, written block by block."""

    def __init__(self, shape, dtype):
        self.array = np.zeros(shape, dtype)

    def write(self, top: int, left: int, block: np.ndarray) -> None:
        self.array[top:top + block.shape[0], left:left + block.shape[1]] = block


class PreviewSink:
    """Every `step`-th cell of every `step`-th row of the output, collected as blocks arrive (for pictures)."""

    def __init__(self, shape, dtype, step: int):
        self.step = step
        self.array = np.zeros((-(-shape[0] // step), -(-shape[1] // step), *shape[2:]), dtype)

    def write(self, top: int, left: int, block: np.ndarray) -> None:
        s = self.step
        r0, c0 = -(-top // s) * s, -(-left // s) * s
        part = block[r0 - top::s, c0 - left::s]
        self.array[r0 // s:r0 // s + part.shape[0], c0 // s:c0 // s + part.shape[1]] = part


def temporary_name(final: Path) -> Path:
    """Where `final` is written before it is complete: a hidden name beside it, unique to this process."""
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


def stale_temporaries(final: Path) -> list[Path]:
    """Temporary files `temporary_name` made for `final` in earlier, interrupted runs."""
    return sorted(final.parent.glob(f".{final.name}.partial-*"))


class NpyFileSink:
    """A .npy result of `shape` and `dtype` written block by block at a temporary name, then renamed into place.

    The file is created with `numpy.lib.format.open_memmap` (header and size), its blocks reserved
    with posix_fallocate, and filled with os.pwrite. `commit()` syncs it and renames it to `final`;
    `abort()` removes it. Errors are ValueErrors naming the file (`OutOfSpace` for a full disk).
    """

    def __init__(self, final: str | os.PathLike, shape, dtype):
        self.final = Path(final)
        self.path = temporary_name(self.final)
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.nbytes = self.shape[0] * self.row_bytes
        self._fd = None
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            created = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=self.shape)
            self.offset = created.offset
            del created
            self._fd = os.open(self.path, os.O_RDWR)
            if self.nbytes and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(self._fd, self.offset, self.nbytes)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
        except OSError as e:
            self.abort()
            raise write_error(self.final, e, self.nbytes) from None

    def write(self, top: int, left: int, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, self.dtype)
        item = self.row_bytes // self.shape[1] if len(self.shape) > 1 and self.shape[1] else self.dtype.itemsize
        try:
            if left == 0 and block.shape[1] == self.shape[1]:
                os.pwrite(self._fd, block.tobytes(), self.offset + top * self.row_bytes)
            else:
                for i, row in enumerate(block):
                    os.pwrite(self._fd, row.tobytes(), self.offset + (top + i) * self.row_bytes + left * item)
        except OSError as e:
            raise write_error(self.final, e, self.nbytes) from None

    def commit(self) -> Path:
        """Sync and rename into place; returns the final path."""
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self.path, self.final)
        except OSError as e:
            self.abort()
            raise write_error(self.final, e) from None
        return self.final

    def close(self) -> None:
        """Sync and close, keeping the temporary name (the caller renames it, `rename_into_place`)."""
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        except OSError as e:
            self.abort()
            raise write_error(self.final, e) from None

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)


def sync_directory(directory: Path) -> None:
    """Make the renames in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
