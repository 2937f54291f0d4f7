"""Training metrics as a file per run (JSONL or CSV), plus TensorBoard events when installed.

Records have ``kind`` "train" (every ``log_every`` steps: loss, top-1 over the window, LR,
mean gradient norm, images/s, and ``nonfinite``: how many non-finite losses or gradients, when
any), "val" (each epoch: loss, top-1, top-5) or "stop" (the run diverged; ``reason`` is
nonfinite, start, exploded or dead). ``epoch`` is fractional for train records
(step / steps per epoch), so both kinds share an x axis. A resumed run first drops the records
written after its checkpoint, so the file never shows a step twice.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from verydeep.core.atomic import atomic_path, write_error

#: The CSV columns (a record leaves the ones that do not apply empty).
COLUMNS = (
    "kind",
    "step",
    "epoch",
    "loss",
    "top1",
    "top5",
    "lr",
    "grad_norm",
    "nonfinite",
    "images_per_s",
    "elapsed_s",
    "reason",
)
#: Columns holding text, not numbers.
TEXT_COLUMNS = ("kind", "reason")
FILES = {"jsonl": "metrics.jsonl", "csv": "metrics.csv"}


def metrics_path(run_dir: str | os.PathLike[str]) -> Path:
    """The metrics file of a run (whichever format it was written in)."""
    run_dir = Path(run_dir)
    for name in FILES.values():
        if (run_dir / name).exists():
            return run_dir / name
    raise FileNotFoundError(f"{run_dir}: no metrics.jsonl or metrics.csv")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a metrics file or run folder, in order, numbers as numbers."""
    path = Path(path)
    if path.is_dir():
        path = metrics_path(path)
    text = path.read_text()
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        return [{k: v if k in TEXT_COLUMNS else _number(v) for k, v in row.items() if v != ""} for row in rows]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


class MetricsLog:
    """Appends records to RUN_DIR/metrics.{jsonl,csv} (flushed each time) and TensorBoard."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        fmt: str = "jsonl",
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / FILES[fmt]
        self.fmt = fmt
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        new = not self.path.exists()
        with self._os_errors():
            self.file = open(self.path, "a", newline="")
            if fmt == "csv":
                self.csv = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="ignore")
                if new:
                    self.csv.writeheader()
        self.tb = _tensorboard_writer(self.run_dir / "tensorboard", resume_step) if tensorboard else None

    def _truncate_after(self, step: int) -> None:
        """Keep records of steps <= ``step`` (those that the checkpoint already accounts for)."""
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            if self.fmt == "csv":
                w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
                w.writeheader()
                w.writerows(kept)
            else:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: dict[str, Any]) -> None:
        # NaN and infinities are left out: the file stays strict JSON (a missing value is missing).
        record = {
            k: v for k, v in record.items() if v is not None and not (isinstance(v, float) and not math.isfinite(v))
        }
        with self._os_errors():
            if self.fmt == "csv":
                self.csv.writerow(record)
            else:
                self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tb is not None:
            kind, step = record["kind"], record["step"]
            for key in ("loss", "top1", "top5", "lr", "grad_norm", "images_per_s"):
                if key in record:
                    self.tb.add_scalar(f"{kind}/{key}", record[key], step)
            self.tb.flush()

    @contextmanager
    def _os_errors(self) -> Iterator[None]:
        """The metrics file is appended to, not replaced: its OS errors (disk full) as one line too."""
        try:
            yield
        except OSError as e:
            raise (write_error(self.path, e) or e) from None

    def close(self) -> None:
        with suppress(OSError):  # the flush of a full disk: the error was reported by write()
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard_writer(folder: Path, resume_step: int | None) -> Any:
    """A SummaryWriter, or None (with a note) when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("note: tensorboard is not installed; writing no event files (pip install tensorboard)", file=sys.stderr)
        return None
    return SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1)
