"""SOAP's state for same-shape tensors kept stacked, and the batched products that use it (issue 16).

A LIC model has many tensors of one shape (N x N x k x k kernels, GDN gammas). A bucket holds the SOAP state of
such tensors as stacked tensors: moments (n, *shape), per dimension one factor (n, d (d + 1) / 2: its upper
triangle, the lower one being derived) and one basis (n, d, d). Each
parameter's state entries are views into them, so the state dict, `precondition()` and the per-tensor code see
ordinary tensors, while a step costs one batched product per dimension and no per-tensor copies.

Rotation without transposed copies ("cyclic" mode products): with the tensor laid out as (d_1, rest), the product
(d_1, rest)^T Q_1 rotates dimension 1 and leaves the layout (rest, d_1), i.e. dimension 2 first. After one product
per dimension the layout is the original again. BLAS reads the transposed operand in place, so no dimension needs
a moved copy (a middle dimension used to), and every product has the full tensor as its large operand.
Trailing small dimensions (a kernel's kh x kw) are rotated together by the Kronecker product of their bases, as in
the per-tensor path: one product with K = kh*kw instead of two nearly memory-bound ones.

Factors from the same products: the factor of dimension i, G_(i) G_(i)^T, does not change when the other
dimensions are rotated by orthogonal matrices (G_(i) -> G_(i) K with K K^T = I). So its Gram matrix is taken from
the gradient at the moment of its rotation, when dimension i is first in memory: no layout work of its own. For a
Kronecker unit the Gram matrix of the merged dimension is formed and each member's is its partial trace. The Grams
are packed (upper triangles) and folded into the bucket's factors by two multi-tensor kernels.

Bases refresh batched too: eigenvalue estimates, the sort, one power-iteration product and a batched QR per
dimension; an item whose factor is not finite or whose QR is not finite keeps its basis (and its second moment is
not permuted), with no host synchronisation. A dimension with a factor but no basis (its first eigh failed) gets
the identity basis here, i.e. the original coordinates, until a refresh finds a better one.
"""

from __future__ import annotations

import math
import string

import torch

from .common import eigh_descending_batched, power_step_basis, triu_positions, unpack_symmetric

KRON_MAX = 64  # trailing dimensions with at most this many elements together are rotated by one Kronecker matrix


def rotation_units(shape: tuple[int, ...], has_factor: list[bool]) -> list[list[int]]:
    """The dimensions rotated together, in memory order: single dimensions, and the trailing small ones merged (at
    most KRON_MAX elements together, at least two dimensions, one of them with a basis). Shared by both paths."""
    j, tail = len(shape), 1
    while j > 0 and tail * shape[j - 1] <= KRON_MAX:
        tail *= shape[j - 1]
        j -= 1
    if len(shape) - j >= 2 and any(has_factor[j:]):
        return [[i] for i in range(j)] + [list(range(j, len(shape)))]
    return [[i] for i in range(len(shape))]


def _batched_kron(mats: list[torch.Tensor]) -> torch.Tensor:
    k = mats[0]
    for q in mats[1:]:
        n, a, b = k.shape
        c, d = q.shape[1:]
        k = (k[:, :, None, :, None] * q[:, None, :, None, :]).reshape(n, a * c, b * d)
    return k


def _partial_traces(gram: torch.Tensor, sizes: list[int], members: list[int]) -> list[torch.Tensor]:
    """Factors of the member dimensions from the Gram matrix (n, T, T) of their merged dimension T = prod(sizes)."""
    n, k = gram.shape[0], len(sizes)
    g = gram.reshape(n, *sizes, *sizes)
    if k == 2:  # a kernel's kh x kw, every step: a diagonal and a sum each (einsum's overhead is ~5x that)
        return [g.diagonal(dim1=2 - m, dim2=4 - m).sum(-1) for m in members]
    rows, cols = string.ascii_lowercase[:k], string.ascii_lowercase[k : 2 * k]
    out = []
    for m in members:
        c = "".join(cols[i] if i == m else rows[i] for i in range(k))
        out.append(torch.einsum(f"z{rows}{c}->z{rows[m]}{cols[m]}", g))
    return out


class Bucket:
    """The stacked SOAP state of n same-shape tensors of one parameter group (see the module docstring)."""

    def __init__(self, params: list, states: list[dict]):
        self.params = params
        first = states[0]
        self.shape = tuple(first["exp_avg"].shape)
        self.step = first["step"]
        self.m = torch.stack([st["exp_avg"] for st in states])
        self.v = torch.stack([st["exp_avg_sq"] for st in states])
        n, dtype, device = len(states), self.m.dtype, self.m.device
        self.gg: list[torch.Tensor | None] = []
        self.q: list[torch.Tensor | None] = []
        for i, d in enumerate(self.shape):
            if first["GG"][i] is None:
                self.gg.append(None)
                self.q.append(None)
                continue
            self.gg.append(torch.stack([st["GG"][i] for st in states]))
            eye = torch.eye(d, dtype=dtype, device=device)
            self.q.append(torch.stack([eye if st["Q"][i] is None else st["Q"][i] for st in states]))
        for j, st in enumerate(states):  # the per-parameter state becomes views into the stacks
            st["exp_avg"], st["exp_avg_sq"] = self.m[j], self.v[j]
            st["GG"] = [None if f is None else f[j] for f in self.gg]
            st["Q"] = [None if q is None else q[j] for q in self.q]
        self.views = [(st["exp_avg"], st["exp_avg_sq"], *st["GG"], *st["Q"]) for st in states]
        # where each factor's upper triangle lies in its flattened d x d Gram matrix
        self.upper = [None if f is None else triu_positions(d, device) for f, d in zip(self.gg, self.shape)]
        self.units = rotation_units(self.shape, [f is not None for f in self.gg])
        self.preconditioned = any(f is not None for f in self.gg)
        self.n = n
        self._unit_mats()

    @staticmethod
    def key(state: dict, staggered: bool = False) -> tuple:
        """Tensors with equal keys share a bucket (and, when refreshes are staggered, a refresh phase)."""
        m = state["exp_avg"]
        return (tuple(m.shape), m.dtype, m.device, tuple(f is None for f in state["GG"]), state["step"],
                state.get("refresh_phase") if staggered else None)

    def still_holds(self, states: list[dict]) -> bool:
        """Whether these states still hold this bucket's views (none replaced, e.g. by load_state_dict or by hand)
        and are in step."""
        step = states[0]["step"]
        for st, views in zip(states, self.views):
            held = (st["exp_avg"], st["exp_avg_sq"], *st["GG"], *st["Q"])
            if st["step"] != step or len(held) != len(views) or any(a is not b for a, b in zip(held, views)):
                return False
        return True

    def _unit_mats(self) -> None:
        """Each unit's rotation matrix (n, T, T): the basis of a single dimension, or the Kronecker product of the
        members' bases (identity for a member without one); None where no member has a basis."""
        self.mats = []
        for unit in self.units:
            qs = [self.q[i] for i in unit]
            if all(q is None for q in qs):
                self.mats.append(None)
            elif len(unit) == 1:
                self.mats.append(qs[0])
            else:
                ref = next(q for q in qs if q is not None)
                full = [q if q is not None else
                        torch.eye(self.shape[i], dtype=ref.dtype, device=ref.device).expand(self.n, -1, -1)
                        for i, q in zip(unit, qs)]
                self.mats.append(_batched_kron(full))

    # ---- the products --------------------------------------------------------------------------------------------
    def rotate(self, x: torch.Tensor, back: bool = False, accumulate: float | None = None) -> torch.Tensor:
        """x (n, *shape) rotated into the eigenbases (or out of them with back=True). With `accumulate` = beta, the
        factors also take x's Gram matrices: F <- beta F + (1 - beta) X_(i) X_(i)^T (x must be the gradient)."""
        n, total = self.n, math.prod(self.shape)
        y = x.reshape(n, total)
        grams: list = []  # (factor, packed Gram) pairs, folded in by two multi-tensor kernels at the end
        for unit, mat in zip(self.units, self.mats):
            size = math.prod(self.shape[i] for i in unit)
            y2 = y.reshape(n, size, total // size)  # this unit first in memory
            if accumulate is not None:
                self._grams(unit, y2, grams)
            if mat is None:
                y = y2.transpose(1, 2).contiguous()
            else:
                y = torch.bmm(y2.transpose(1, 2), mat.transpose(1, 2) if back else mat)
        if grams:
            factors = [f for f, _ in grams]
            torch._foreach_mul_(factors, accumulate)
            torch._foreach_add_(factors, [g for _, g in grams], alpha=1 - accumulate)
        return y.reshape(n, *self.shape)

    def _grams(self, unit: list[int], y2: torch.Tensor, out: list) -> None:
        members = [i for i in unit if self.gg[i] is not None]
        if not members:
            return
        gram = torch.bmm(y2, y2.transpose(1, 2))
        if len(unit) == 1:  # (pack_symmetric inlined: this runs for every factor at every step)
            i = unit[0]
            out.append((self.gg[i], gram.view(self.n, -1).index_select(1, self.upper[i])))
            return
        sizes = [self.shape[i] for i in unit]
        for i, part in zip(members, _partial_traces(gram, sizes, [unit.index(i) for i in members])):
            out.append((self.gg[i], part.reshape(self.n, -1).index_select(1, self.upper[i])))

    # ---- the basis refresh ---------------------------------------------------------------------------------------
    def refresh(self, exact: bool, qr: str = "householder") -> None:
        """New bases for every item: exact eigh or one power-iteration step + QR (both batched), the columns
        sorted by their estimated eigenvalue with the second moment permuted to match. The first moment moves from
        the old bases to the new ones in one pass, by R_i = Q_new_i^T Q_old_i per dimension (equal to rotating it
        back and in again, at half the cost). An item whose new basis cannot be had keeps its old one. `qr`: how the
        power-iteration product is orthonormalised (common.power_step_basis: householder or cholesky)."""
        if not self.preconditioned:
            return
        kept = self.mats  # the unit matrices keep their storage (a captured step reads them: soap_graph.py)
        old = [None if q is None else q.clone() for q in self.q]
        for i, f in enumerate(self.gg):
            if f is None:
                continue
            f = unpack_symmetric(f)
            if exact:  # (one batched eigh per stack; an item without a basis keeps its old one)
                q, ok = eigh_descending_batched(f)
                self.q[i].copy_(torch.where(ok[:, None, None], q, self.q[i]))
            else:
                self._power_qr(i, f, qr)
        self._unit_mats()
        new_mats = self.mats
        self.q, new_q = old, self.q
        self._unit_mats()  # the old bases' unit matrices
        old_mats = self.mats
        self.q = new_q
        # (rotate() applies mat as y <- mat^T y along each unit: mat = Q_old^T... so pass R^T = Q_old^T Q_new)
        self.mats = [None if a is None else torch.bmm(a.transpose(1, 2), b) for a, b in zip(old_mats, new_mats)]
        self.m.copy_(self.rotate(self.m))
        for k, (mat, new) in enumerate(zip(kept, new_mats)):
            if mat is None or new is None:
                kept[k] = new
            elif mat is not new:  # (a single dimension's matrix is its basis, updated in place above)
                mat.copy_(new)
        self.mats = kept

    def _power_qr(self, i: int, f: torch.Tensor, qr: str) -> None:
        n, d, old = self.n, self.shape[i], self.q[i]
        scale = f.abs().amax(dim=(1, 2))
        ok = torch.isfinite(scale) & (scale > 0)
        eye = torch.eye(d, dtype=f.dtype, device=f.device)
        # scaled to a maximum of 1 as in eigh (fp32 underflow); a bad item's factor is replaced by I before the QR
        fs = torch.where(ok[:, None, None], f / torch.where(ok, scale, 1.0)[:, None, None], eye)
        est = (old * torch.bmm(fs, old)).sum(1)  # diag(Q^T F Q): the current eigenvalue estimates
        order = torch.argsort(est, dim=1, descending=True)
        sorted_old = torch.gather(old, 2, order[:, None, :].expand(n, d, d))
        q, failed = power_step_basis(fs, sorted_old, qr)  # (householder: a failing item fails the batch)
        ok = ok & ~failed
        old.copy_(torch.where(ok[:, None, None], q, old))
        order = torch.where(ok[:, None], order, torch.arange(d, device=f.device))
        if f.device.type == "cpu" and bool((order == torch.arange(d)).all()):
            return  # nothing moved (a host read is free on the CPU; on a GPU the gather is cheaper than the read)
        # the second moment follows its eigenvectors: v's dimension i permuted by each item's order. Whole rows
        # of the trailing dimensions are moved by one index_select where they are long (10x faster than an
        # elementwise gather on the CPU); short ones (a kernel's last dimensions) by the gather.
        pre, post = math.prod(self.shape[:i]), math.prod(self.shape[i + 1 :])
        if post >= 8:
            rows = (torch.arange(n * pre, device=f.device) * d).view(n, pre, 1) + order.view(n, 1, d)
            self.v.copy_(self.v.view(n * pre * d, post).index_select(0, rows.reshape(-1)).view(self.v.shape))
        else:
            shape = [n] + [1] * len(self.shape)
            shape[i + 1] = d
            self.v.copy_(torch.gather(self.v, i + 1, order.reshape(shape).expand(self.v.shape)))


def updates_back(buckets: list[Bucket], directions: list[torch.Tensor]) -> tuple[list, list]:
    """The buckets' Adam directions rotated back out of the eigenbases: (the parameters, their updates) in bucket
    order, each update in its parameter's shape and dtype."""
    order, updates = [], []
    for b, d in zip(buckets, directions):
        u = b.rotate(d, back=True) if b.preconditioned else d
        order.extend(b.params)
        parts = u.unbind(0)
        updates.extend(parts if b.plain else (x.view(p.shape).to(p.dtype) for x, p in zip(parts, b.params)))
    return order, updates
