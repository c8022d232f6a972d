"""Orbax checkpoints of a training run: the latest few for resuming, the best one by accuracy.

    <out_dir>/checkpoints/latest/<step>/   periodic saves (mid-epoch too), the newest `keep` kept
    <out_dir>/checkpoints/best/<step>/     the one with the highest validation accuracy

A checkpoint is the whole training state as one pytree (parameters, BatchNorm statistics,
optimizer state, EMA, step), saved with `ocp.args.StandardSave` and restored into an abstract
template (`jax.ShapeDtypeStruct`s with shardings), as in the Flax NNX checkpointing guide.
Orbax writes a step into a temporary directory and renames it when complete, so a run killed
while saving leaves the previous steps intact. A step that cannot be read (truncated or
corrupted files) is reported and skipped in favour of the previous one.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path

import jax
import orbax.checkpoint as ocp

ACCURACY_KEY = "accuracy"


class CheckpointError(RuntimeError):
    """No readable checkpoint where one was expected."""


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    """The two managers of one run directory.

    Args:
        directory: <out_dir>/checkpoints (created if missing).
        keep: how many of the latest steps to keep (>= 2 leaves a fallback when one is damaged).
    """

    def __init__(self, directory: str | Path, *, keep: int = 2):
        self.directory = Path(directory).absolute()
        common = dict(create=True, enable_async_checkpointing=False)
        with _quiet_orbax():  # reading a damaged step's metadata here is reported by restore_latest
            self._open(keep, common)

    def _open(self, keep: int, common: dict) -> None:
        self.latest = ocp.CheckpointManager(
            self.directory / "latest", options=ocp.CheckpointManagerOptions(max_to_keep=keep, **common))
        self.best = ocp.CheckpointManager(
            self.directory / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda metrics: metrics[ACCURACY_KEY], best_mode="max",
                keep_checkpoints_without_metrics=False, **common))

    def save_latest(self, step: int, state) -> None:
        if step in self.latest.all_steps():
            return
        with _interrupt_after():
            self.latest.save(step, args=ocp.args.StandardSave(state))
            self.latest.wait_until_finished()

    def save_best(self, step: int, state, accuracy: float) -> None:
        """Offer `state` as the best; Orbax keeps it only if its accuracy beats the kept one."""
        if step in self.best.all_steps():
            return
        with _interrupt_after():
            self.best.save(step, args=ocp.args.StandardSave(state), metrics={ACCURACY_KEY: float(accuracy)})
            self.best.wait_until_finished()

    def best_accuracy(self) -> float | None:
        step = self.best.best_step()
        if step is None:
            return None
        for info in self.best._checkpoints:  # noqa: SLF001 (Orbax keeps the metrics there)
            if info.step == step and info.metrics:
                return float(info.metrics[ACCURACY_KEY])
        return None

    def restore_latest(self, template):
        """(step, state) from the newest readable step, or None when there is no checkpoint.

        Args:
            template: a state of the right structure (arrays or ShapeDtypeStructs with shardings).
        Raises:
            CheckpointError when steps exist but none can be read.
        """
        return _restore_newest(self.latest, template, what="latest")

    def restore_best(self, template):
        """(step, state) of the best checkpoint, or None."""
        step = self.best.best_step()
        if step is None:
            return None
        return step, self.best.restore(step, args=ocp.args.StandardRestore(_abstract(template)))

    def close(self) -> None:
        self.latest.close()
        self.best.close()


@contextlib.contextmanager
def _interrupt_after():
    """Hold Ctrl-C (SIGINT) until the block is done, then raise it: an interrupt inside an Orbax save
    stops its event loop while Orbax's own threads still commit the step, which leaves a traceback
    from those threads at exit (and the step may or may not be complete)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs every unreadable file (absl ERROR lines, tracebacks of its threads): we say it in one line."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax", "tensorstore")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    hook, threading.excepthook = threading.excepthook, lambda args: None
    try:
        yield
    finally:
        threading.excepthook = hook
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _restore_newest(manager: ocp.CheckpointManager, template, *, what: str):
    with _quiet_orbax():
        return _restore_newest_loudly(manager, template, what=what)


def _restore_newest_loudly(manager: ocp.CheckpointManager, template, *, what: str):
    manager.reload()  # another process (the killed run) may have written steps
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    abstract = _abstract(template)
    failures = []
    for step in steps:
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # Orbax/tensorstore raise many types for damaged files
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            failures.append(f"step {step}: {reason}")
            print(f"warning: the {what} checkpoint at step {step} in {manager.directory} cannot be read "
                  f"({reason}); it is damaged or incomplete. Falling back to the previous step.",
                  file=sys.stderr, flush=True)
            continue
        for damaged in steps[: steps.index(step)]:  # let the resumed run write those steps again
            manager.delete(damaged)
        return step, restored
    raise CheckpointError(
        f"no readable checkpoint in {manager.directory}:\n  " + "\n  ".join(failures)
        + f"\nTo start over, run without --resume into a new --out, or move {manager.directory} away (only "
          f"that folder: the run's checkpoints/best and model/ hold its best weights).")
