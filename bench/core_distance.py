"""How far apart two of this process's CPUs are: the round trip of one cache line between them.

On a virtual machine the host places the vCPUs, and moves them. On this project's 2-core VMs
the round trip between vCPU 0 and vCPU 1 switches every few seconds between levels 2-5x
apart (in C: 75-135 ns, 350-430 ns), and the Flax step is slower in the far placements,
PyTorch's hardly (bench/results_speed_log.md, stop 36). So a bench comparing the twins there
says where each window ran.

    python bench/core_distance.py          # ten probes, one a second

Pure Python: a second process pinned to the other CPU, the two spinning on one shared byte,
so the figures include the interpreter's loop (on those VMs 160-270 ns near, and 330-350 or
390-490 ns far). Linux only (CPU affinity); elsewhere, or with one CPU, there is nothing to
measure.
"""
from __future__ import annotations

import argparse
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

ROUND_TRIPS = 2000  # per burst: about 1 ms
BURSTS = 5  # per probe; the fastest counts, as a burst the scheduler interrupts runs long
BURST_LIMIT_S = 0.02  # a busy CPU can hold each round trip for a time slice: stop early
PROBE_LIMIT_S = 1.0  # past this, a probe gives up, and the probe with it
START_LIMIT_S = 30.0  # for the responder's interpreter to start, on a loaded machine
# The shared byte's values; the file starts zeroed, i.e. at PONG.
PONG, PING, STOP, READY, STOPPED = 0, 1, 3, 4, 5


def respond(fd: int, cpu: int) -> None:
    """The responder, in its own process: for each byte read from stdin, answer pings (byte
    PING -> PONG) until STOP or PROBE_LIMIT_S; exit at the end of its input."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to handle
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

    A probe that fails (the responder stuck or gone) stops the responder, and every later
    probe gives None: a responder out of step could spin into the caller's measurements.
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
                self._stop()
                return self
        self._exchange(START_LIMIT_S, lambda deadline: None)  # the responder has started
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def round_trip_ns(self) -> float | None:
        """The fastest of BURSTS bursts of ROUND_TRIPS round trips (fewer past BURST_LIMIT_S),
        ns per round trip; None where it cannot be measured."""
        return self._exchange(PROBE_LIMIT_S, self._bursts)

    def _exchange(self, limit_s: float, body: Callable[[float], float | None]
                  ) -> float | None:
        """Wakes the responder, runs body(deadline) pinned to cpus[0], stops the responder's
        spinning; on any failure stops the responder for good and returns None."""
        if self._responder is None:
            return None
        deadline = time.perf_counter() + limit_s
        affinity = None
        try:
            affinity = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {self.cpus[0]})  # this thread only
            self._responder.stdin.write(b"g")
            self._responder.stdin.flush()
            self._wait_for(READY, deadline)
            result = body(deadline)
            self._flag[0] = STOP
            self._wait_for(STOPPED, deadline)
            return result
        except (OSError, TimeoutError):
            self._stop()
            return None
        finally:
            if affinity is not None:
                os.sched_setaffinity(0, affinity)

    def _wait_for(self, value: int, deadline: float) -> None:
        while self._flag[0] != value:
            if time.perf_counter() > deadline or self._responder.poll() is not None:
                raise TimeoutError
            time.sleep(0)

    def _bursts(self, deadline: float) -> float:
        flag, best = self._flag, float("inf")
        for _ in range(BURSTS):
            start, done = time.perf_counter(), 0
            while True:
                for _ in range(10):  # the clock read costs more than a round trip
                    flag[0] = PING
                    while flag[0] == PING:
                        if time.perf_counter() > deadline:
                            raise TimeoutError
                done += 10
                elapsed = time.perf_counter() - start
                if done >= ROUND_TRIPS or elapsed > BURST_LIMIT_S:
                    break
            best = min(best, elapsed / done * 1e9)
        return best

    def _stop(self) -> None:
        if self._responder is not None:
            try:
                self._flag[0] = STOP
                self._responder.stdin.close()
                self._responder.wait(timeout=PROBE_LIMIT_S + 1)
            except (OSError, subprocess.TimeoutExpired):
                self._responder.kill()
                self._responder.wait()
        if self._flag is not None:
            self._flag.close()
        self._responder = self._flag = None


if __name__ == "__main__":
    if sys.argv[1:2] == ["--respond"]:
        respond(int(sys.argv[2]), int(sys.argv[3]))
    else:
        argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
        with CoreDistance() as probe:
            print(f"CPUs {probe.cpus}: cache-line round trip, ns")
            for _ in range(10):
                ns = probe.round_trip_ns()
                print("one CPU: nothing to measure" if ns is None else f"{ns:.0f}")
                time.sleep(1)
