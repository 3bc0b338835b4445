"""Atomic file writes: a crash, a Ctrl-C or a full disk never leaves a checkpoint or a user-facing file half
written (temporary file beside the target, then rename, which POSIX makes atomic)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch


def _temporary(path: Path) -> Path:
    """A temporary name beside `path` that no other process uses: several processes may write the same file (the
    parallel compare's summaries), and a shared temporary name would let one rename the other's half-written file."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files beside `path` that a process killed mid-write left (its pid no longer runs);
    returns them."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f"{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 1 : -len(".tmp")]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        except PermissionError:  # another user's live process
            pass
    return removed


class WritingThrough:
    """An OSError raised while writing `path` through its temporary file names `path` (what the user asked for),
    and the temporary file is not left behind."""

    def __init__(self, path: Path, tmp: Path):
        self.path, self.tmp = path, tmp

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is not None:
            self.tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename in (str(self.tmp), self.tmp):
            raise OSError(error.errno, error.strerror, str(self.path)) from None
        return False


def save_atomic(obj: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    with WritingThrough(path, tmp):
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
    with WritingThrough(path, tmp):
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
        os.replace(tmp, path)


def finite_or_none(obj):
    """`obj` with every non-finite float (NaN, ±inf) replaced by None, lists and dicts walked."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def strict_json(obj, indent: int | None = 2) -> str:
    """JSON that strict readers accept: Python's json writes NaN and Infinity, which are not JSON; a measurement
    that does not exist (MS-SSIM of an image too small for it, a PSNR of a lossless decode) is written as null."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)


def number(value, spec: str) -> str:
    """A measurement for a table; 'n/a' where it does not exist (null in strict JSON, NaN in memory)."""
    return "n/a" if value is None or value != value else format(value, spec)

