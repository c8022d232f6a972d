"""`zoo segment` / `zoo predict-dense` on folders: one result per image, resume, bad input, devices, hosts.

The reference everywhere is the predictor run image by image in this process (one device), whose
tiling is itself checked against whole-image runs in tests/test_tiles.py. Subprocesses give what
one process cannot: 4 forced CPU devices, 2 processes joined by jax.distributed, a SIGKILL in the
middle of a write, a file-size limit (RLIMIT_FSIZE) standing in for a full disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from test_train import _free_port  # the helper of the training loop's two-process test

import convert
from convert import stream

REPO = Path(__file__).resolve().parents[1]
NET = "mnistnet_fcn8s-digit_scenes"
# Three images of one bucket (96x128), one of another, one in tiles (tile 128: windows of 128).
SIZES = {"a": (90, 100), "b": (85, 110), "c": (96, 128), "d": (60, 70), "z_big": (300, 260)}


def _env(devices: int = 1) -> dict:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from train import digit_scenes

    folder = tmp_path_factory.mktemp("images")
    for index, (name, size) in enumerate(SIZES.items()):
        pixels = digit_scenes.generate_scene("test", index, size=size).image
        if name == "z_big":
            np.save(folder / f"{name}.npy", pixels)  # read by rows
        else:
            Image.fromarray(pixels).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def reference(images) -> dict:
    """{name: (labels, scores)}: each image through the predictor, one at a time, on one device."""
    net, _ = convert.segment.load_any_segmentation(NET)
    predictor = convert.DensePredictor(net, tile=128, devices=jax.local_devices()[:1])
    out = {}
    for path in sorted(images.iterdir()):
        source = convert.tiles.open_image_source(path, 1, invert=None)
        result = predictor.predict(source.read_all())
        out[path.stem] = (result.labels(), result.scores)
    return out


def assert_results_match(out: Path, reference: dict, names=None) -> None:
    for name in names or reference:
        labels, scores = reference[name]
        np.testing.assert_allclose(np.load(out / f"{name}.scores.npy"), scores, rtol=0, atol=1e-4)
        # Labels may only differ where two classes tie to float rounding.
        top2 = np.sort(scores, axis=-1)[..., -2:]
        differ = np.load(out / f"{name}.labels.npy") != labels
        assert not (differ & (top2[..., 1] - top2[..., 0] > 1e-3)).any(), name


def zoo(argv, capsys) -> tuple[int, str, str]:
    from zoo.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_folder_run_skips_bad_files_keeps_foreign_ones_and_resumes(images, reference, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in images.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "notes.txt").write_text("not an image")  # not an image by its name: not an input
    full = (folder / "a.png").read_bytes()
    (folder / "m_cut.png").write_bytes(full[:len(full) // 2])  # truncated, in the middle of the list
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.labels.npy").write_bytes(b"somebody else's file")  # collides with b's result
    (out / "keep.txt").write_text("also not ours")
    theirs = snapshot(out)

    args = ["segment", str(folder), "--out", str(out), "--model", NET, "--tile", "128", "--save", "labels,scores",
            "--pictures", "--no-progress"]
    code, text, err = zoo(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 3, err
    assert lines[0].startswith(f"skipped {folder / 'b.png'}: its result would overwrite")
    assert lines[1].startswith(f"skipped {folder / 'm_cut.png'}: ") and "truncated" in lines[1]
    assert lines[2].startswith("zoo segment: error: 2 image(s) failed:")
    assert "4 image(s) written" in text and "images/s" in text and "megapixels/s" in text
    assert_results_match(out, reference, ["a", "c", "d", "z_big"])
    assert {k: v for k, v in snapshot(out).items() if k in theirs} == theirs  # untouched
    record = json.loads((out / "z_big.result.json").read_text())
    assert record["tiles"] == 16 and record["window"] == [128, 128] and record["notes"]["format"] == "npy"
    with Image.open(out / "z_big.overlay.png") as picture:
        assert picture.size == (260, 300)
    assert not list(out.glob(".*partial*"))

    # Resumed: the four results are kept as they are, the two bad images are reported again.
    ours = {k: v for k, v in snapshot(out).items() if k not in theirs}
    code, text, err = zoo([*args, "--resume", "--json"], capsys)
    summary = json.loads(text)
    assert code == 2 and summary["already_done"] == 4 and summary["done"] == 0 and len(summary["failed"]) == 2
    assert {k: v for k, v in snapshot(out).items() if k not in theirs} == ours
    assert set(stream.output_arrays(out)) == {"a", "c", "d", "z_big"}


def test_predict_dense_on_a_glob(images, tmp_path, capsys):
    from convert.checkpoint import load_any

    out = tmp_path / "dense"
    code, text, err = zoo(["predict-dense", "lenet5", str(images / "*.png"), "--out", str(out), "--tile", "64",
                           "--json"], capsys)
    assert code == 0, err
    assert json.loads(text)["done"] == 4
    predictor = convert.DensePredictor(load_any("lenet5"))  # the same random weights (fixed seed)
    for name in ("a", "c"):
        expected = predictor.predict(convert.predict.read_image(images / f"{name}.png", 1)[0])
        np.testing.assert_allclose(np.load(out / f"{name}.scores.npy"), expected.scores, rtol=0, atol=1e-5)
        assert (np.load(out / f"{name}.labels.npy") == expected.labels()).all()


KILLED = textwrap.dedent("""
    import os, signal, sys
    from convert import tiles
    write = tiles.NpyFileSink.write
    def write_or_die(self, top, left, block):
        if self.final.name.startswith("z_big") and top > 0:  # the tiled image's second row of tiles
            os.kill(os.getpid(), signal.SIGKILL)
        write(self, top, left, block)
    tiles.NpyFileSink.write = write_or_die
    from zoo.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_killed_run_leaves_nothing_that_looks_complete_and_resumes(images, reference, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["segment", str(images), "--out", str(out), "--model", NET, "--tile", "128", "--save", "labels,scores",
            "--no-progress"]
    done = subprocess.run([sys.executable, "-c", KILLED, *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert set(stream.output_arrays(out)) == {"a", "b", "c", "d"}  # written before the kill
    assert list(out.glob(".z_big.*partial-*"))                       # half-written, under a temporary name
    assert not (out / "z_big.labels.npy").exists()
    code, text, err = zoo([*args, "--resume"], capsys)
    assert code == 0, err
    assert "1 image(s) written" in text and "4 already done" in text
    assert not list(out.glob(".*partial*"))
    assert_results_match(out, reference)


FILE_LIMIT = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # files above 300 kB cannot be written
    from zoo.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_full_disk_stops_the_run_cleanly(images, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    # first: 60x70 (185 kB of scores) fits; second: 90x100 (396 kB) does not.
    for name, image in (("first", "d"), ("second", "a"), ("third", "c")):
        (folder / f"{name}.png").write_bytes((images / f"{image}.png").read_bytes())
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", FILE_LIMIT, "segment", str(folder), "--out", str(out), "--model", NET,
                           "--save", "labels,scores", "--no-progress"], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("stopped: cannot write") and "File too large" in lines[0]
    assert lines[1].startswith("zoo segment: error:") and "stopped early" in lines[1]
    assert set(stream.output_arrays(out)) == {"first"}
    assert sorted(p.name for p in out.iterdir()) == ["first.labels.npy", "first.result.json",
                                                     "first.scores.npy"]  # no partial files
    assert "1 image(s) written" in done.stdout and "1 not started" in done.stdout


DEVICES = textwrap.dedent("""
    import json, sys
    import jax
    import convert
    from convert.stream import run_stream
    assert jax.local_device_count() == 4
    net, _ = convert.segment.load_any_segmentation(sys.argv[3])
    predictor = convert.DensePredictor(net, tile=128, batch=2)
    summary = run_stream(predictor, sys.argv[1], sys.argv[2], save=("labels", "scores"), invert=None, progress=False)
    print(json.dumps({"buckets": predictor.buckets, "done": summary.done}))
""")


def test_four_devices_give_the_results_of_one(images, reference, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", DEVICES, str(images), str(out), NET], cwd=REPO, env=_env(4),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["done"] == 5
    # The three images of one bucket ran as one batch over the 4 devices, the 16 tiles in batches of 8.
    assert [4, 96, 128] in report["buckets"] and [8, 128, 128] in report["buckets"]
    assert_results_match(out, reference)


def test_two_processes_with_jax_distributed_match_one(images, reference, tmp_path):
    worker = "import sys\nfrom zoo.cli import main\nsys.exit(main(sys.argv[1:]))"
    out = tmp_path / "out"
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", worker, "segment", str(images), "--out", str(out),
                               "--model", NET, "--tile", "128", "--save", "labels,scores", "--no-progress",
                               "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i)],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)
    # Sorted a, b, c, d, z_big: process 0 takes a, c, z_big; process 1 takes b, d.
    assert "process 0/2: 3 image(s) written" in logs[0] and "process 1/2: 2 image(s) written" in logs[1]
    assert_results_match(out, reference)
