"""The training loop and the out-of-memory playbook, on LeNet-5 and a few steps of real MNIST.

Each switch is checked against the plain run it must reproduce: accumulation against one big
batch, data parallelism (4 forced CPU devices, and 2 processes with jax.distributed) against
one device, remat against no remat, a killed-and-resumed run against an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from train import data, loop, tasks
from train.config import TrainConfig

pytestmark = pytest.mark.skipif(not data.is_prepared("mnist"), reason="mnist is not prepared (`zoo data prepare mnist`)")

REPO = Path(__file__).resolve().parents[1]
BASE = dict(model="lenet5", model_kwargs={"input_padding": 2, "activation": "relu"}, dataset="mnist",
            epochs=1, batch_size=32, learning_rate=3e-3, schedule="constant", train_examples=128,
            test_examples=64, max_steps=2, progress=False, fast_compile=True)


def run(**changes) -> loop.TrainResult:
    return loop.train(TrainConfig(**{**BASE, **changes}))


def assert_same_weights(a: dict, b: dict, *, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.fixture(scope="module")
def reference() -> loop.TrainResult:
    """Two plain float32 updates of batch 32 on one device."""
    return run()


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("changes, message", [
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(learning_rate=-0.1), "learning_rate must be positive"),
    (dict(batch_size=30, accumulate=4), "accumulate=4 must divide batch_size=30"),
    (dict(dataset="cifar10"), "Known datasets: mnist, fashion_mnist"),
    (dict(model="lenet"), "Known models: lenet5"),
    (dict(optimizer="rmsprop"), "adamw, sgd"),
    (dict(augment_erase=1.5), r"augment_erase is a probability in \[0, 1\]"),
    (dict(init_from="no/such/run/model"), "is not a saved model directory"),
    (dict(variant="fcn32s"), "variant applies to segmentation data sets; 'mnist' is a classification data set"),
    (dict(crop_size=64, pretrained="mnist"), "pretrained, crop_size apply to segmentation data sets"),
    (dict(variant="fcn4s"), "unknown variant 'fcn4s'; use one of fcn32s, fcn16s, fcn8s"),
])
def test_impossible_settings_fail_before_anything_compiles(monkeypatch, changes, message):
    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before checking the settings")

    monkeypatch.setattr(loop, "make_functions", no_compiling)
    monkeypatch.setattr(loop, "init_model", no_compiling)
    with pytest.raises(ValueError, match=message):
        run(**changes)


def test_cli_reports_bad_settings_in_one_line(capsys):
    from zoo.cli import main

    assert main(["train", "lenet5", "--batch-size", "10", "--accumulate", "3"]) == 2
    assert "accumulate=3 must divide batch_size=10" in capsys.readouterr().err


def test_init_from_starts_training_from_saved_weights(tmp_path, reference):
    from zoo import saving

    saved = tmp_path / "model"
    saving.save_model(reference.model, saved, model_name="lenet5")
    shape, classes = data.get_source("mnist").image_shape, 10
    started = saving.flat_state(tasks.build_classifier(TrainConfig(**BASE, init_from=str(saved)), shape, classes))
    trained = saving.flat_state(reference.model)
    assert_same_weights(started, trained, rtol=0, atol=0)
    fresh = saving.flat_state(tasks.build_classifier(TrainConfig(**BASE), shape, classes))
    assert not all(np.array_equal(fresh[k], trained[k]) for k in fresh)  # two updates moved the weights
    with pytest.raises(ValueError, match="holds a 'lenet5' model, but model='mnistnet'"):
        TrainConfig(**{**BASE, "model": "mnistnet", "model_kwargs": {}}, init_from=str(saved)).validate()


# ---------------------------------------------------------------------------------------------
# the playbook: each switch reproduces the plain run


def test_accumulation_gives_the_update_of_the_whole_batch(reference):
    # LeNet-5 has no BatchNorm and no dropout, so 4 micro-batches of 8 must average to the batch of 32.
    result = run(accumulate=4)
    assert_same_weights(result.final_weights, reference.final_weights, rtol=1e-4, atol=1e-6)


def test_bf16_computes_in_bf16_and_keeps_float32_parameters(reference):
    result = run(dtype="bfloat16")
    assert all(w.dtype == np.float32 for w in result.final_weights.values())
    diffs = [np.abs(result.final_weights[k] - reference.final_weights[k]).max() for k in reference.final_weights]
    assert max(diffs) > 0, "bf16 gave bit-identical weights: the computation did not run in bf16"
    # Adam moves each parameter by at most ~lr per step whatever the gradient's scale, so bf16 rounding
    # can at worst flip a step's direction (2 steps: 4 lr); typically it changes the step very little.
    lr, steps = BASE["learning_rate"], BASE["max_steps"]
    assert max(diffs) <= 2 * steps * lr * 1.05
    all_diffs = np.concatenate([np.abs(result.final_weights[k] - reference.final_weights[k]).ravel()
                                for k in reference.final_weights])
    assert np.median(all_diffs) < 0.1 * lr
    model = tasks.build_classifier(TrainConfig(**{**BASE, "dtype": "bfloat16"}), (28, 28, 1), 10)
    assert model(np.zeros((1, 28, 28, 1), np.float32)).dtype == jax.numpy.bfloat16


def test_remat_gives_the_same_weights(reference):
    result = run(remat=True)
    assert_same_weights(result.final_weights, reference.final_weights, rtol=1e-5, atol=1e-6)


def test_remat_wraps_every_backbone_block_and_keeps_parameter_paths():
    model = tasks.build_classifier(TrainConfig(**BASE), (28, 28, 1), 10)
    before = sorted(loop._flat(__import__("flax").nnx.state(model)).keys())
    blocks = loop.remat_blocks(model)
    assert blocks == len(model.features.step_names)
    assert all(type(getattr(model.features, n)).__name__.startswith("Remat") for n in model.features.step_names)
    assert sorted(loop._flat(__import__("flax").nnx.state(model)).keys()) == before


@pytest.mark.skipif(jax.device_count() < 2, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
def test_data_parallel_matches_one_device(reference):
    result = run(data_parallel=True)
    assert_same_weights(result.final_weights, reference.final_weights, rtol=1e-4, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_jax_distributed_match_one(tmp_path, reference):
    worker = textwrap.dedent("""
        import json, sys
        import numpy as np
        from train import parallel
        parallel.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
        import jax
        from train.config import TrainConfig
        from train.loop import train
        assert jax.device_count() == 4 and jax.local_device_count() == 2
        result = train(TrainConfig(**json.loads(sys.argv[3])))
        if jax.process_index() == 0:
            np.savez(sys.argv[4], **result.final_weights)
    """)
    config = json.dumps({**BASE, "data_parallel": True})
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "weights.npz"
    procs = [subprocess.Popen([sys.executable, "-c", worker, coordinator, str(i), config, str(out)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)
    got = dict(np.load(out))
    assert_same_weights(got, reference.final_weights, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# checkpoints: resume after SIGKILL, damaged checkpoints, NaN


KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    from train import checkpoint
    save = checkpoint.Checkpoints.save_latest
    def save_or_die(self, step, state):
        if step == int(sys.argv[2]):  # killed after computing this step, before saving it
            os.kill(os.getpid(), signal.SIGKILL)
        save(self, step, state)
    checkpoint.Checkpoints.save_latest = save_or_die
    from train.config import TrainConfig
    from train.loop import train
    train(TrainConfig(**json.loads(sys.argv[1])))
""")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights_and_damaged_checkpoints_fall_back(tmp_path, capfd):
    # 2 epochs of 4 steps; checkpoints at steps 3 (mid-epoch), 4 (epoch end), 6 (mid-epoch), 8.
    settings = dict(epochs=2, max_steps=None, checkpoint_every=3, keep_checkpoints=2)
    whole = run(**settings, out_dir=str(tmp_path / "whole"))

    killed_dir = tmp_path / "killed"
    config = json.dumps({**BASE, **settings, "out_dir": str(killed_dir)})
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, config, "6"], cwd=REPO, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert sorted(int(p.name) for p in (killed_dir / "checkpoints" / "latest").iterdir() if p.name.isdigit()) == [3, 4]
    resumed = run(**settings, out_dir=str(killed_dir), resume=True)  # from step 4: redoes steps 5..8
    assert resumed.steps == 8
    assert_same_weights(resumed.final_weights, whole.final_weights, rtol=0, atol=1e-7)
    assert [r["step"] for r in resumed.history] == [4, 8]

    # Damage the newest checkpoint of the finished run: resuming reports it, falls back to step 6,
    # redoes steps 7 and 8 and ends where it ended.
    newest = tmp_path / "whole" / "checkpoints" / "latest" / "8"
    for f in newest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "manifest" not in f.name and f.suffix != ".json":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    capfd.readouterr()
    again = run(**settings, out_dir=str(tmp_path / "whole"), resume=True)
    assert "checkpoint at step 8" in capfd.readouterr().err
    assert_same_weights(again.final_weights, whole.final_weights, rtol=0, atol=1e-7)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    from train.checkpoint import Checkpoints

    with pytest.raises(loop.TrainingDiverged, match=r"last good checkpoint \(step \d+\)"):
        run(learning_rate=1e30, max_steps=4, checkpoint_every=1, out_dir=str(tmp_path))
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    step = checkpoints.latest.latest_step()
    assert step is not None and step >= 1
    # The kept checkpoint is restorable and finite (the NaN state was never saved).
    import orbax.checkpoint as ocp

    restored = checkpoints.latest.restore(step, args=ocp.args.StandardRestore())
    leaves = jax.tree.leaves(restored)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves if np.issubdtype(np.asarray(x).dtype, np.floating))


# ---------------------------------------------------------------------------------------------
# outputs


@pytest.mark.slow
def test_cli_trains_and_writes_metrics_curves_and_a_loadable_model(tmp_path, capsys):
    from zoo.cli import main
    from zoo.saving import load_model

    out = tmp_path / "run"
    code = main(["train", "lenet5", "--dataset", "mnist", "--model-kwargs", '{"input_padding": 2}',
                 "--epochs", "2", "--batch-size", "32", "--train-examples", "64", "--test-examples", "64",
                 "--lr", "3e-3", "--ema", "0.9", "--shift", "2", "--rotate", "10", "--scale", "0.1",
                 "--out", str(out), "--no-progress", "--seed", "1", "--fast-compile"])
    assert code == 0
    captured = capsys.readouterr()
    assert "memory estimate" in captured.err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"train_loss", "test_accuracy", "ema_test_accuracy", "learning_rate"} <= records[0].keys()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_model(out / "model")
    meta = json.loads((out / "model" / "model.json").read_text())["metadata"]
    assert meta["dataset"] == "mnist" and meta["preprocessing"]["mean"] == [data.DATASETS["mnist"].mean]
    # The recorded test accuracy is what the saved model scores on the same 64 test images.
    from zoo.pretrained import preprocess

    images, labels = data.load_arrays("mnist", "test[:64]")
    predictions = np.asarray(model(preprocess(images, meta["preprocessing"]))).argmax(-1)
    assert abs((predictions == labels).mean() - meta["test_accuracy"]) < 1e-6
