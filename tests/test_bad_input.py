"""One policy for bad input across the `zoo` commands: one line, exit code 2, nothing on disk changed.

Each row of the table is a command a careless user may type, the words its one-line error must
hold, and the files whose bytes must be the same afterwards (a refused command changes nothing).
The reference is the file system itself: every file under the test's directory is hashed before
and after.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import zoo
from zoo import saving

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved classifier, a finished run, a folder of the user's, damaged copies of a saved model."""
    root = tmp_path_factory.mktemp("world")
    model = zoo.create_model("lenet5", rngs=0, input_padding=2)
    saving.save_model(model, root / "classifier", model_name="lenet5", kwargs={"input_padding": 2},
                      metadata={"preprocessing": {"scale": 1 / 255, "mean": [0.13], "std": [0.31]}})
    run = root / "run"
    (run / "checkpoints" / "latest" / "4").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": "lenet5", "epochs": 3}))
    (run / "metrics.jsonl").write_text('{"step": 4}\n')
    mine = root / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (root / "empty").mkdir()
    from PIL import Image

    bomb = root / "bomb"  # 72-megapixel images (small files): refused from their headers
    for part in ("images", "masks"):
        (bomb / part).mkdir(parents=True)
        for name in ("a", "b"):
            Image.new("L", (9000, 8000)).save(bomb / part / f"{name}.png")
    (bomb / "classes.txt").write_text("background\nthing\n")
    for name, change in (("no_kwargs", lambda c: c.pop("kwargs")), ("list_kwargs", lambda c: c.update(kwargs=[])),
                         ("not_json", None)):
        damaged = root / name
        damaged.mkdir()
        (damaged / saving.WEIGHTS_FILE).write_bytes((root / "classifier" / saving.WEIGHTS_FILE).read_bytes())
        config = json.loads((root / "classifier" / saving.CONFIG_FILE).read_text())
        text = "{not json" if change is None else (change(config), json.dumps(config))[1]
        (damaged / saving.CONFIG_FILE).write_text(text)
    # Weights that were replaced after saving (sha256 differs), and weights holding NaN.
    replaced = root / "replaced"
    replaced.mkdir()
    (replaced / saving.CONFIG_FILE).write_bytes((root / "classifier" / saving.CONFIG_FILE).read_bytes())
    other = zoo.create_model("lenet5", rngs=1, input_padding=2)
    saving.save_model(other, root / "other", model_name="lenet5", kwargs={"input_padding": 2})
    (replaced / saving.WEIGHTS_FILE).write_bytes((root / "other" / saving.WEIGHTS_FILE).read_bytes())
    broken = zoo.create_model("lenet5", rngs=0, input_padding=2)
    broken.features.conv1.kernel.set_value(broken.features.conv1.kernel[...] * np.nan)
    saving.save_model(broken, root / "nan", model_name="lenet5", kwargs={"input_padding": 2})
    return root


ROWS = {
    "train into a finished run": (["train", "lenet5", "--out", "{run}", "--max-steps", "1"], ["already holds a training run", "--resume"]),
    "train into the user's folder": (["train", "lenet5", "--out", "{mine}"], ["not a training run"]),
    "train into a file": (["train", "lenet5", "--out", "{mine}/thesis.tex"], ["is a file"]),
    "resume where nothing ran": (["train", "lenet5", "--out", "{empty}", "--resume"], ["no checkpoint", "drop --resume"]),
    "a mistyped model option": (["train", "lenet5", "--model-kwargs", '{"input_paddin": 2}'], ["did you mean 'input_padding'"]),
    "import into a saved model": (["import", "torch", "resnet18", "{root}/nope.pth", "--out", "{classifier}"], ["already holds a saved model"]),
    "import into the user's folder": (["import", "torch", "resnet18", "{root}/nope.pth", "--out", "{mine}"], ["did not write", "thesis.tex"]),
    "convert a model.json without kwargs": (["convert", "{no_kwargs}", "--out", "{root}/fcn1"], ["lacks 'kwargs'"]),
    "convert a model.json with a wrong type": (["convert", "{list_kwargs}", "--out", "{root}/fcn2"], ["has a list for 'kwargs'"]),
    "convert damaged JSON": (["convert", "{not_json}", "--out", "{root}/fcn3"], ["not valid JSON"]),
    "convert replaced weights": (["convert", "{replaced}", "--out", "{root}/fcn4"], ["sha256"]),
    "convert NaN weights": (["convert", "{nan}", "--out", "{root}/fcn5"], ["NaN or infinite", "features.conv1.kernel"]),
    "convert onto its own source": (["convert", "{classifier}", "--out", "{classifier}"], ["did not write"]),
    "segment-train into a finished run": (["segment-train", "--backbone", "mnistnet", "--out", "{run}"], ["holds checkpoints", "new or empty"]),
    "prepare images of 72 megapixels": (["data", "prepare-segmentation", "{bomb}", "--name", "bombs", "--data-dir",
                                         "{root}/tfds"], ["72 megapixels", "limit"]),
    "a family that does not exist": (["list", "--family", "nope"], ["no model of family 'nope'", "resnet"]),
    "segment with an unknown net": (["segment", "--scene", "64x64", "--model", "nonesuch"], ["shipped"]),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_one_line_and_changes_nothing(row, world, capsys):
    from zoo.cli import main

    argv, words = ROWS[row]
    paths = {p.name: str(p) for p in world.iterdir()} | {"root": str(world)}
    argv = [a.format(**paths) if not a.startswith("{\"") else a for a in argv]
    before = _tree(world)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (row, err)
    assert len(err) == 1 and err[0].startswith(f"zoo {argv[0]}: error: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    assert _tree(world) == before, "a refused command changed files on disk"


def test_debug_shows_the_traceback(world):
    from zoo.cli import main

    with pytest.raises(ValueError, match="no model of family"):
        main(["--debug", "list", "--family", "nope"])


@pytest.mark.slow
def test_ctrl_c_during_training_says_where_and_how_to_resume(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "zoo.cli", "train", "lenet5", "--model-kwargs", '{"input_padding": 2}',
               "--train-examples", "20000", "--test-examples", "100", "--batch-size", "16", "--epochs", "1",
               "--checkpoint-every", "5", "--fast-compile", "--no-progress", "--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    latest = out / "checkpoints" / "latest"
    for _ in range(600):  # up to 60 s for the first checkpoint
        if latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir()):
            break
        try:
            process.wait(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            pass
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("zoo train: interrupted: at step ") and "--resume" in last, last
    assert "Traceback" not in err
