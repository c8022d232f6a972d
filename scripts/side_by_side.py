"""Timing for the side-by-side benchmarks: calls alternate between the sides being compared."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternating_medians(fns: dict[str, Callable[[], object]], repeats: int, *, warm_up: bool = True) -> dict:
    """Median seconds per call of each function (each must block until its result is ready).

    One call of every function per round, `repeats` rounds, so background load on a shared
    machine hits every side alike. `warm_up`: call each once first, untimed (it compiles).
    """
    if warm_up:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
