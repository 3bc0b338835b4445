"""A run folder, in one place: where a run keeps what, its metrics log, and the one reader of that log.

    RUN_DIR/config.yaml          the resolved config (written at the start)
    RUN_DIR/checkpoint.pt        the last checkpoint (lictrain-checkpoint-v1: checkpoint.py)
    RUN_DIR/checkpoint_best.pt   the weights of the best validation so far
    RUN_DIR/metrics.jsonl        one JSON object per line, `kind` train | val | probe (strict JSON: null for NaN)
    RUN_DIR/summary.json         the run's end (steps, time, last validation)
    RUN_DIR/loss_curve.png       `lictrain train`'s plot of metrics.jsonl
    RUN_DIR/tensorboard/         with train.tensorboard
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .io import strict_json, write_atomic

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
BEST = "checkpoint_best.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CURVES = "loss_curve.png"


def checkpoint_file(path: str | Path, best: bool = False) -> Path:
    """The checkpoint a run folder holds (its last, or its best validation's); a file is itself."""
    path = Path(path)
    return path / (BEST if best else CHECKPOINT) if path.is_dir() else path


def has_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CHECKPOINT).is_file()


def metrics_file(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    return path if path.suffix == ".jsonl" else path / METRICS


def parse_record(line: str) -> dict:
    """One line of metrics.jsonl: null (how strict JSON writes a non-finite number: a NaN loss) read back as NaN,
    so that readers compute with it as they did with the NaN literal older files hold."""
    return {k: math.nan if v is None else v for k, v in json.loads(line).items()}


def read_records(run: str | Path, kind: str | None = None, skip_broken: bool = False) -> list[dict]:
    """The records of a run's metrics.jsonl (a run folder or the file), of one kind or all; `skip_broken` leaves out
    lines a crash cut short instead of raising."""
    out = []
    for line in metrics_file(run).read_text().splitlines():
        if not line.strip():
            continue
        try:
            r = parse_record(line)
        except ValueError:
            if skip_broken:
                continue
            raise
        if kind is None or r.get("kind") == kind:
            out.append(r)
    return out


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and, optionally, TensorBoard. `enabled=False` (ranks other than
    0 under torchrun) writes nothing."""

    def __init__(self, path: Path, tensorboard_dir: Path | None, enabled: bool = True, purge_step: int | None = None):
        self.path = path
        self.file = open(path, "a", buffering=1) if enabled else None
        self.tb = None
        if tensorboard_dir is not None and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir), purge_step=purge_step)

    @property
    def closed(self) -> bool:
        return self.file is None or self.file.closed

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(strict_json(record, indent=None) + "\n")  # a NaN loss as null: strict JSON Lines
        if self.tb is not None:
            kind = record["kind"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "kind"):
                    self.tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()

    @staticmethod
    def truncate_after(path: Path, step: int) -> None:
        """Drop lines logged after `step` (written after the checkpoint a run resumes from)."""
        if not path.exists():
            return
        keep = []
        for ln in path.read_text().splitlines():
            try:
                if json.loads(ln)["step"] <= step:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                continue
        write_atomic(path, "".join(ln + "\n" for ln in keep))
