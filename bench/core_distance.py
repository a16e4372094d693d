"""How far apart two of this process's CPUs are: the round trip of one cache line between them.

On a virtual machine the host places the vCPUs, and moves them. On this project's 2-core VMs
the round trip between vCPU 0 and vCPU 1 switches every few seconds between two levels about
3x apart, and the Flax step is slower in the far placement, PyTorch's hardly
(bench/results_speed_log.md, stop 36, has the figures). So a bench comparing the twins there
says in which placement each window ran.

    python bench/core_distance.py          # ten probes, one a second

Pure Python: a second process pinned to the other CPU, the two spinning on one shared byte,
so the figures include the interpreter's loop (160-270 ns near, 330-490 ns far on those VMs,
against 75-135 and 350-430 in C). Linux only (CPU affinity); elsewhere, or with one CPU,
there is nothing to measure.
"""
from __future__ import annotations

import mmap
import os
import subprocess
import sys
import tempfile
import time

ROUND_TRIPS = 2000  # per burst: about 1 ms
BURSTS = 5  # per probe; the fastest counts, as a burst the scheduler interrupts runs long
BURST_LIMIT_S = 0.02  # a busy CPU can hold each round trip for a time slice: stop early
PROBE_LIMIT_S = 1.0  # past this, a probe gives up (the responder is stuck or gone)
PING, PONG, READY, STOP, STOPPED = 1, 0, 4, 3, 5  # the shared byte's values


def respond(fd: int, cpu: int) -> None:
    """The responder, in its own process: for each byte read from stdin, answer pings (byte
    PING -> PONG) until STOP or PROBE_LIMIT_S; exit at the end of its input."""
    os.sched_setaffinity(0, {cpu})
    with mmap.mmap(fd, 64) as flag:
        while sys.stdin.buffer.read(1):
            flag[0] = READY
            deadline = time.perf_counter() + PROBE_LIMIT_S
            while (value := flag[0]) != STOP:
                if value == PING:
                    flag[0] = PONG
                elif time.perf_counter() > deadline:
                    break
            flag[0] = STOPPED


class CoreDistance:
    """The cache-line round trip between the first two CPUs of this process's affinity:

        with CoreDistance() as probe:
            probe.round_trip_ns()   # None where there is nothing to measure
    """

    def __init__(self) -> None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.cpus = tuple(cpus[:2])
        self._flag: mmap.mmap | None = None
        self._responder: subprocess.Popen | None = None

    def __enter__(self) -> "CoreDistance":
        if len(self.cpus) < 2:
            return self
        with tempfile.TemporaryFile() as shared:  # unlinked already: nothing left behind
            shared.write(bytes(64))
            shared.flush()
            self._flag = mmap.mmap(shared.fileno(), 64)
            try:
                self._responder = subprocess.Popen(
                    [sys.executable, __file__, "--respond", str(shared.fileno()),
                     str(self.cpus[1])], stdin=subprocess.PIPE, pass_fds=(shared.fileno(),))
            except OSError:
                self._flag.close()
                self._flag = None
        return self

    def __exit__(self, *exc) -> None:
        if self._responder is None:
            return
        try:
            self._flag[0] = STOP  # in case a probe was cut short
            self._responder.stdin.close()
            self._responder.wait(timeout=PROBE_LIMIT_S + 1)
        except (OSError, subprocess.TimeoutExpired):
            self._responder.kill()
        finally:
            self._flag.close()
            self._responder = self._flag = None

    def round_trip_ns(self) -> float | None:
        """The fastest of BURSTS bursts of ROUND_TRIPS round trips (fewer past BURST_LIMIT_S),
        ns per round trip; None where it cannot be measured."""
        if self._responder is None:
            return None
        affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {self.cpus[0]})  # this thread only
        try:
            return self._probe(self._flag, time.perf_counter() + PROBE_LIMIT_S)
        except (OSError, TimeoutError):  # the responder is gone or stuck
            return None
        finally:
            os.sched_setaffinity(0, affinity)

    def _probe(self, flag: mmap.mmap, deadline: float) -> float:
        def wait_for(value: int) -> None:
            while flag[0] != value:
                if time.perf_counter() > deadline or self._responder.poll() is not None:
                    raise TimeoutError
                time.sleep(0)

        self._responder.stdin.write(b"g")
        self._responder.stdin.flush()
        wait_for(READY)
        best = float("inf")
        for _ in range(BURSTS):
            start, done = time.perf_counter(), 0
            while done < ROUND_TRIPS and time.perf_counter() - start < BURST_LIMIT_S:
                for _ in range(10):  # the clock read costs more than a round trip
                    flag[0] = PING
                    while flag[0] == PING:
                        if time.perf_counter() > deadline:
                            raise TimeoutError
                    done += 1
            best = min(best, (time.perf_counter() - start) / done * 1e9)
        flag[0] = STOP
        wait_for(STOPPED)
        return best


def placements(distances: list[float]) -> list[list[int]]:
    """The indices of `distances` grouped by placement, nearest first: split at the largest
    step between neighbouring sorted probes where it is over 1.35x, else one group. (On the
    VMs above the near and far levels are 1.6x or more apart, while the probes of one level
    step by 1.1-1.2x; two lone probes of one level can still be split.)"""
    order = sorted(range(len(distances)), key=distances.__getitem__)
    steps = [distances[b] / distances[a] for a, b in zip(order, order[1:])]
    if not steps or max(steps) <= 1.35:
        return [list(range(len(distances)))]
    cut = steps.index(max(steps)) + 1
    return [sorted(order[:cut]), sorted(order[cut:])]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--respond"]:
        respond(int(sys.argv[2]), int(sys.argv[3]))
    else:
        with CoreDistance() as probe:
            print(f"CPUs {probe.cpus}: cache-line round trip, ns")
            for _ in range(10):
                ns = probe.round_trip_ns()
                print("one CPU: nothing to measure" if ns is None else f"{ns:.0f}")
                time.sleep(1)
