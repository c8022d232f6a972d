"""scripts/bench_device.py --smoke: every section of the GPU script runs, at tiny sizes, on the CPU.

The script is what a session with a lent accelerator runs once; this keeps it working between
those sessions. Its PyTorch section checks our logits against PyTorch's on the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_section_runs_at_tiny_sizes(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "scripts/bench_device.py", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert list(sections) == ["checks", "train", "infer", "torch", "dense", "segment", "mnist"]
    assert not [name for name, result in sections.items() if "error" in result]
    checks = sections["checks"]
    assert checks["backend"] == "cpu" and checks["cpu_fast_paths_enabled"] and checks["ok"]
    for dtype in ("float32", "bfloat16"):
        assert sections["train"]["rows"][dtype]["images_per_s"] > 0
        assert sections["train"]["rows"][dtype]["flops_per_step"] > 0
        assert sections["infer"]["rows"][dtype]["images_per_s"] > 0
    torch_checks = sections["torch"]["checks"]
    assert [check["model"] for check in torch_checks] == ["mnistnet"]
    assert torch_checks[0]["rel"] <= 1e-5  # our logits against PyTorch's on the same weights
    assert {row["mode"] for row in sections["torch"]["rows"]} == {"infer", "train"}
    dense = sections["dense"]
    assert {(row["dtype"], row["side"]) for row in dense["rows"]} == {
        (dtype, side) for dtype in ("float32", "bfloat16") for side in report["sizes"]["dense_sides"]}
    assert 1 <= dense["stream"]["compilations"] <= dense["stream"]["images"]
    assert sections["segment"]["seconds_per_image"] > 0
    for run in (sections["mnist"]["time_to_99"], sections["mnist"]["time_to_995"]):
        assert 0 <= run["final_accuracy"] <= 1 and run["whole_run_seconds"] > 0
