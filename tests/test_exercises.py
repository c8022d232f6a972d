"""scripts/exercises.py, which writes docs/EXERCISES.md (Hands-On ML, ch. 14, exercises 1-9).

Its arithmetic is checked against the book's own solution of exercise 2 (903,400 parameters,
12,613,600 bytes for one image, and the book's printed 564.6 MB, which rounds 10.52 MB per image
to 10.5), its helpers against hand counts and numpy, and the whole script end to end by its smoke
run (`--quick`: tiny data, 1-2 steps per training, into a temporary directory) in a subprocess, so
the exercise networks it registers never reach this process's registry.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "exercises.py"


@pytest.fixture(scope="module")
def exercises():
    spec = importlib.util.spec_from_file_location("fcnzoo_exercises_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_book_arithmetic_matches_the_book(exercises):
    right = exercises.book_arithmetic()
    assert right["params"] == 2_800 + 180_200 + 720_400 == 903_400
    assert right["maps"] == [4 * 100 * 150 * 100, 4 * 50 * 75 * 200, 4 * 25 * 38 * 400]
    assert right["inference_bytes"] == 12_613_600
    assert right["training_bytes"] == 565_613_600
    # The book's printed answer, 564.6 MB, comes from rounding the activations to 10.5 MB per image.
    assert exercises.book_arithmetic(per_instance_mb_digits=1)["training_bytes"] == 564_613_600
    assert exercises.book_arithmetic(filter_inputs=3)["params"] == (27 + 1) * 700


def test_boundary_band_counts_pixels_within_two_pixels_of_the_edge(exercises):
    label = np.full((15, 15), 10, np.uint8)  # background
    label[5:10, 5:10] = 3                    # a 5x5 "digit"
    band = exercises.boundary_band(label)
    # Inside: every pixel but the centre (3 px from the outside). Outside: the ring at distance
    # 1 (with its corners, at sqrt 2) and the 20 pixels straight out at distance 2.
    assert band[5:10, 5:10].sum() == 24 and not band[7, 7]
    assert band.sum() - band[5:10, 5:10].sum() == 24 + 20
    assert not exercises.boundary_band(np.full((8, 8), 10, np.uint8)).any()


def test_shift_images_moves_and_fills_with_black(exercises):
    images = np.arange(2 * 6 * 7, dtype=np.uint8).reshape(2, 6, 7, 1) + 1
    for dy, dx in ((2, 0), (-2, 0), (0, 3), (0, -3), (1, -1)):
        expected = np.roll(images, (dy, dx), axis=(1, 2))
        if dy > 0:
            expected[:, :dy] = 0
        elif dy < 0:
            expected[:, dy:] = 0
        if dx > 0:
            expected[:, :, :dx] = 0
        elif dx < 0:
            expected[:, :, dx:] = 0
        np.testing.assert_array_equal(exercises.shift_images(images, dy, dx), expected)


def test_exercise_networks_are_registered_only_inside_the_block(exercises):
    import zoo

    with exercises.exercise_models():
        mlp = zoo.create_model("exercise_mlp", hidden=(27,), abstract=True)
        assert zoo.count_params(mlp) == 784 * 27 + 27 + 27 * 10 + 10
        cnn = zoo.create_model("exercise_cnn", widths=(32, 64, 128), convs_per_stage=(1, 2, 1), abstract=True)
        assert zoo.count_params(cnn) == zoo.get_spec("mnistnet_wide").num_params  # the same layout
    assert not any(name.startswith("exercise_") for name in zoo.list_models())


def test_quick_needs_a_scratch_directory(exercises):
    with pytest.raises(SystemExit, match="--out"):
        exercises.main(["--quick"])


def test_quick_run_writes_every_section_and_figure(exercises, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    page = (tmp_path / "EXERCISES.md").read_text()
    for number in range(1, 10):
        assert f"<!-- data {number}: " in page and f"## {number}. " in page
    assert "not run yet" not in page
    for figure in ("ex1_cnn_vs_mlp.png", "ex3_oom_playbook.png", "ex6_params_vs_flops.png", "ex8_fcn32s_vs_fcn8s.png"):
        data = (tmp_path / "figures" / figure).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5_000, figure
    for number in ("903,400", "12,613,600 B", "565,613,600 B"):
        assert number in page
    # --render rebuilds the same page from the numbers stored in it, running nothing.
    assert exercises.main(["--render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "EXERCISES.md").read_text() == page
