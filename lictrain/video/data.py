"""Video data (issue 33): training sequences as Vimeo-90k lays them out or as plain folders of frames, and raw
YUV420 files for evaluation.

Training samples follow the image loader's rule (lictrain/data.py): the k-th sample of a run is a pure function of
(seed, k): which sequence (drawn uniformly), which window of `frames` consecutive frames, where the crop sits and
whether it is flipped. One crop and one flip are shared by every frame of a sample, so motion between frames is the
clip's own.

Sequences:
- a Vimeo-90k root (`sequences/XXXXX/YYYY/im1.png ... im7.png` beside `sep_trainlist.txt` / `sep_testlist.txt`):
  `ROOT` is every listed sequence, `ROOT[train]` / `ROOT[test]` one list;
- any other folder: every folder below it (itself included) that directly holds at least two frames is one sequence,
  its frames in natural order (frame2 before frame10).

Raw YUV (the test sets' format): `read_yuv420` reads 4:2:0 planar files, 8 or 10/16-bit little-endian, whose size
comes from the file name (`name_1920x1080_50fps_10bit_420.yuv`, `..._320x192_12fps.yuv`): a name without a bit-depth
token is 8-bit (CompressAI's reader raises KeyError('bitdepth2') on such names, its issue #321). Conversion to RGB
is BT.709 in limited (studio) range by default, the HEVC/UVG/MCL-JCV test sets' convention, and both are arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import IMAGE_EXTENSIONS, load_rgb, to_tensor
from ..errors import LictrainError

_LIST = re.compile(r"^(?P<path>.*?)\s*\[(?P<part>train|test)\]$")


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _frames_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=_natural_key)


def resolve_sequences(spec: str) -> list[list[Path]]:
    """The sequences a spec names (see the module docstring): each a list of frame files in order."""
    m = _LIST.match(spec.strip())
    path, part = (m["path"], m["part"]) if m else (spec.strip(), None)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise LictrainError(f"video folder not found: {path}")
    lists = {name: root / f"sep_{name}list.txt" for name in ("train", "test")}
    if (root / "sequences").is_dir() and any(f.exists() for f in lists.values()):
        names: list[str] = []
        for name in ([part] if part else ["train", "test"]):
            if not lists[name].exists():
                raise LictrainError(f"{lists[name]} is missing: {spec} names a Vimeo-90k list it does not have")
            names += [ln.strip() for ln in lists[name].read_text().splitlines() if ln.strip()]
        seqs = []
        for name in names:
            folder = root / "sequences" / name
            if not folder.is_dir():
                raise LictrainError(f"{folder} is listed in {root}'s sep_*list.txt but does not exist")
            seqs.append(_frames_in(folder))
    else:
        if part:
            raise LictrainError(f"'[{part}]' selects a Vimeo-90k list, and {root} has no sep_{part}list.txt")
        folders = [root] + sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: str(p))
        seqs = [frames for frames in (_frames_in(f) for f in folders) if len(frames) >= 2]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise LictrainError(f"no sequences (folders of at least two frames) in {spec}")
    return seqs


class SequenceCrops(Dataset):
    """Training samples of `frames` consecutive frames: item k is a (frames, 3, crop, crop) tensor in [0, 1]."""

    def __init__(self, sequences: list[list[Path]], frames: int, crop: int, seed: int):
        if frames < 1:
            raise LictrainError(f"a video sample needs at least one frame, got {frames}")
        usable = [s for s in sequences if len(s) >= frames]
        if not usable:
            raise LictrainError(f"no sequence has {frames} frames (the longest has {max(map(len, sequences))})")
        self.sequences, self.frames, self.crop, self.seed = usable, frames, crop, seed

    def __len__(self) -> int:  # nominal: the sampler is infinite
        return len(self.sequences)

    def window(self, k: int) -> tuple[int, int]:
        """(sequence index, first frame) of sample k."""
        rng = np.random.default_rng([self.seed, 2, k])
        i = int(rng.integers(len(self.sequences)))
        return i, int(rng.integers(len(self.sequences[i]) - self.frames + 1))

    def __getitem__(self, k: int) -> torch.Tensor:
        i, start = self.window(k)
        frames = [load_rgb(p) for p in self.sequences[i][start : start + self.frames]]
        h, w = frames[0].shape[:2]
        if any(f.shape != frames[0].shape for f in frames):
            raise LictrainError(f"frames of {self.sequences[i][0].parent} differ in size")
        rng = np.random.default_rng([self.seed, 0, k])
        size = self.crop
        if h < size or w < size:  # reflection padding on the bottom/right, as for images
            pad = ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0))
            frames = [np.pad(f, pad, mode="reflect") for f in frames]
            h, w = frames[0].shape[:2]
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        flip = rng.random() < 0.5
        out = []
        for f in frames:
            f = f[top : top + size, left : left + size]
            out.append(to_tensor(f[:, ::-1] if flip else f))
        return torch.stack(out)


# ---- raw YUV 4:2:0 ------------------------------------------------------------------------------------------------
_SIZE = re.compile(r"(?<![0-9])(\d+)x(\d+)(?![0-9])")
_BITS = re.compile(r"(?<![0-9])(8|10|12|16)bit", re.IGNORECASE)
_FPS = re.compile(r"(?<![0-9])(\d+(?:\.\d+)?)fps", re.IGNORECASE)
# BT.709 and BT.601 luma coefficients (Kr, Kb)
MATRICES = {"bt709": (0.2126, 0.0722), "bt601": (0.299, 0.114)}


@dataclass(frozen=True)
class YuvFormat:
    width: int
    height: int
    bitdepth: int = 8
    fps: float | None = None

    @property
    def frame_bytes(self) -> int:
        per = 1 if self.bitdepth == 8 else 2
        return (self.width * self.height + 2 * (self.width // 2) * (self.height // 2)) * per


def yuv_format(path: str | Path, width: int | None = None, height: int | None = None,
               bitdepth: int | None = None) -> YuvFormat:
    """The format of a raw YUV420 file from its name (WxH, optional NNfps and NNbit tokens), arguments first."""
    name = Path(path).name
    if width is None or height is None:
        m = _SIZE.search(name)
        if not m:
            raise LictrainError(f"{name}: no WIDTHxHEIGHT in the file name; pass the frame size")
        width, height = int(m[1]), int(m[2])
    if bitdepth is None:
        m = _BITS.search(name)
        bitdepth = int(m[1]) if m else 8
    fps = _FPS.search(name)
    if width % 2 or height % 2:
        raise LictrainError(f"{name}: 4:2:0 needs an even frame size, got {width}x{height}")
    return YuvFormat(width, height, bitdepth, float(fps[1]) if fps else None)


def read_yuv420(path: str | Path, fmt: YuvFormat | None = None, max_frames: int | None = None
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Frames of a raw planar 4:2:0 file as (Y, U, V) arrays (uint8, or uint16 above 8 bits)."""
    path = Path(path)
    if not path.is_file():
        raise LictrainError(f"YUV file not found: {path}")
    fmt = fmt or yuv_format(path)
    size = path.stat().st_size
    if size % fmt.frame_bytes:
        raise LictrainError(f"{path.name}: {size} bytes is not a whole number of {fmt.width}x{fmt.height} "
                            f"{fmt.bitdepth}-bit 4:2:0 frames ({fmt.frame_bytes} bytes each)")
    count = size // fmt.frame_bytes
    if max_frames is not None:
        count = min(count, max_frames)
    dtype = np.dtype(np.uint8) if fmt.bitdepth == 8 else np.dtype("<u2")
    data = np.fromfile(path, dtype=dtype, count=count * fmt.frame_bytes // dtype.itemsize)
    w, h = fmt.width, fmt.height
    luma, chroma = w * h, (w // 2) * (h // 2)
    frames = []
    for i in range(count):
        base = i * (luma + 2 * chroma)
        y = data[base : base + luma].reshape(h, w)
        u = data[base + luma : base + luma + chroma].reshape(h // 2, w // 2)
        v = data[base + luma + chroma : base + luma + 2 * chroma].reshape(h // 2, w // 2)
        frames.append((y, u, v))
    return frames


def yuv420_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray, bitdepth: int = 8, matrix: str = "bt709",
                  full_range: bool = False) -> torch.Tensor:
    """One 4:2:0 frame as a 3 x H x W float RGB tensor in [0, 1] (clipped): chroma upsampled by repetition,
    R = Y + 2(1 - Kr) Cr, B = Y + 2(1 - Kb) Cb, G = (Y - Kr R - Kb B) / (1 - Kr - Kb), with Y in [0, 1] and
    Cb, Cr in [-1/2, 1/2] after removing the range's offsets (limited: Y 16-235, C 16-240, scaled by 2^(bits-8))."""
    if matrix not in MATRICES:
        raise LictrainError(f"unknown YUV matrix '{matrix}' (one of {', '.join(MATRICES)})")
    kr, kb = MATRICES[matrix]
    scale = float(2 ** (bitdepth - 8))
    yf = torch.from_numpy(y.astype(np.float64))
    cb = torch.from_numpy(u.astype(np.float64)).repeat_interleave(2, 0).repeat_interleave(2, 1)
    cr = torch.from_numpy(v.astype(np.float64)).repeat_interleave(2, 0).repeat_interleave(2, 1)
    if full_range:
        top = 2**bitdepth - 1
        yf, cb, cr = yf / top, cb / top - 0.5 * (2**bitdepth) / top, cr / top - 0.5 * (2**bitdepth) / top
    else:
        yf = (yf - 16 * scale) / (219 * scale)
        cb, cr = (cb - 128 * scale) / (224 * scale), (cr - 128 * scale) / (224 * scale)
    r = yf + 2 * (1 - kr) * cr
    b = yf + 2 * (1 - kb) * cb
    g = (yf - kr * r - kb * b) / (1 - kr - kb)
    return torch.stack([r, g, b]).clamp_(0, 1).float()


# ---- what the trainer reads: training sequences and validation samples ---------------------------------------------
@dataclass
class SequenceSet:
    """The training sequences of a run (the image trainer's ImageList for video): `files` every frame file (to check
    that no validation frame is also trained on), nothing skipped (a bad frame fails its sample loudly)."""

    sequences: list[list[Path]]

    @classmethod
    def scan(cls, spec: str) -> "SequenceSet":
        return cls(resolve_sequences(spec))

    @property
    def files(self) -> list[Path]:
        return [p for s in self.sequences for p in s]

    @property
    def skipped(self) -> list:
        return []

    def __len__(self) -> int:
        return len(self.sequences)


class EvalSequences(Dataset):
    """Validation samples: the first `frames` frames of each sequence (in spec order), centre-cropped to `crop`."""

    def __init__(self, spec: str, frames: int, crop: int | None = None, max_sequences: int | None = None):
        self.images = SequenceSet.scan(spec)  # (the attribute name the trainer reads for files and skipped ones)
        usable = [s for s in self.images.sequences if len(s) >= frames]
        if not usable:
            raise LictrainError(f"no validation sequence in {spec} has {frames} frames")
        self.sequences = usable[:max_sequences] if max_sequences else usable
        self.frames, self.crop = frames, crop

    @property
    def skipped(self) -> list:
        return []

    @property
    def files(self) -> list[Path]:
        """The frames validated (to check that none is also trained on)."""
        return [p for s in self.sequences for p in s[: self.frames]]

    def __len__(self) -> int:
        return len(self.sequences)

    def name(self, i: int) -> str:
        return str(self.sequences[i][0].parent.name)

    def __getitem__(self, i: int) -> torch.Tensor:
        out = []
        for p in self.sequences[i][: self.frames]:
            img = load_rgb(p)
            if self.crop is not None:
                h, w = img.shape[:2]
                c = min(self.crop, h, w)
                top, left = (h - c) // 2, (w - c) // 2
                img = img[top : top + c, left : left + c]
            out.append(to_tensor(img))
        return torch.stack(out)
