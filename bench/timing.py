"""What bench/'s scripts share to time things: the median of repeated calls, interleaved
where two or more are compared (a slow spell of this shared machine then falls on each of
them alike), and the machine's name for the record. Imported from beside them."""
from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable


def seconds(call: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `repeats` calls, one after another."""
    return statistics.median(seconds(call) for _ in range(repeats))


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, calls: int = 1
                ) -> dict[str, float]:
    """Median seconds per call of each of `runs`, over `repeats` rounds of one window of
    `calls` calls each, after one untimed call each (compile, allocate)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(seconds(lambda: _repeat(run, calls)) / calls)
    return {name: statistics.median(window) for name, window in times.items()}


def _repeat(call: Callable[[], object], times: int) -> None:
    for _ in range(times):
        call()  # its result dropped at once, as a caller's loop would


def machine() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
