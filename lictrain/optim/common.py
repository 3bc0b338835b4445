"""Small pieces shared by lictrain's optimizers."""

from __future__ import annotations

import contextlib

import torch


def closure_loss(closure):
    """torch's optimizer convention: re-evaluate the model with gradients on, if a closure is given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


@contextlib.contextmanager
def full_fp32_matmul():
    """Matrix products in full fp32 inside this block (TF32 off on CUDA), restoring the caller's setting afterwards:
    eigenbases and Kronecker factors computed with 10-bit TF32 products drift from the exact ones."""
    if not torch.backends.cuda.matmul.allow_tf32:
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True
