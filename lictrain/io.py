"""Atomic file writes: a crash, a Ctrl-C or a full disk never leaves a checkpoint or a user-facing file half
written (temporary file beside the target, then rename, which POSIX makes atomic)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def _temporary(path: Path) -> Path:
    """A temporary name beside `path` that no other process uses: several processes may write the same file (the
    parallel compare's summaries), and a shared temporary name would let one rename the other's half-written file."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def save_atomic(obj: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a user-facing file (text or bytes) so that a crash or a full disk never leaves it half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    os.replace(tmp, path)
