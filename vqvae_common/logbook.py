"""Training records: one JSON object per logged step in metrics.jsonl, and TensorBoard events.

(Not named logging.py: that would shadow the standard library.)
"""
from __future__ import annotations

import json
import os
from typing import Any

from tensorboardX import SummaryWriter


class Logbook:
    """Appends to the run's records. `resume_step` keeps those up to that step (the records
    a killed run wrote after its last checkpoint are replayed by the resumed run); None
    starts afresh."""

    def __init__(self, out_dir: str, resume_step: int | None = None) -> None:
        path = os.path.join(out_dir, "metrics.jsonl")
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f
                        if (step := _step(line)) is not None and step <= resume_step]
        self._jsonl = open(path, "w")
        self._jsonl.writelines(kept)
        self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=resume_step)

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        self._jsonl.write(json.dumps({"split": prefix, **record}) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()


def _step(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line cut short by a kill."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
