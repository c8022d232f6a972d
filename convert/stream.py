"""Many images through one `DensePredictor`: a folder or a glob in, one result per image out.

    summary = run_stream(predictor, "scans/*.png", "results", kind="segment", save=("labels",))

Each image gives `<name>.labels.npy` and/or `<name>.scores.npy` (and `<name>.overlay.png` with
`pictures`) in the output directory, plus `<name>.result.json`, the record of what was written.
Images that need no tiles are batched by bucket (the predictor's executables take a batch
dimension, split over the local devices); larger ones stream through in tiles (`convert.tiles`)
with memory bounded by the tile. With `jax.distributed` each process takes every
`process_count`-th image of the sorted list.

What is on disk is always consistent:
- arrays are written at temporary names (`.<file>.partial-<pid>`) and renamed into place when
  complete; the record is renamed into place before them and names them with their sizes, so a
  result is complete when its record and every file it names exist at those sizes (`--resume`
  skips those); an interrupted run leaves nothing that looks complete;
- a file of the output directory is only replaced or removed when a record of this command names
  it (or it is one of this command's own temporary names): files of others are never touched;
  an image whose result would overwrite one is reported and skipped;
- an unreadable image is reported in one line and skipped; a full disk stops the run (every later
  write would fail too) after removing the partial files.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from convert.tiles import (
    NPY_SUFFIX,
    NpyFileSink,
    OutOfSpace,
    PreviewSink,
    open_image_source,
    stale_temporaries,
    sync_directory,
    temporary_name,
    write_error,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".webp", ".gif", ".npy")
RECORD_FORMAT = "fcnzoo-dense-result-1"
RECORD_SUFFIX = ".result.json"
PICTURE_SUFFIX = ".overlay.png"
PICTURE_SIDE = 2048          # pictures of larger images are drawn subsampled
PENDING_PIXELS = 64_000_000  # small images held for batching, at most (pixels)


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def list_images(spec: str | os.PathLike, out_dir: str | os.PathLike) -> list[tuple[Path, str]]:
    """(image path, output name) for every input of `spec`, sorted: a directory's image files, a glob's
    matches, or one file. The output name is the path relative to the directory (or the glob's
    fixed part) without its suffix, or with it where two inputs would share a name.

    Raises:
        FileNotFoundError: nothing there; ValueError: no images, or --out holds the inputs.
    """
    text = str(spec)
    out = Path(out_dir).resolve()
    if _has_magic(text):
        fixed = Path(*[part for part in Path(text).parts[:next(i for i, part in enumerate(Path(text).parts)
                                                               if _has_magic(part))]] or ["."])
        root, files = fixed, [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
    elif Path(text).is_dir():
        root = Path(text)
        files = [p for p in Path(text).iterdir() if p.is_file() and not p.name.startswith(".")
                 and p.suffix.lower() in IMAGE_SUFFIXES]
    elif Path(text).is_file():
        root, files = Path(text).parent, [Path(text)]
    else:
        raise FileNotFoundError(f"{text} is neither an image file, a directory nor a glob that matches anything")
    if any(p.resolve().parent == out for p in files):
        raise ValueError(f"--out {out_dir} holds the input images; write the results to a directory of their own")
    files = sorted(p for p in files if out not in p.resolve().parents)
    if not files:
        raise ValueError(f"no images in {text} (looked for {', '.join(IMAGE_SUFFIXES)})")
    relative = []
    for p in files:
        try:
            relative.append(p.relative_to(root))
        except ValueError:
            relative.append(Path(p.name))
    stems = [str(r.with_suffix("")) for r in relative]
    return [(p, stem if stems.count(stem) == 1 else str(r)) for p, r, stem in zip(files, relative, stems)]


@dataclasses.dataclass
class StreamSummary:
    """What a run did: images written, skipped as done, failed (path, reason), and its speed."""

    done: int = 0
    already_done: int = 0
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    stopped: str | None = None        # why the run stopped early (a full disk), else None
    not_started: int = 0
    pixels: int = 0
    seconds: float = 0.0
    compilations: int = 0
    tiles: int = 0
    process: tuple[int, int] = (0, 1)

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    @property
    def megapixels_per_second(self) -> float:
        return self.pixels / 1e6 / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "images_per_second": round(self.images_per_second, 3),
                "megapixels_per_second": round(self.megapixels_per_second, 3)}


def _reason(error: Exception, path: Path) -> str:
    """The message of an error about `path`, without the path itself (the report line names it)."""
    text = str(error)
    if text.startswith(f"{path}: "):
        return text[len(f"{path}: "):]
    if text.startswith(f"{path} "):
        return "it " + text[len(f"{path} "):]
    return text


def _fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_record(path: Path) -> dict | None | str:
    """The record at `path`: a dict when this command wrote it, None when there is none, "foreign" else."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return "foreign"
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else "foreign"


def owned_names(record: dict) -> set[str]:
    """The names of the files a record of this command claims (its result and earlier ones it kept)."""
    return set(record.get("files", {})) | set(record.get("earlier_files", []))


def is_complete(record: dict, directory: Path, *, fingerprint: dict, model: str, wanted: set[str]) -> bool:
    """Whether `record` describes a finished result of this input, this model and every wanted file."""
    files = record.get("files", {})
    if record.get("input_fingerprint") != fingerprint or record.get("model") != model or not wanted <= set(files):
        return False
    return all((directory / name).is_file() and (directory / name).stat().st_size == size
               for name, size in files.items())


@dataclasses.dataclass
class _Job:
    path: Path
    name: str                 # output name, relative to the output directory
    record_path: Path
    targets: dict             # kind -> final .npy path
    picture: Path | None
    owned: set = dataclasses.field(default_factory=set)   # names the existing record claims
    source: object = None
    plan: object = None
    fingerprint: dict = None


class _Stream:
    def __init__(self, predictor, out_dir: Path, *, kind: str, save, pictures: bool, resume: bool,
                 invert: bool | None, model: str, class_names, progress: bool, report: Callable[[str], None],
                 max_pixels: int | None):
        if kind not in ("segment", "dense"):
            raise ValueError(f"kind must be 'segment' or 'dense', got {kind!r}")
        if not save and not pictures:
            raise ValueError("nothing to write: save labels and/or scores, or ask for pictures")
        self.predictor, self.out, self.kind, self.save = predictor, out_dir, kind, tuple(save)
        self.pictures, self.resume, self.invert, self.model = pictures, resume, invert, model
        self.class_names = list(class_names) if class_names else None
        self.progress, self.report, self.max_pixels = progress, report, max_pixels
        self.summary = StreamSummary()
        self.pending: dict[tuple[int, int], list[tuple[_Job, np.ndarray]]] = {}

    # -- bookkeeping ----------------------------------------------------------------------------
    def fail(self, job: _Job, reason: str) -> None:
        self.summary.failed.append((str(job.path), reason))
        self.report(f"skipped {job.path}: {reason}")

    def prepare(self, path: Path, name: str) -> _Job | None:
        """The job for one image, or None when it is done already or cannot be done (reported)."""
        final = self.out / name
        job = _Job(path, name, final.with_name(final.name + RECORD_SUFFIX),
                   {k: final.with_name(f"{final.name}.{k}.npy") for k in self.save},
                   final.with_name(final.name + PICTURE_SUFFIX) if self.pictures else None)
        record = read_record(job.record_path)
        if record == "foreign":
            self.fail(job, f"{job.record_path} exists and was not written by this command; move it or choose "
                           f"another --out")
            return None
        job.owned = owned_names(record) if record else set()
        mine = [*job.targets.values(), *([job.picture] if job.picture else [])]
        foreign = [p for p in mine if p.exists() and p.name not in job.owned]
        if foreign:
            self.fail(job, f"its result would overwrite {foreign[0]}, which this command did not write; move it or "
                           f"choose another --out")
            return None
        try:
            job.fingerprint = _fingerprint(path)
        except OSError as e:
            self.fail(job, f"cannot read it ({e.strerror})")
            return None
        wanted = {p.name for p in mine}
        if self.resume and record and is_complete(record, job.record_path.parent, fingerprint=job.fingerprint,
                                                  model=self.model, wanted=wanted):
            self.summary.already_done += 1
            return None
        for final_path in [*mine, job.record_path]:
            for stale in stale_temporaries(final_path):  # left by an interrupted run of this command
                stale.unlink(missing_ok=True)
        try:
            job.source = open_image_source(path, self.predictor.channels, invert=self.invert,
                                           max_pixels=self.max_pixels)
            height, width = job.source.height, job.source.width
            minimum = self.predictor.min_size
            if height < minimum[0] or width < minimum[1]:
                raise ValueError(f"it is {height}x{width} but the network needs at least {minimum[0]}x{minimum[1]} "
                                 f"pixels")
            job.plan = self.predictor.plan(height, width)
        except (ValueError, FileNotFoundError, OSError) as e:
            self.fail(job, _reason(e, path))
            self.close(job)
            return None
        return job

    @staticmethod
    def close(job: _Job) -> None:
        if job.source is not None:
            job.source.close()  # lazy sources reopen their file when read again

    # -- running --------------------------------------------------------------------------------
    def outputs_for(self, job: _Job, shape: tuple[int, int], classes: int):
        """(kind, sink) pairs for a job's result: files at temporary names, previews for its picture."""
        sinks = []
        try:
            for kind, final in job.targets.items():
                full = (*shape, classes) if kind == "scores" else shape
                dtype = np.float32 if kind == "scores" else (np.uint8 if classes <= 256 else np.int32)
                sinks.append((kind, NpyFileSink(final, full, dtype)))
        except ValueError:
            for _, sink in sinks:
                sink.abort()
            raise
        previews = {}
        if job.picture is not None:
            step = self.cell_step(job)
            previews = {"labels": PreviewSink(shape, np.int32, step)}
            if self.kind == "dense":
                previews["confidence"] = PreviewSink(shape, np.float32, step)
        return sinks, previews

    def cell_step(self, job: _Job) -> int:
        """Output cells between the cells a picture shows."""
        pixels = max(1, math.ceil(max(job.source.height, job.source.width) / PICTURE_SIDE))
        return max(1, pixels // (1 if self.kind == "segment" else self.predictor.geometry.stride[0]))

    def run_tiled(self, job: _Job) -> None:
        from tqdm import tqdm

        shape = job.plan.output_size
        sinks, previews = self.outputs_for(job, shape, self.predictor.num_outputs)
        bar = tqdm(total=len(job.plan), desc=f"{job.name} tiles", unit="tile", leave=False,
                   disable=None if self.progress and len(job.plan) >= 4 else True)
        try:
            self.predictor.run_plan(job.plan, job.source, [*sinks, *previews.items()], progress=bar)
            self.finish(job, sinks, previews)
        except Exception:
            for _, sink in sinks:
                sink.abort()
            raise
        finally:
            bar.close()
        self.summary.tiles += len(job.plan)

    def add_small(self, job: _Job) -> None:
        """Hold an image that needs no tiles until a batch of its bucket is full."""
        array = job.source.read_all()
        self.close(job)
        group = self.pending.setdefault(job.plan.window, [])
        group.append((job, array))
        if len(group) >= len(self.predictor.devices) * self.predictor.batch:
            self.flush(job.plan.window)
        elif sum(a.shape[0] * a.shape[1] for g in self.pending.values() for _, a in g) > PENDING_PIXELS:
            self.flush(max(self.pending, key=lambda w: len(self.pending[w]) * w[0] * w[1]))

    def flush(self, window) -> None:
        """Run the held images of one bucket as one batch and write their results."""
        from convert.predict import write_outputs

        group = self.pending.pop(window, [])
        if not group:
            return
        results = self.predictor.predict_batch([array for _, array in group])
        for index, ((job, _), result) in enumerate(zip(group, results)):
            sinks = []
            try:
                sinks, previews = self.outputs_for(job, result.scores.shape[:2], result.scores.shape[-1])
                write_outputs([*sinks, *previews.items()], 0, 0, result.scores)
                self.finish(job, sinks, previews)
            except OutOfSpace:
                for _, sink in sinks:
                    sink.abort()
                self.summary.not_started += len(group) - index - 1
                raise
            except (ValueError, OSError) as e:
                for _, sink in sinks:
                    sink.abort()
                self.fail(job, _reason(e, job.path))

    def finish(self, job: _Job, sinks, previews) -> None:
        """Record, then rename into place (see the module docstring for why in this order)."""
        for _, sink in sinks:
            sink.close()
        files = {sink.final.name: sink.path.stat().st_size for _, sink in sinks}
        picture_tmp = None
        if job.picture is not None:
            picture_tmp = temporary_name(job.picture)
            try:
                self.draw(job, previews, picture_tmp)
            except OSError as e:
                picture_tmp.unlink(missing_ok=True)
                raise write_error(job.picture, e) from None
            files[job.picture.name] = picture_tmp.stat().st_size
        record = {
            "format": RECORD_FORMAT, "input": str(job.path), "input_fingerprint": job.fingerprint,
            "input_size": [job.source.height, job.source.width], "notes": job.source.notes, "model": self.model,
            "kind": self.kind, "output_size": list(job.plan.output_size), "files": files,
            "tiles": len(job.plan), "window": list(job.plan.window), "halo": self.predictor.halo,
            "geometry": self.predictor.geometry.to_dict(),
        }
        if self.class_names:
            record["class_names"] = self.class_names
        # Files of an earlier result that this one does not replace (a picture, scores) stay ours.
        earlier = sorted(n for n in job.owned - set(files) if (job.record_path.parent / n).exists())
        if earlier:
            record["earlier_files"] = earlier
        record_tmp = temporary_name(job.record_path)
        job.record_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            record_tmp.write_text(json.dumps(record, indent=1))
            for _, sink in sinks:
                sink.final.unlink(missing_ok=True)  # an older result of ours (named by the old record)
            if job.picture is not None:
                job.picture.unlink(missing_ok=True)
            os.replace(record_tmp, job.record_path)
            for _, sink in sinks:
                os.replace(sink.path, sink.final)
            if picture_tmp is not None:
                os.replace(picture_tmp, job.picture)
        except OSError as e:
            record_tmp.unlink(missing_ok=True)
            if picture_tmp is not None:
                picture_tmp.unlink(missing_ok=True)
            raise write_error(job.record_path, e) from None
        sync_directory(job.record_path.parent)
        self.summary.done += 1
        self.summary.pixels += job.source.height * job.source.width

    def draw(self, job: _Job, previews, path: Path) -> None:
        """An overlay PNG: the image dimmed, each cell or pixel tinted with its class colour."""
        from PIL import Image

        from convert.segment_view import background_index, class_colors, colorize

        labels = previews["labels"].array
        classes = self.predictor.num_outputs
        background = background_index(self.class_names) if self.class_names else None
        colors = class_colors(classes, background)
        step = max(1, math.ceil(max(job.source.height, job.source.width) / PICTURE_SIDE))
        image = job.source.preview(step)
        if self.kind == "segment":
            rgb = colorize(labels[:image.shape[0], :image.shape[1]], image, colors, background)
        else:  # cells of the converted classifier: the pixels of each cell's stride square
            g = self.predictor.geometry
            index = []
            for axis, n in enumerate(image.shape[:2]):
                pixel = np.arange(n) * step
                cell = np.floor((pixel + 0.5 - g.offset[axis] - (g.receptive_field[axis] - g.stride[axis]) / 2)
                                / g.stride[axis]).astype(int)
                index.append(np.clip(cell // previews["labels"].step, 0, labels.shape[axis] - 1))
            cells = labels[np.ix_(*index)]
            confidence = previews["confidence"].array[np.ix_(*index)]
            gray = image.mean(-1, keepdims=True)
            rgb = np.clip(0.4 * gray + 0.6 * colors[np.minimum(cells, len(colors) - 1)] * confidence[..., None], 0, 1)
        Image.fromarray((rgb * 255).round().astype(np.uint8)).save(path, format="PNG")

    def stop(self, error: OutOfSpace, job: _Job | None, *, remaining: int) -> None:
        """A full disk: every later write would fail as well, so the run ends here."""
        if job is not None:
            self.summary.failed.append((str(job.path), str(error)))
        self.summary.stopped = str(error)
        self.summary.not_started += remaining + sum(len(g) for g in self.pending.values())
        self.pending.clear()
        self.report(f"stopped: {error}")

    def run(self, jobs: list[tuple[Path, str]]) -> StreamSummary:
        from tqdm import tqdm

        start = time.perf_counter()
        compiled_before = self.predictor.compilations
        bar = tqdm(total=len(jobs), desc="images", unit="image", disable=None if self.progress else True)
        try:
            for index, (path, name) in enumerate(jobs):
                job = self.prepare(path, name)
                try:
                    if job is None:
                        continue
                    if job.plan.tiled:
                        self.run_tiled(job)
                    else:
                        self.add_small(job)
                except OutOfSpace as e:
                    self.stop(e, job, remaining=len(jobs) - index - 1)
                    break
                except (ValueError, OSError) as e:
                    self.fail(job, _reason(e, path))
                finally:
                    if job is not None:
                        self.close(job)
                    bar.update(1)
            else:
                for window in list(self.pending):
                    try:
                        self.flush(window)
                    except OutOfSpace as e:
                        self.stop(e, None, remaining=0)
                        break
        finally:
            bar.close()
        self.summary.seconds = time.perf_counter() - start
        self.summary.compilations = self.predictor.compilations - compiled_before
        return self.summary


def _print_above_bars(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def run_stream(predictor, inputs: str | os.PathLike, out_dir: str | os.PathLike, *, kind: str = "segment",
               save=("labels",), pictures: bool = False, resume: bool = False, invert: bool | None = False,
               model: str = "", class_names=None, progress: bool = True, process_index: int = 0,
               process_count: int = 1, report: Callable[[str], None] | None = None,
               max_pixels: int | None = None) -> StreamSummary:
    """Run `predictor` on every image of `inputs` (directory, glob or file) into `out_dir`.

    Args:
        predictor: a `convert.DensePredictor`.
        kind: "segment" (one label per pixel) or "dense" (a converted classifier's cells).
        save: which arrays to write: "labels" ((h, w) uint8, int32 above 256 classes) and/or "scores"
            ((h, w, K) float32).
        pictures: also write an overlay PNG per image (subsampled to PICTURE_SIDE pixels a side).
        resume: skip images whose complete result is there (same input file, same `model`).
        invert: True/False, or None to invert images whose median is light (`read_image`).
        model: names the network in the records (a resumed run only skips results of the same model).
        class_names: written into each record.
        process_index, process_count: this process's share (every process_count-th image).
        report: called with one line per skipped image (default: stderr).
        max_pixels: the pixel limit for images decoded whole (default `convert.predict.MAX_PIXELS`).
    Returns:
        the `StreamSummary` of this process's share.
    """
    out = Path(out_dir)
    jobs = list_images(inputs, out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the results")
    out.mkdir(parents=True, exist_ok=True)
    stream = _Stream(predictor, out, kind=kind, save=save, pictures=pictures, resume=resume, invert=invert,
                     model=model, class_names=class_names, progress=progress,
                     report=report or _print_above_bars, max_pixels=max_pixels)
    stream.summary.process = (process_index, process_count)
    return stream.run(jobs[process_index::process_count])


def output_arrays(out_dir: str | os.PathLike) -> dict[str, dict]:
    """{output name: record} of the complete results in `out_dir` (for reading results back)."""
    out = Path(out_dir)
    found = {}
    for path in sorted(out.rglob("*" + RECORD_SUFFIX)):
        record = read_record(path)
        if isinstance(record, dict) and all((path.parent / n).is_file() and (path.parent / n).stat().st_size == s
                                            for n, s in record["files"].items()):
            found[str(path.relative_to(out))[:-len(RECORD_SUFFIX)]] = record
    return found


# ---------------------------------------------------------------------------------------------
# the command line: `zoo predict-dense` and `zoo segment` on folders, globs and huge images


def add_stream_arguments(parser, *, default_save: str) -> None:
    """The options of a folder run, shared by `zoo predict-dense` and `zoo segment`."""
    group = parser.add_argument_group(
        "folders, globs and huge images",
        "With a directory, a glob (quote it) or a .npy file as input, or an --out that is a directory (existing, or "
        "ending in /), every image is written to --out as <name>.labels.npy / <name>.scores.npy with a record "
        "<name>.result.json; images larger than the tile run in tiles with memory bounded by the tile "
        "(.npy and uncompressed PGM/PPM/BMP/TIFF are read by rows, any size; other formats are decoded whole).")
    group.add_argument("--save", default=default_save,
                       help="arrays to write, comma-separated: labels, scores (default: %(default)s)")
    group.add_argument("--pictures", action="store_true", help="also write <name>.overlay.png per image")
    group.add_argument("--resume", action="store_true", help="skip images whose complete result is in --out")
    group.add_argument("--tile", type=int, help="longest side run whole; larger images are tiled (default: 384 on "
                                                "CPU, 1024 on accelerators)")
    group.add_argument("--halo", type=int, help="pixels of context around each tile's core (default: from the "
                                                "network's receptive field)")
    group.add_argument("--batch", type=int, default=1, help="images or tiles per device per call (default: "
                                                            "%(default)s)")
    group.add_argument("--no-fold", action="store_true", help="keep the BatchNorms as they are (default: folded "
                                                              "into the convolutions before them; same results)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--coordinator", help="host:port of process 0, for a multi-process run (jax.distributed)")
    group.add_argument("--num-processes", type=int, default=1)
    group.add_argument("--process-id", type=int, default=0)


def is_stream_run(image, out) -> bool:
    """Whether a command's input and --out ask for a folder run rather than one picture."""
    if image is None:
        return False
    text = str(image)
    return (_has_magic(text) or Path(text).is_dir() or Path(text).suffix.lower() == NPY_SUFFIX
            or (out is not None and (Path(out).is_dir() or str(out).endswith(("/", os.sep)))))


def start_processes(args) -> tuple[int, int]:
    """Join a multi-process run when --coordinator is given (before anything touches a device)."""
    if not getattr(args, "coordinator", None):
        if getattr(args, "num_processes", 1) != 1:
            raise ValueError("--num-processes needs --coordinator HOST:PORT")
        return 0, 1
    if not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id must be in 0..{args.num_processes - 1}, got {args.process_id}")
    from train import parallel

    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    return jax.process_index(), jax.process_count()


def parse_save(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in ("labels", "scores")]
    if unknown or not kinds:
        raise ValueError(f"--save takes labels and/or scores, comma-separated; got {text!r}")
    return kinds


def run_command(args, predictor, *, kind: str, model: str, class_names=None, invert: bool | None = False,
                process: tuple[int, int] = (0, 1)) -> int:
    """`zoo predict-dense` / `zoo segment` on a folder: run, print the summary, 2 when anything failed."""
    if args.out is None:
        raise ValueError("a folder, glob or .npy input writes its results to a directory: give --out DIR")
    summary = run_stream(predictor, args.image, args.out, kind=kind, save=parse_save(args.save),
                         pictures=args.pictures, resume=args.resume, invert=invert, model=model,
                         class_names=class_names, progress=not args.no_progress and not args.json,
                         process_index=process[0], process_count=process[1])
    command = "predict-dense" if kind == "dense" else "segment"
    if args.json:
        print(json.dumps({"out": str(args.out), **summary.to_dict()}, indent=2))
    else:
        who = f"process {process[0]}/{process[1]}: " if process[1] > 1 else ""
        print(f"{who}{summary.done} image(s) written to {args.out}"
              + (f" ({summary.tiles} tiles)" if summary.tiles else "")
              + (f", {summary.already_done} already done" if summary.already_done else "")
              + (f", {len(summary.failed)} failed" if summary.failed else "")
              + (f", {summary.not_started} not started" if summary.not_started else "")
              + f"; {summary.seconds:.1f} s, {summary.images_per_second:.2f} images/s, "
              f"{summary.megapixels_per_second:.2f} megapixels/s, {summary.compilations} compilation(s)")
    if summary.failed or summary.stopped:
        names = ", ".join(path for path, _ in summary.failed)
        print(f"zoo {command}: error: {len(summary.failed)} image(s) failed: {names}"
              + (f"; stopped early: {summary.stopped}" if summary.stopped else ""), file=sys.stderr)
        return 2
    return 0
