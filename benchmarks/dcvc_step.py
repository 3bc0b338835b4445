"""DCVC's training step with motion estimation and flow refinement at the published widths (flow 1.0) against the
tiny preset's quarter widths (flow 0.25), side by side: the tiny preset's N/M/mv, batch 4 of 64x64 frame pairs, Adam,
the median of 6 steps after 2 warm-up steps, stage 1 (motion parts only) and stage 4 (everything); no I-frame codec,
no data loading (the model's own cost).

    .venv/bin/python benchmarks/dcvc_step.py
"""

import time

import torch

from lictrain.losses import RateDistortionLoss
from lictrain.models.video_stage import PFrameStage


def step_time(flow: float, stage: int, steps: int = 6, batch: int = 4, crop: int = 64) -> float:
    torch.manual_seed(0)
    model = PFrameStage(16, 24, 32, flow=flow, stage=stage).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-4)
    x = torch.rand(batch, 2, 3, crop, crop)
    criterion = RateDistortionLoss(0.00394)
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        loss = criterion(model(x), x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    times = sorted(times[2:])
    return times[len(times) // 2]


if __name__ == "__main__":
    for stage in (1, 4):
        full, quarter = step_time(1.0, stage), step_time(0.25, stage)
        print(f"stage {stage}: flow 1.0 {full * 1000:.0f} ms/step, flow 0.25 {quarter * 1000:.0f} ms/step, "
              f"ratio {quarter / full:.2f}")
