"""How far apart two of this process's CPUs are: the round trip of one cache line between them.

On a virtual machine the host places the vCPUs, and moves them. On this project's 2-core VMs
the round trip between vCPU 0 and vCPU 1 switches every few seconds between about 80-130 ns
(nearby cores) and 370-430 ns (far apart, in another core complex), measured with C atomics;
the Flax MNIST step took 78 ms in the near placement and 90 ms in the far one, PyTorch's
eager step 80 and 83 ms (bench/results_speed_log.md, stop 36). So a bench comparing the twins
there says in which placement each of its rounds ran.

    python bench/core_distance.py          # ten probes, one a second

Pure Python: a second process pinned to the other CPU, the two spinning on one shared byte,
so the figures include the interpreter's loop: 160-270 ns near, 400-490 ns far on the VM
above. Linux only (CPU affinity); elsewhere, or with one CPU, there is nothing to measure.
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
PING, PONG, READY, STOP, STOPPED = 1, 0, 4, 3, 5  # the shared byte's values


def pong(path: str, cpu: int) -> None:
    """The far side, in its own process: for each byte read from stdin, answer pings (byte
    PING -> PONG) until STOP; exit at end of input."""
    os.sched_setaffinity(0, {cpu})
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 64) as flag:
        while sys.stdin.buffer.read(1):
            flag[0] = READY
            while (value := flag[0]) != STOP:
                if value == PING:
                    flag[0] = PONG
            flag[0] = STOPPED


class CoreDistance:
    """The cache-line round trip between the first two CPUs of this process's affinity:

        with CoreDistance() as probe:
            probe.round_trip_ns()   # None where there is nothing to measure
    """

    def __init__(self) -> None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.cpus = tuple(cpus[:2])
        self._pong = None

    def __enter__(self) -> "CoreDistance":
        if len(self.cpus) == 2:
            fd, self._path = tempfile.mkstemp(prefix="core_distance_")
            os.write(fd, bytes(64))
            os.close(fd)
            self._file = open(self._path, "r+b")
            self._flag = mmap.mmap(self._file.fileno(), 64)
            self._pong = subprocess.Popen([sys.executable, __file__, "--pong", self._path,
                                           str(self.cpus[1])], stdin=subprocess.PIPE)
        return self

    def __exit__(self, *exc) -> None:
        if self._pong is None:
            return
        self._pong.stdin.close()
        self._pong.wait(timeout=10)
        self._flag.close()
        self._file.close()
        os.unlink(self._path)
        self._pong = None

    def round_trip_ns(self) -> float | None:
        """The fastest of BURSTS bursts of ROUND_TRIPS round trips (fewer past BURST_LIMIT_S),
        ns per round trip."""
        if self._pong is None:
            return None
        flag = self._flag
        affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {self.cpus[0]})  # this thread only
        try:
            self._pong.stdin.write(b"g")
            self._pong.stdin.flush()
            while flag[0] != READY:
                if self._pong.poll() is not None:
                    return None
                time.sleep(0)
            best = float("inf")
            for _ in range(BURSTS):
                start, done = time.perf_counter(), 0
                while done < ROUND_TRIPS and time.perf_counter() - start < BURST_LIMIT_S:
                    for _ in range(10):
                        flag[0] = PING
                        while flag[0] == PING:
                            pass
                    done += 10
                best = min(best, (time.perf_counter() - start) / done * 1e9)
            flag[0] = STOP
            while flag[0] != STOPPED:
                time.sleep(0)
            return best
        finally:
            os.sched_setaffinity(0, affinity)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pong"]:
        pong(sys.argv[2], int(sys.argv[3]))
    else:
        with CoreDistance() as probe:
            print(f"CPUs {probe.cpus}: cache-line round trip, ns")
            for _ in range(10):
                ns = probe.round_trip_ns()
                print("one CPU: nothing to measure" if ns is None else f"{ns:.0f}")
                time.sleep(1)
