"""Training records: one JSON object per logged step in metrics.jsonl, and TensorBoard events.

(Not named logging.py: that would shadow the standard library.)
"""
from __future__ import annotations

import json
import os
from typing import Any

from tensorboardX import SummaryWriter


class Logbook:
    def __init__(self, out_dir: str, append: bool) -> None:
        self._jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a" if append else "w")
        self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        self._jsonl.write(json.dumps({"split": prefix, **record}) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()
