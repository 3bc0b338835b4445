"""A P-frame model trained by lictrain's one training loop (issue 33): the video model seen as an image model.

The trainer hands a model a batch and scores its output with the rate-distortion loss. For video a batch is
N x T x 3 x H x W (lictrain.video.data.SequenceCrops, T = data.frames); `PFrameStage` turns it into one P-frame
step: the first frame coded by a frozen I-frame codec (any lictrain image checkpoint, `iframe`) is the reference,
the second frame is coded with the P-frame model (DCVC), and the output names the target (`target`, the second
frame), the reconstruction the stage scores and the likelihoods whose bits it counts.

DCVC's training stages (OpenDCVCs, which the SOAP paper's appendix A.4 follows), `stage`:
  1  motion: lambda * MSE(reference warped by the decoded flow, x) + motion rate (mv_y, mv_z); only the motion
     parts train (estimation, motion codec, refinement)
  2  reconstruction: lambda * MSE(x_hat, x); the motion parts and the frame latent's entropy model frozen
  3  contextual coding: lambda * MSE(x_hat, x) + frame rate (y, z); the motion parts frozen
  4  all: lambda * MSE(x_hat, x) + every rate; everything trains
  5  cascade: stage 4 over T - 1 successive P-frames (data.frames = T >= 3), each predicted from the previous one's
     reconstruction with the gradient flowing through the chain, the loss over all of them (the optional cascaded
     fine-tune after OpenDCVCs' four stages: what error propagation costs at test time is trained on)
Stages chain with train.init_from (the previous stage's weights). Without an I-frame codec (`iframe: null`) the
reference is the original first frame: for tests and for looking at the P-frame model alone, not for results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import LictrainError
from .dcvc import DCVC, PRESETS

MOTION_PARTS = ("opticFlow", "mvEncoder", "mvDecoder_part1", "mvDecoder_part2", "mvpriorEncoder", "mvpriorDecoder",
                "auto_regressive_mv", "entropy_parameters_mv", "bitEstimator_z_mv")
# the frame latent's entropy model: only its bits depend on it (training quantizes by noise, whatever the means)
FRAME_ENTROPY_PARTS = ("priorEncoder", "priorDecoder", "temporalPriorEncoder", "auto_regressive", "entropy_parameters",
                       "bitEstimator_z")


@dataclass(frozen=True)
class Stage:
    motion_trains: bool
    frame_trains: bool
    rate: tuple[str, ...]  # the likelihoods whose bits count
    reconstruction: str  # the output the distortion scores
    cascade: bool = False  # every later frame from the previous reconstruction, not only the second frame

    def trains(self, part: str) -> bool:
        """Whether a DCVC part trains in this stage: exactly the parts the stage's loss reaches (a part it does not
        reach would get no gradient, which DistributedDataParallel refuses)."""
        if part in MOTION_PARTS:
            return self.motion_trains
        if part in FRAME_ENTROPY_PARTS:
            return self.frame_trains and ("y" in self.rate or "z" in self.rate)
        return self.frame_trains


STAGES = {
    1: Stage(True, False, ("mv_y", "mv_z"), "warped"),
    2: Stage(False, True, (), "x_hat"),  # (the frame latent's entropy model frozen: no bits count)
    3: Stage(False, True, ("y", "z"), "x_hat"),
    4: Stage(True, True, ("mv_y", "mv_z", "y", "z"), "x_hat"),
    5: Stage(True, True, ("mv_y", "mv_z", "y", "z"), "x_hat", cascade=True),
}


def iframe_checkpoint_file(path: str | Path) -> Path:
    """The I-frame codec's checkpoint: a file, or a run folder's best (else last) checkpoint."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint_best.pt" if (p / "checkpoint_best.pt").exists() else p / "checkpoint.pt"
    if not p.exists():
        raise LictrainError(f"I-frame codec not found: {path} (a lictrain image checkpoint or run folder)")
    return p


def load_iframe_codec(path: str | Path) -> nn.Module:
    """A lictrain image checkpoint's model (its EMA weights), frozen, in eval mode, entropy tables built."""
    from ..checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(iframe_checkpoint_file(path)))
    model.eval()
    model.update(force=True)
    for q in model.parameters():
        q.requires_grad_(False)
    return model


class PFrameStage(nn.Module):
    """One of DCVC's training stages around a DCVC model (`pframe`) and a frozen I-frame codec (`iframe`)."""

    downsampling_factor = 64
    lictrain_transforms = ("pframe.contextualEncoder", "pframe.contextualDecoder_part1")

    def __init__(self, N: int, M: int, mv: int, flow: float = 1.0, stage: int = 4, iframe: str | None = None):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage}")
        self.stage_number, self.stage = stage, STAGES[stage]
        self.pframe = DCVC(N=N, M=M, mv=mv, flow=flow)
        self.iframe = load_iframe_codec(iframe) if iframe else None
        for name, module in self.pframe.named_children():
            for q in module.parameters():
                q.requires_grad_(self.stage.trains(name))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.iframe is not None:
            self.iframe.eval()  # always: it codes the reference as it would at test time
        return self

    @torch.no_grad()
    def reference(self, first: torch.Tensor) -> torch.Tensor:
        if self.iframe is None:
            return first
        return self.iframe(first)["x_hat"].clamp(0, 1)

    def forward(self, x: torch.Tensor) -> dict:
        if x.dim() != 5 or x.shape[1] < 2:
            raise LictrainError(f"a P-frame stage needs batches of frame sequences N x T x 3 x H x W with T >= 2 "
                                f"(data.frames), got shape {tuple(x.shape)}")
        if self.stage.cascade:
            return self._cascade(x)
        target = x[:, 1]
        out = self.pframe(self.reference(x[:, 0]), target)
        return {"x_hat": out[self.stage.reconstruction], "target": target,
                "likelihoods": {k: out["likelihoods"][k] for k in self.stage.rate}, "all_likelihoods":
                out["likelihoods"]}

    def _cascade(self, x: torch.Tensor) -> dict:
        """Frames 1..T-1 each from the previous reconstruction; reconstructions and targets stacked frame-major
        along the batch, every frame's likelihoods listed, so the R-D loss is the mean over P-frames of the
        distortion plus all their bits over all their pixels."""
        if x.shape[1] < 3:
            raise LictrainError(f"the cascaded stage needs at least 3 frames a sequence (data.frames >= 3), got "
                                f"{x.shape[1]}")
        ref, recs, likelihoods = self.reference(x[:, 0]), [], {}
        for t in range(1, x.shape[1]):
            out = self.pframe(ref, x[:, t])
            ref = out["x_hat"]
            recs.append(ref)
            likelihoods.update({f"{t}.{k}": v for k, v in out["likelihoods"].items()})
        return {"x_hat": torch.cat(recs), "target": x[:, 1:].transpose(0, 1).reshape(-1, *x.shape[2:]),
                "likelihoods": likelihoods, "all_likelihoods": likelihoods}

    def aux_loss(self) -> torch.Tensor:
        return self.pframe.aux_loss()

    def update(self, scale_table=None, force: bool = False, update_quantiles: bool = False) -> bool:
        return self.pframe.update(scale_table, force=force, update_quantiles=update_quantiles)


def dcvc_stage(N: int, M: int, mv: int, flow: float = 1.0, stage: int = 4, iframe: str | None = None
               ) -> PFrameStage:
    return PFrameStage(N, M, mv, flow, stage, iframe)


DCVC_PRESETS = PRESETS


class SequenceModel(nn.Module):
    """CompressAI's ScaleSpaceFlow (Agustsson et al. 2020; its intra codec for the first frame, scale-space flow and
    residual coding for the others) trained on whole N x T x 3 x H x W sequences by lictrain's loop. The output
    stacks every frame's reconstruction and target along the batch (frame-major) and lists every latent's
    likelihoods, so lictrain's R-D loss is CompressAI's examples/train_video.py loss: lambda times the mean over
    frames of 255^2 MSE plus all bits over all frames' pixels (tested)."""

    downsampling_factor = 128  # its hyperpriors sit at 1/128

    def __init__(self):
        super().__init__()
        from compressai.models.video import ScaleSpaceFlow

        self.ssf = ScaleSpaceFlow()

    def forward(self, x: torch.Tensor) -> dict:
        if x.dim() != 5 or x.shape[1] < 2:
            raise LictrainError(f"ScaleSpaceFlow trains on frame sequences N x T x 3 x H x W with T >= 2 "
                                f"(data.frames), got shape {tuple(x.shape)}")
        frames = [x[:, t] for t in range(x.shape[1])]
        out = self.ssf(frames)
        likelihoods = {f"{i}.{label}.{name}": v for i, per_frame in enumerate(out["likelihoods"])
                       for label, fields in per_frame.items() for name, v in fields.items()}
        return {"x_hat": torch.cat(out["x_hat"]), "target": torch.cat(frames), "likelihoods": likelihoods}

    def aux_loss(self) -> torch.Tensor:
        return sum(self.ssf.aux_loss())

    def update(self, scale_table=None, force: bool = False, update_quantiles: bool = False) -> bool:
        return self.ssf.update(scale_table, force=force, update_quantiles=update_quantiles)


def scale_space_flow() -> SequenceModel:
    return SequenceModel()
