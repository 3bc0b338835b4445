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


def eigh_descending(m: torch.Tensor) -> torch.Tensor | None:
    """Eigenvectors of a symmetric PSD matrix, largest eigenvalue first, or None if they cannot be had.

    The matrix is first scaled to a maximum of 1 (eigenvectors do not depend on scale): LAPACK's fp32 eigh returns
    NaN without raising on factors of tiny magnitude (seen at ~1e-9 with clipped gradients). If eigh still fails
    or gives non-finite vectors, it is retried in fp64 with a small diagonal jitter.
    """
    if not torch.isfinite(m).all():
        return None
    scale = m.abs().max()
    if scale == 0:
        return torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    m = m / scale
    for attempt in range(2):
        try:
            if attempt == 0:
                q = torch.linalg.eigh(m)[1]
            else:
                eye = torch.eye(m.shape[0], dtype=torch.float64, device=m.device)
                q = torch.linalg.eigh(m.double() + 1e-10 * eye)[1].to(m.dtype)
        except RuntimeError:  # includes torch.linalg.LinAlgError
            continue
        if torch.isfinite(q).all():
            return q.flip(1)
    return None
