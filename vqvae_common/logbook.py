"""Training records: one JSON object per logged step in metrics.jsonl, and the same scalars
as TensorBoard events in tensorboard/.

metrics.jsonl is the record; the events are rebuilt from it each time a run starts, so the
two always hold the same rows, whatever a kill left unflushed. (Not named logging.py: that
would shadow the standard library.)
"""
from __future__ import annotations

import json
import os
import shutil
from types import TracebackType
from typing import Any

from tensorboardX import SummaryWriter

from vqvae_common.atomic import write_atomic
from vqvae_common.config import EVENTS_FOLDER


class Logbook:
    """Appends to the run's records. `resume_step` keeps the rows up to that step: a resumed
    run replays the steps after its checkpoint and logs them again, so the rows a killed run
    wrote after its checkpoint are dropped. None starts afresh."""

    def __init__(self, out_dir: str, resume_step: int | None = None) -> None:
        path = os.path.join(out_dir, "metrics.jsonl")
        kept = _rows_up_to(path, resume_step) if resume_step is not None else []
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
        self._jsonl = open(path, "a")
        events = os.path.join(out_dir, EVENTS_FOLDER)  # a fresh run's --out holds none that
        #   no run wrote (loop._check_out)
        shutil.rmtree(events, ignore_errors=True)
        self._tb = SummaryWriter(events)
        for row in kept:
            self._add_scalars(row)

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        row = {"split": prefix, **record}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        self._add_scalars(row)

    def sync(self) -> None:
        """Put metrics.jsonl on disk (before a checkpoint counts on its rows being there)."""
        os.fsync(self._jsonl.fileno())

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()

    def __enter__(self) -> Logbook:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def _add_scalars(self, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key not in ("split", "step", "epoch") and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{row['split']}/{key}", value, row["step"])


def _rows_up_to(path: str, step: int) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl up to `step`; a line cut short by a kill is dropped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                rows.append(row)
    return rows
