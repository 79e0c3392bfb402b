"""The log of a training run: metrics.jsonl (one JSON object per logged step or validation) and, when the
tensorboard package is installed, the same scalars as TensorBoard logs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from dsmr.core.atomic import atomic_write_text


class MetricsLog:
    """metrics.jsonl: records kept in memory, the file rewritten atomically (at saves, or every 30 s); the
    same numbers to TensorBoard when asked and installed."""

    def __init__(self, path: Path, keep_until_step: int | None = None, write: bool = True):
        self.path = path
        self.write = write  # False on ranks other than 0: records are kept, nothing is written
        self.records: list[dict] = []
        if keep_until_step is not None and path.is_file():  # resume: drop what came after the checkpoint
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise ValueError("not an object")
                    except ValueError:
                        print(f"dsmr train: {path}, line {number}: damaged record dropped", file=sys.stderr)
                        continue
                    step_of = record.get("step", 0)
                    if not isinstance(step_of, (int, float)) or step_of <= keep_until_step:
                        self.records.append(record)
        self._flushed = time.monotonic()
        self._writer = None

    def open_tensorboard(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self._writer = SummaryWriter(str(folder))

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._writer.add_scalar(key, value, record["step"])
                elif key == "gates" and value is not None:
                    for layer, g in enumerate(value):
                        g = float(np.mean(g))
                        self._writer.add_scalar(f"gate/layer{layer}", g, record["step"])
        if time.monotonic() - self._flushed > 30:
            self.flush()

    def flush(self) -> None:
        if not self.write:
            return
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        if self._writer is not None:
            self._writer.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        if not self.write:
            return
        self.flush()
        if self._writer is not None:
            self._writer.close()
