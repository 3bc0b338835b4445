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


def eigh_descending_batched(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh_descending over a stack (n, d, d): one batched eigh instead of one per matrix (and, on a GPU, one host
    synchronisation for the stack instead of several per matrix). Returns (bases, ok); an item that is not finite
    is not ok (its basis is not to be used), a zero item gets the identity. Items whose batched eigh fails or gives
    non-finite vectors are redone one by one by eigh_descending (its fp64 retry). One host read per stack decides
    whether any needs it (torch's eigh reads the host for its own error check anyway)."""
    n, d = f.shape[0], f.shape[-1]
    scale = f.abs().amax(dim=(1, 2))
    finite = torch.isfinite(scale)
    zero = scale == 0
    eye = torch.eye(d, dtype=f.dtype, device=f.device)
    fs = torch.where((finite & ~zero)[:, None, None], f / torch.where(finite & ~zero, scale, 1.0)[:, None, None], eye)
    try:
        q = torch.linalg.eigh(fs)[1].flip(-1)
        bad = ~torch.isfinite(q).flatten(1).all(1) & finite
    except RuntimeError:  # includes torch.linalg.LinAlgError: one item failed the batch
        q, bad = fs.clone(), finite.clone()
    q = torch.where(zero[:, None, None], eye, q)
    ok = finite & ~bad
    if bool(bad.any()):  # the rare retry (a host read, once per stack)
        for j in bad.nonzero().flatten().tolist():
            qj = eigh_descending(f[j])
            if qj is not None:
                q[j], ok[j] = qj, True
    return q, ok


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


# ---- orthonormal bases from a power-iteration step ---------------------------------------------------------------
REFRESH_QR = ("householder", "cholesky")
# the fallback's shift, relative to the factor's largest entry (scaled to 1): (F + SHIFT I) Q has the eigenvectors
# of F and singular values >= SHIFT for a PSD F, so its fp64 Cholesky succeeds (CholeskyQR2 holds to a condition
# number of ~1e7 in fp64)
CHOLESKY_SHIFT = 1e-6


def cholesky_qr2(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Q factor of a stack of square matrices (n, d, d) by CholeskyQR2 in fp64, and which items failed.

    Q = A R^-1 with R^T R = A^T A (Cholesky), done twice (the second pass restores orthogonality to rounding). Its
    R has a positive diagonal, so Q equals Householder's (LAPACK's, whose R may have either sign) up to the signs of
    its columns. Every item is a batched product, a batched Cholesky and a batched triangular solve: on a GPU no
    per-matrix work (torch's Householder QR runs CUDA's orgqr one matrix at a time). An item whose Cholesky fails
    (A rank-deficient or too ill-conditioned) or whose Q is not finite is flagged in `failed`, decided on the
    device; its Q is not to be used."""
    x = a.double()
    failed = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(x.mT @ x)
        failed |= info != 0
        x = torch.linalg.solve_triangular(chol.mT, x, upper=True, left=False)  # X R^-1, R = chol^T
    failed |= ~torch.isfinite(x).flatten(1).all(1)
    return x.to(a.dtype), failed


def power_step_basis(fs: torch.Tensor, q_old: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One power-iteration step towards the eigenvectors of the factors fs (n, d, d, scaled to a largest entry of 1,
    symmetric PSD) from the bases q_old (n, d, d): the Q factor of fs @ q_old, and which items have no usable one.

    householder: torch.linalg.qr (the reference; a failure of any item fails the batch). cholesky: CholeskyQR2 in
    fp64; an item where it fails (a singular factor: a dead channel's zero rows) is redone from the shifted factor
    (fs + CHOLESKY_SHIFT I) @ q_old, which has the same eigenvectors and is well enough conditioned, and keeps the old
    basis's directions in the factor's null space where Householder would give arbitrary ones. The redo is chosen on
    the device (a second batched pass, selected per item by torch.where), so a GPU is never synchronised; on the CPU
    it runs only when an item failed (a host read is free there)."""
    a = torch.bmm(fs, q_old)
    if method == "householder":
        try:
            q = torch.linalg.qr(a)[0]
        except RuntimeError:
            return q_old, torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
        return q, ~torch.isfinite(q).flatten(1).all(1)
    if method != "cholesky":
        raise ValueError(f"unknown QR method '{method}' (one of {', '.join(REFRESH_QR)})")
    q, failed = cholesky_qr2(a)
    if a.device.type == "cpu" and not bool(failed.any()):
        return q, failed
    shifted = torch.where(failed[:, None, None], a + CHOLESKY_SHIFT * q_old, a)
    q2, failed2 = cholesky_qr2(shifted)
    return torch.where(failed[:, None, None], q2, q), failed & failed2
