"""Where metrics go: `<workdir>/metrics.jsonl` (one JSON object per line, always with "step"),
TensorBoard event files under `<workdir>/tensorboard`, and absl logging.

Only the primary process (index 0) writes. On resume, lines past the restored step are dropped
first, so the file always describes the run that the checkpoint continues.
"""

import json
import math
import os

from absl import logging

from t5x_like.core import files


def read_metrics(workdir: str) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl` as far as they are written (a line still being
    appended, or torn by a killed run, is skipped); [] before the first."""
    return files.read_jsonl_tolerant(os.path.join(workdir, "metrics.jsonl"))


def _clean(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)  # JSON has no NaN/Infinity


def format_value(value) -> str:
    """A number as the log shows it: counts as integers (tokens=16903), others to 4 significant
    digits (loss=2.346, learning_rate=0.0003), large ones whole (tokens_per_sec=16903)."""
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


class MetricWriter:
    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops lines logged after `step` (they belong to work the restore undid)."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        kept = [r for r in read_metrics(os.path.dirname(self.path)) if r.get("step", 0) <= step]
        files.atomic_write_jsonl(self.path, kept)

    def write(self, step: int, metrics: dict, split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            self._tb.add_scalar(f"{split}/{key}", float(value), int(step))
        shown = " ".join(f"{k}={format_value(v)}" for k, v in metrics.items())
        logging.info("[%s] step %d: %s", split, step, shown)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
