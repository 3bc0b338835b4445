"""Training sequences cut from one's own clips, in the Vimeo-90k layout (`lictrain video-prepare`, issue 33).

Every clip is decoded to 4:2:0 planes and converted to RGB by lictrain's own conversion (video/data.py: BT.709 and
limited range unless told otherwise), so the colours do not depend on a decoder's defaults: a container's frames
through PyAV (an optional extra, `pip install av`: its wheel carries FFmpeg; other chroma layouts are resampled to
4:2:0 by FFmpeg's swscale first), raw `.yuv` files (4:2:0, size from the name) directly. Each frame is resized to the
output height (bicubic, aspect kept) and centre-cropped to the output width. Windows of `frames` consecutive frames
start every `every` frames. Clips named as test clips go to `sep_testlist.txt` and nowhere else, so whole clips are
held out; `provenance.json` records each sequence's clip and frame range.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ..errors import LictrainError
from .data import read_yuv420, yuv420_to_rgb, yuv_format


def _planes_from_container(path: Path) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    try:
        import av
    except ImportError:
        raise LictrainError(f"{path.name}: decoding video files needs PyAV (pip install av, or lictrain[video]); "
                            f"raw .yuv files need nothing") from None
    try:
        container = av.open(str(path))
    except Exception as e:  # PyAV raises its own error types for unreadable files
        raise LictrainError(f"cannot open {path}: {str(e).splitlines()[0][:160]}") from None
    with container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if frame.format.name != "yuv420p":
                frame = frame.reformat(format="yuv420p")
            h, w = frame.height, frame.width
            planes = frame.to_ndarray()  # yuv420p: (H * 3/2) x W, Y then U then V
            y = planes[:h]
            chroma = planes[h:].reshape(-1)
            u = chroma[: (h // 2) * (w // 2)].reshape(h // 2, w // 2)
            v = chroma[(h // 2) * (w // 2) :].reshape(h // 2, w // 2)
            yield y, u, v, 8


def decode_clip(path: str | Path, matrix: str = "bt709", full_range: bool = False) -> Iterator[np.ndarray]:
    """The clip's frames as H x W x 3 uint8 RGB arrays."""
    path = Path(path)
    if not path.is_file():
        raise LictrainError(f"clip not found: {path}")
    if path.suffix.lower() == ".yuv":
        fmt = yuv_format(path)
        source = ((y, u, v, fmt.bitdepth) for y, u, v in read_yuv420(path, fmt))
    else:
        source = _planes_from_container(path)
    for y, u, v, bits in source:
        rgb = yuv420_to_rgb(y, u, v, bitdepth=bits, matrix=matrix, full_range=full_range)
        yield (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _fit(img: np.ndarray, width: int | None, height: int | None) -> np.ndarray:
    if height is None:
        return img
    h, w = img.shape[:2]
    new_w = max(1, round(w * height / h))
    out = np.asarray(Image.fromarray(img).resize((new_w, height), Image.BICUBIC))
    if width is not None:
        if new_w < width:
            raise LictrainError(f"a {w}x{h} clip resized to height {height} is {new_w} wide, less than {width}")
        left = (new_w - width) // 2
        out = out[:, left : left + width]
    return out


def prepare(clips: list[str | Path], out: str | Path, frames: int = 7, every: int = 30, size: tuple | None = None,
            test: tuple[str, ...] = (), max_per_clip: int | None = None, matrix: str = "bt709",
            full_range: bool = False) -> dict:
    """Cut sequences from the clips into `out` (sequences/CCCCC/SSSS/im1.png ...); returns counts per list."""
    if frames < 2 or every < 1:
        raise LictrainError(f"need frames >= 2 and every >= 1, got frames={frames}, every={every}")
    names = [Path(c).name for c in clips]
    unknown = sorted(set(test) - set(names))
    if unknown:
        raise LictrainError(f"test clip(s) {', '.join(unknown)} are not among the clips given")
    out = Path(out)
    width, height = size if size else (None, None)
    for clip in clips:  # every clip's size checked from its first frame before any is cut: fail at once, write nothing
        first = next(iter(decode_clip(clip, matrix, full_range)), None)
        if first is None:
            raise LictrainError(f"{clip} has no frames")
        try:
            _fit(first, width, height)
        except LictrainError as e:
            raise LictrainError(f"{Path(clip).name}: {e} (leave it out, or choose another --size)") from None
    lists: dict[str, list[str]] = {"train": [], "test": []}
    provenance = []
    for ci, clip in enumerate(clips, start=1):
        which = "test" if Path(clip).name in test else "train"
        buffer: dict[int, np.ndarray] = {}  # frame number -> fitted frame, from the current window's start on
        start, made = 0, 0
        for t, img in enumerate(decode_clip(clip, matrix, full_range)):
            if t < start:
                continue
            buffer[t] = _fit(img, width, height)
            while t == start + frames - 1:  # (windows may overlap: every < frames)
                made += 1
                seq = f"{ci:05d}/{made:04d}"
                folder = out / "sequences" / seq
                folder.mkdir(parents=True, exist_ok=True)
                for k in range(frames):
                    Image.fromarray(buffer[start + k]).save(folder / f"im{k + 1}.png")
                lists[which].append(seq)
                provenance.append({"seq": seq, "source": Path(clip).name, "frames": f"{start}..{start + frames - 1}",
                                   "list": which})
                start += every
                buffer = {k: v for k, v in buffer.items() if k >= start}
                if max_per_clip is not None and made >= max_per_clip:
                    break
            if max_per_clip is not None and made >= max_per_clip:
                break
        if made == 0:
            raise LictrainError(f"{clip} has fewer than {frames} frames")
    out.mkdir(parents=True, exist_ok=True)
    for which, seqs in lists.items():
        (out / f"sep_{which}list.txt").write_text("".join(s + "\n" for s in seqs))
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1))
    return {k: len(v) for k, v in lists.items()}
