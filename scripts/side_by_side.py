"""Timing for the side-by-side benchmarks: calls alternate between the sides being compared."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternating_medians(fns: dict[str, Callable[[], object]], repeats: int, *, warm_up: bool = True) -> dict:
    """Median seconds per call of each function (each must block until its result is ready).

    One call of every function per round, `repeats` rounds, each starting one function later, so
    background load on a shared machine, and what one call leaves behind for the next, hit every
    side alike. `warm_up`: call each once first, untimed (it compiles).
    """
    if warm_up:
        for fn in fns.values():
            fn()
    return _rounds(fns, repeats)


def alternating_times(fns: dict[str, Callable[[], object]], repeats: int, *, settle: int = 2) -> tuple[dict, dict]:
    """(median seconds per call, seconds of the first call) of each function.

    The first call of each (compilation, warm-up) is timed on its own, then `settle` untimed rounds,
    then `repeats` rounds as in `alternating_medians`. Settling: the heap grows to its steady size
    over a training step's first calls (VGG-16's library step faulted in 1.2 GB of fresh pages in
    each of its first two calls after compiling, none after), as in any long run. A function that
    raises in its first call is dropped (torch.compile failing is a result, not a crash of the
    benchmark): its entry in both dicts is the exception.
    """
    first, live = {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported in the results
            first[name] = e
            continue
        first[name] = time.perf_counter() - start
        live[name] = fn
    _rounds(live, settle)
    medians = _rounds(live, repeats)
    return {name: medians.get(name, first[name]) for name in fns}, first


def _rounds(fns: dict[str, Callable[[], object]], repeats: int) -> dict:
    # Round r starts at the r-th function: what a call leaves behind (memory returned, threads)
    # weighs on the next one (with glibc's allocator the second of two JAX training steps after
    # PyTorch's took 1.14-1.30 s, the first 0.91-0.96 s), so every side takes every place alike.
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(repeats):
        for name in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
