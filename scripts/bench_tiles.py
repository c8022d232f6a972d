"""Huge images in tiles: the error against the whole image as a function of the halo, and memory and speed.

    .venv/bin/python scripts/bench_tiles.py halo              # about 2 minutes on a 2-core CPU
    .venv/bin/python scripts/bench_tiles.py memory            # 2000x2000 vs 20000x20000: about 5 minutes
    .venv/bin/python scripts/bench_tiles.py memory --sizes 2000 --tiles 256 384 512 768 1024   # the tile's cost
    .venv/bin/python scripts/bench_tiles.py memory --sizes 2000 8000 --dtype bfloat16   # on a GPU

`halo`: the shipped segmentation nets and the converted MNIST classifiers on digit scenes with odd
sides, tiled with small tiles (many tile boundaries) at halos from 0 up, against the same predictor
run on the whole image: the largest score difference, the share of cells or pixels whose label
changes, and the cost (pixels computed in all windows / pixels of the whole-image run).

`memory`: a .npy of SIDE x SIDE uint8 pixels (a mosaic of digit scenes, written through a memory map)
segmented into a labels .npy by `convert.stream.run_stream` (the code of `zoo segment BIG.npy --out
DIR/`), each size in its own subprocess, which reports its peak resident memory (VmHWM of
/proc/self/status and getrusage's ru_maxrss) and megapixels per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


# ---------------------------------------------------------------------------------------------
# the halo


def halo_study(args) -> dict:
    import convert
    import zoo
    from train import digit_scenes

    nets = {}
    for name in ("mnistnet", "lenet5"):
        model = zoo.create_model(name, pretrained="mnist")
        model.eval()
        nets[f"{name} (converted classifier)"] = convert.to_fcn(model)
    for name in args.segmentation:
        nets[f"{name} (digit_scenes)"] = convert.load_shipped_segmentation(name, "digit_scenes")
    scenes = [digit_scenes.generate_scene("test", i, size=tuple(args.size)).image[..., None].astype(np.float32) / 255
              for i in range(args.images)]
    rows = []
    for label, net in nets.items():
        whole = convert.DensePredictor(net, tile=1 << 16)
        references = [whole.predict(image) for image in scenes]
        default = convert.DensePredictor(net).halo
        for halo in sorted(set(range(0, args.max_halo + 1, args.halo_step)) | {default}):
            predictor = convert.DensePredictor(net, tile=args.tile, halo=halo)
            worst, changed, cells, computed, canvas = 0.0, 0, 0, 0, 0
            for image, reference in zip(scenes, references):
                plan = predictor.plan(*image.shape[:2])
                result = predictor.predict(image)
                worst = max(worst, float(np.abs(result.scores - reference.scores).max()))
                changed += int((result.labels() != reference.labels()).sum())
                cells += reference.labels().size
                computed += len(plan) * plan.window[0] * plan.window[1]
                canvas += np.prod(reference.bucket)
            rows.append({"network": label, "halo": halo, "default": halo == default, "max_abs_diff": worst,
                         "labels_changed": changed / cells, "cost": computed / canvas,
                         "windows_per_image": len(plan), "window": list(plan.window)})
            print(f"{label:42s} halo {halo:3d}{' (default)' if halo == default else '          '} max|diff| "
                  f"{worst:9.3g}  labels changed {changed / cells:8.2e}  cost x{computed / canvas:.2f}", flush=True)
    return {"tile": args.tile, "image_size": args.size, "images": args.images, "rows": rows}


# ---------------------------------------------------------------------------------------------
# memory and speed


def write_mosaic(path: Path, side: int) -> None:
    """A side x side uint8 .npy of digit scenes, written through a memory map band by band."""
    from train import digit_scenes

    block = 1000
    scenes = [digit_scenes.generate_scene("test", i, size=(block, block)).image for i in range(4)]
    mosaic = np.block([[scenes[0], scenes[1]], [scenes[2], scenes[3]]])  # 2000 x 2000
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(side, side))
    for top in range(0, side, 2 * block):
        rows = min(2 * block, side - top)
        band = np.tile(mosaic[:rows], (1, -(-side // (2 * block))))[:, :side]
        out[top:top + rows] = band
    out.flush()
    del out


def child(args) -> int:
    """One measured run, in a process of its own: segment args.input into args.out, print JSON."""
    import jax

    import convert
    from convert.stream import run_stream

    net, _ = convert.segment.load_any_segmentation(args.model)
    predictor = convert.DensePredictor(net, tile=args.tile or None, dtype=args.dtype)
    before = status_kib("VmHWM")
    summary = run_stream(predictor, args.input, args.out, save=("labels",), progress=False, model=args.model)
    result = {
        "side": args.side, "megapixels": summary.pixels / 1e6, "seconds": summary.seconds,
        "compile_seconds": predictor.compile_seconds, "compilations": predictor.compilations,
        "tile": predictor.tile, "tiles": summary.tiles, "window": list(predictor.plan(args.side, args.side).window),
        "halo": predictor.halo,
        "mpix_per_s": summary.megapixels_per_second,
        "mpix_per_s_without_compiling": summary.pixels / 1e6 / (summary.seconds - predictor.compile_seconds),
        "vmhwm_before_run_mib": before / 1024, "vmhwm_mib": status_kib("VmHWM") / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": jax.devices()[0].platform, "failed": summary.failed,
    }
    print(json.dumps(result))
    return 0


def memory_study(args) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        for side in args.sizes:
            path = Path(work) / f"mosaic-{side}.npy"
            start = time.perf_counter()
            write_mosaic(path, side)
            print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.0f} s",
                  flush=True)
            for tile in args.tiles:
                out = Path(work) / f"out-{side}-{tile}"
                command = [sys.executable, __file__, "child", str(path), str(out), "--side", str(side),
                           "--tile", str(tile), "--model", args.model, "--dtype", args.dtype]
                done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise SystemExit(done.stderr[-3000:])
                row = json.loads(done.stdout.strip().splitlines()[-1])
                labels = np.load(out / f"mosaic-{side}.labels.npy", mmap_mode="r")
                row["labels_shape"] = list(labels.shape)
                del labels
                (out / f"mosaic-{side}.labels.npy").unlink()
                rows.append(row)
                print(json.dumps(row), flush=True)
            path.unlink()
    return {"model": args.model, "dtype": args.dtype, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="study", required=True)
    p = sub.add_parser("halo", help="error against the whole image vs the halo")
    p.add_argument("--segmentation", nargs="+", default=["mnistnet_fcn32s", "mnistnet_fcn16s", "mnistnet_fcn8s",
                                                         "lenet5_fcn8s"])
    p.add_argument("--size", type=int, nargs=2, default=(387, 509), metavar=("H", "W"))
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--max-halo", type=int, default=40)
    p.add_argument("--halo-step", type=int, default=4)
    p.add_argument("--json", help="also write the results here")
    p = sub.add_parser("memory", help="peak memory and speed, one subprocess per image size")
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--tiles", type=int, nargs="+", default=[0], help="tiles to measure (0: the predictor's default)")
    p.add_argument("--model", default="mnistnet_fcn8s-digit_scenes")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--work-dir", default=None, help="where the input and output arrays go (default: the temp dir)")
    p.add_argument("--json", help="also write the results here")
    p = sub.add_parser("child")
    p.add_argument("input")
    p.add_argument("out")
    p.add_argument("--side", type=int)
    p.add_argument("--tile", type=int, default=0)
    p.add_argument("--model")
    p.add_argument("--dtype")
    args = parser.parse_args(argv)
    if args.study == "child":
        return child(args)
    machine = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": os.getloadavg()[0],
               "command": " ".join([Path(sys.executable).name, *sys.argv])}
    results = {**machine, **(halo_study(args) if args.study == "halo" else memory_study(args))}
    results["load_after"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=2))
    return 0


if __name__ == "__main__":
    from zoo import allocator

    allocator.retain_freed_memory()  # as the `zoo` command runs (zoo/allocator.py); FCNZOO_ALLOCATOR=glibc: without
    sys.exit(main())
