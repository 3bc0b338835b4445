"""`lictrain eval` for a video checkpoint (issue 33): every test sequence coded to real bit-streams (I-frames by the
stage's image codec, low-delay P-frames by its DCVC; lictrain.video.coding), decoded, checked bit-exact against the
encoder's reconstruction, and scored per frame and per sequence: bpp from the bytes, PSNR-RGB, and PSNR-Y/U/V and
PSNR-YUV = (6 Y + U + V) / 8 (the weighting of the video papers and CompressAI's video evaluator).

PSNR-YUV is measured where the source is: for a raw 4:2:0 file against its own planes (the reconstruction converted
back with the same matrix and range, chroma averaged over 2x2), for RGB frames (PNG folders) on BT.709 full-range
4:4:4 of both. Values are on the 8-bit scale (peak 255, code values of higher bit depths scaled down).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LictrainError
from ..losses import psnr_from_mse
from .data import MATRICES, read_yuv420, resolve_sequences, yuv_format, yuv420_to_rgb


def rgb_to_yuv(rgb: torch.Tensor, matrix: str = "bt709", full_range: bool = False) -> torch.Tensor:
    """3 x H x W RGB in [0, 1] -> Y, Cb, Cr code values / 255 (limited range: Y 16-235, C 16-240; full: 0-255, C
    centred on 128); the inverse of data.yuv420_to_rgb before its chroma subsampling."""
    if matrix not in MATRICES:
        raise LictrainError(f"unknown YUV matrix '{matrix}' (one of {', '.join(MATRICES)})")
    kr, kb = MATRICES[matrix]
    r, g, b = rgb.double()
    y = kr * r + (1 - kr - kb) * g + kb * b
    cb, cr = (b - y) / (2 * (1 - kb)), (r - y) / (2 * (1 - kr))
    if full_range:
        return torch.stack([y * 255, cb * 255 + 128, cr * 255 + 128]) / 255
    return torch.stack([16 + 219 * y, 128 + 224 * cb, 128 + 224 * cr]) / 255


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return psnr_from_mse(float(torch.mean((a.double() - b.double()) ** 2)))


@dataclass
class EvalSequence:
    """One test sequence: RGB frames in [0, 1] and, for a raw 4:2:0 source, its planes (code values / 255)."""

    name: str
    frames: list[torch.Tensor]
    planes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    matrix: str = "bt709"
    full_range: bool = True

    def psnr_yuv(self, t: int, rec: torch.Tensor) -> tuple[float, float, float, float]:
        yuv = rgb_to_yuv(rec.clamp(0, 1), self.matrix, self.full_range)
        if self.planes is None:
            ref = rgb_to_yuv(self.frames[t], self.matrix, self.full_range)
            py, pu, pv = (_psnr(yuv[c], ref[c]) for c in range(3))
        else:
            y, u, v = self.planes[t]
            chroma = F.avg_pool2d(yuv[1:].unsqueeze(0), 2)[0]
            # the codes a writer would store: rounded to the 8-bit grid
            py = _psnr(torch.round(yuv[0] * 255) / 255, y)
            pu, pv = (_psnr(torch.round(chroma[c] * 255) / 255, p) for c, p in enumerate((u, v)))
        return py, pu, pv, (6 * py + pu + pv) / 8


def _yuv_sequence(path: Path, max_frames: int | None, matrix: str, full_range: bool) -> EvalSequence:
    fmt = yuv_format(path)
    raw = read_yuv420(path, fmt, max_frames)
    scale = 255.0 * 2 ** (fmt.bitdepth - 8)
    frames = [yuv420_to_rgb(y, u, v, fmt.bitdepth, matrix, full_range) for y, u, v in raw]
    planes = [tuple(torch.from_numpy(p.astype(np.float64)) / scale for p in yuv) for yuv in raw]
    return EvalSequence(path.stem, frames, planes, matrix, full_range)


def load_sequences(data: str, max_frames: int | None = None, max_sequences: int | None = None,
                   matrix: str = "bt709", full_range: bool = False) -> list[EvalSequence]:
    """A raw .yuv file, a folder of .yuv files, or frame folders (a Vimeo-90k root with [test]/[train], a folder of
    frame folders, one frame folder): each one test sequence."""
    from ..data import load_rgb, to_tensor

    p = Path(data)
    yuvs = [p] if p.suffix == ".yuv" else sorted(p.glob("*.yuv")) if p.is_dir() else []
    if p.suffix == ".yuv" and not p.is_file():
        raise LictrainError(f"YUV file not found: {p}")
    if yuvs:
        seqs = [_yuv_sequence(f, max_frames, matrix, full_range) for f in yuvs[:max_sequences]]
    else:
        seqs = []
        for files in resolve_sequences(data)[:max_sequences]:
            files = files[:max_frames] if max_frames else files
            seqs.append(EvalSequence(f"{files[0].parent.parent.name}/{files[0].parent.name}",
                                     [to_tensor(load_rgb(f)) for f in files], None, "bt709", True))
    if not seqs:
        raise LictrainError(f"no test sequence in {data} (a .yuv file, a folder of them, or frame folders)")
    return seqs


def _codecs(checkpoint: str, use_ema: bool):
    """The stage checkpoint's P-frame model (DCVC, entropy tables built on the CPU) and its I-frame codec."""
    from ..checkpoint import Checkpoint, load_checkpoint
    from ..coding import coding_numerics
    from ..evaluation import Codec
    from ..models.video_stage import PFrameStage, iframe_checkpoint_file

    ckpt = Checkpoint.load(checkpoint)
    model = ckpt.model(use_ema)
    if not isinstance(model, PFrameStage):
        raise LictrainError(f"{checkpoint}: real video coding needs a DCVC checkpoint (model dcvc); this one is "
                            f"{ckpt.config.model.name}")
    iframe_path = ckpt.config.model.kwargs.get("iframe")
    if not iframe_path:
        raise LictrainError(f"{checkpoint}: trained without an I-frame codec (model.kwargs.iframe), so its "
                            f"sequences cannot be coded")
    iframe = Codec.from_checkpoint(load_checkpoint(iframe_checkpoint_file(iframe_path)), use_ema)
    pframe = model.pframe.cpu().eval()
    with coding_numerics(torch.device("cpu")):
        pframe.update(force=True)
    return iframe, pframe, ckpt.config


def _code_all(iframe, pframe, seqs: list[EvalSequence], intra_period: int, label: str, progress: bool):
    from tqdm import tqdm

    from .coding import decode_sequence, encode_sequence

    per_seq, rows = [], []
    for seq in tqdm(seqs, desc=f"eval video {label}", disable=None if progress else True):
        coded = encode_sequence(iframe, pframe, seq.frames, intra_period)
        decoded = decode_sequence(iframe, pframe, coded)
        if any(not torch.equal(a, b) for a, b in zip(decoded, coded.recon)):
            raise LictrainError(f"{seq.name}: the decoder's frames differ from the encoder's (not bit-exact)")
        pixels = coded.height * coded.width
        frames = []
        for t, (rec, bits, est, kind) in enumerate(zip(decoded, coded.bits(), coded.estimated_bits, coded.kinds)):
            py, pu, pv, pyuv = seq.psnr_yuv(t, rec)
            frames.append({"checkpoint": label, "sequence": seq.name, "frame": t, "kind": kind, "bpp": bits / pixels,
                           "bpp_estimated": est / pixels, "psnr_rgb": _psnr(rec.clamp(0, 1), seq.frames[t]),
                           "psnr_y": py, "psnr_u": pu, "psnr_v": pv, "psnr_yuv": pyuv})
        rows += frames
        per_seq.append({"checkpoint": label, "sequence": seq.name, "frames": len(frames), "width": coded.width,
                        "height": coded.height, **{k: float(np.mean([f[k] for f in frames])) for k in METRICS}})
    return per_seq, rows


METRICS = ("bpp", "bpp_estimated", "psnr_rgb", "psnr_y", "psnr_u", "psnr_v", "psnr_yuv")
# results.json keys: CompressAI's names for its metrics, the image evaluation's for the estimate
RESULT_KEYS = {k: k if k == "bpp_estimated" else k.replace("_", "-") for k in METRICS}


def evaluate_video(checkpoints: list[str], data: str, out_dir: str | Path, intra_period: int = 32,
                   max_frames: int | None = None, max_sequences: int | None = None, use_ema: bool = True,
                   matrix: str = "bt709", full_range: bool = False, progress: bool = True) -> dict:
    """Code, decode and score every test sequence with every checkpoint (one R-D point each); write per_frame.csv,
    per_sequence.csv and results.json (CompressAI's format: one list entry per checkpoint, by lambda)."""
    from ..io import strict_json, write_atomic

    if intra_period < 1:
        raise LictrainError(f"the intra period must be at least 1, got {intra_period}")
    seqs = load_sequences(data, max_frames, max_sequences, matrix, full_range)
    points, all_seq, all_rows = [], [], []
    for label in checkpoints:
        iframe, pframe, cfg = _codecs(label, use_ema)
        per_seq, rows = _code_all(iframe, pframe, seqs, intra_period, str(label), progress)
        all_seq += per_seq
        all_rows += rows
        points.append((cfg, str(label), {k: float(np.mean([s[k] for s in per_seq])) for k in METRICS}))
    points.sort(key=lambda p: p[0].loss.lmbda)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for file, table_rows in (("per_frame.csv", all_rows), ("per_sequence.csv", all_seq)):
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=list(table_rows[0]))
        writer.writeheader()
        writer.writerows(table_rows)
        write_atomic(out_dir / file, table.getvalue())
    cfg0 = points[0][0]
    source = "4:2:0 planes" if seqs[0].planes is not None else "BT.709 full-range 4:4:4 of the RGB frames"
    summary = {
        "name": f"{cfg0.model.name}-{cfg0.model.preset}",
        "description": f"lictrain video evaluation on {data} ({len(seqs)} sequences), real bit-streams decoded "
                       f"bit-exactly, intra period {intra_period}, low-delay P-frames; PSNR-YUV on the {source}; "
                       f"means over frames, then over sequences; {'EMA' if use_ema else 'raw'} weights",
        "results": {"checkpoint": [p[1] for p in points], "lmbda": [p[0].loss.lmbda for p in points],
                    **{RESULT_KEYS[k]: [p[2][k] for p in points] for k in METRICS}},
        "intra_period": intra_period,
        "sequences": all_seq,
    }
    write_atomic(out_dir / "results.json", strict_json(summary, indent=2))
    return summary


def is_video_checkpoint(path: str) -> bool:
    from ..checkpoint import read_config
    from ..models import video_frames

    return video_frames(read_config(path).model.name) > 0


def format_video_table(summary: dict) -> str:
    """Per sequence and checkpoint, then each checkpoint's means (markdown). bpp is the bytes coded; est. is the
    bits the likelihoods predict (a large gap means the coder and the trained rate disagree)."""
    lines = ["| checkpoint | sequence | frames | bpp | bpp (est.) | PSNR-RGB | PSNR-Y | PSNR-U | PSNR-V | PSNR-YUV |",
             "|---|---|---:|" + "---:|" * 7]
    for s in summary["sequences"]:
        lines.append(f"| {s['checkpoint']} | {s['sequence']} | {s['frames']} | {s['bpp']:.4f} | "
                     f"{s['bpp_estimated']:.4f} | {s['psnr_rgb']:.3f} | {s['psnr_y']:.3f} | {s['psnr_u']:.3f} | "
                     f"{s['psnr_v']:.3f} | {s['psnr_yuv']:.3f} |")
    r = summary["results"]
    for i, c in enumerate(r["checkpoint"]):
        lines.append(f"| {c} | mean | | {r['bpp'][i]:.4f} | {r['bpp_estimated'][i]:.4f} | {r['psnr-rgb'][i]:.3f} | "
                     f"{r['psnr-y'][i]:.3f} | {r['psnr-u'][i]:.3f} | {r['psnr-v'][i]:.3f} | {r['psnr-yuv'][i]:.3f} |")
    return "\n".join(lines)
