"""Small pieces shared by lictrain's optimizers."""

from __future__ import annotations

import math

import torch


def closure_loss(closure):
    """torch's optimizer convention: re-evaluate the model with gradients on, if a closure is given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


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


# ---- symmetric matrices stored as their upper triangles ---------------------------------------------------------
# A Kronecker factor is symmetric: its lower triangle is derived state. SOAP keeps only the upper one (row by row,
# torch.triu_indices order, d (d + 1) / 2 numbers), which is half of a factor's bytes; the full matrix is rebuilt
# where a product needs it (the basis refresh) and the Gram matrix is packed as it is accumulated.
_UPPER: dict = {}


def triu_positions(d: int, device: torch.device) -> torch.Tensor:
    """Where the packed numbers lie in a flattened d x d matrix: pack_symmetric(a) == a.flatten(-2)[..., these].

    int32 and cached per size and device: 4 bytes per packed number, once per distinct d (not per tensor); this
    memory is reported by index_cache_bytes() beside the optimizer state it serves."""
    key = (d, device)
    if key not in _UPPER:
        rows, cols = torch.triu_indices(d, d, device=device)
        _UPPER[key] = (rows * d + cols).to(torch.int32)
    return _UPPER[key]


def index_cache_bytes() -> int:
    return sum(t.numel() * t.element_size() for t in _UPPER.values())


def clear_index_cache() -> None:
    _UPPER.clear()


def packed_size(d: int) -> int:
    return d * (d + 1) // 2


def side_of_packed(n: int) -> int:
    """d from a packed length d (d + 1) / 2."""
    d = (math.isqrt(8 * n + 1) - 1) // 2
    if packed_size(d) != n:
        raise ValueError(f"{n} numbers are not the upper triangle of a square matrix")
    return d


def pack_symmetric(full: torch.Tensor) -> torch.Tensor:
    """(..., d, d) -> (..., d (d + 1) / 2): the upper triangle, row by row (the lower one is not read)."""
    d = full.shape[-1]
    return full.reshape(*full.shape[:-2], d * d).index_select(-1, triu_positions(d, full.device))


def unpack_symmetric(packed: torch.Tensor) -> torch.Tensor:
    """(..., d (d + 1) / 2) -> (..., d, d): the symmetric matrix whose upper triangle this is (exactly: each
    number is copied, the zero lower triangle plus the transposed strict upper one adds nothing to it)."""
    d = side_of_packed(packed.shape[-1])
    lead = packed.shape[:-1]
    full = packed.new_zeros(*lead, d * d)
    full.index_copy_(-1, triu_positions(d, packed.device).long(), packed)
    full = full.view(*lead, d, d)
    return full + full.triu(1).transpose(-1, -2)
