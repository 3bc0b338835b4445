"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors (Vyas et al. 2024, arXiv 2409.11321).

For a parameter whose gradient G has dimensions d_1 ... d_k, SOAP keeps one factor per dimension,
F_i = EMA over steps of G_(i) G_(i)^T (G_(i): G with dimension i first, the rest flattened; for a matrix F_1 = L,
F_2 = R), and an orthogonal basis Q_i of its eigenvectors. Adam's moments live in the rotated space
G' = G x_1 Q_1^T ... x_k Q_k^T; the update is rotated back with the Q_i. Q_i comes from `eigh` the first time and is
refreshed every `precondition_frequency` steps by one power-iteration step and a QR decomposition, the columns first
sorted by their estimated eigenvalue with Adam's second moment permuted to match (as in the authors' code).

Choices (all documented because they matter for LIC):
- Dimensions. Every dimension of size 2..max_precond_dim gets its own factor, whatever the tensor's rank: a conv
  kernel (out, in, kh, kw) gets factors out x out, in x in, kh x kh, kw x kw; a transposed conv (in, out, kh, kw)
  likewise, so no layout convention is needed. Larger dimensions stay diagonal (identity basis). `merge_dims=True`
  first merges adjacent dimensions greedily while their product stays <= max_precond_dim (so no factor is ever
  larger than max_precond_dim). 1-D and 0-d parameters (biases, GDN betas) get plain Adam unless precondition_1d.
- Defaults follow the LIC papers (SOAP as a drop-in for Adam: same lr, weight decay 0, frequency 10) and the
  authors' implementation for the rest (betas 0.95/0.95, shampoo_beta = beta2, max_precond_dim 10000, no merging).
- Unlike the authors' code, the first step is taken (in the basis of the first gradient's factors) instead of only
  initialising the factors, so with preconditioning off (max_precond_dim=0) SOAP is exactly torch.optim.Adam.
  Adam's epsilon is placed as in torch.optim.Adam (after the bias-corrected square root), for the same reason.
- The first moment is kept in the rotated space (rotated again exactly when the basis changes), which saves one
  projection per step; the arithmetic equals keeping it in the original space.
- Numerics: factors, eigh and QR run in fp32 (fp64 for fp64 parameters) whatever the parameter dtype or autocast.
  If a factor is not finite or eigh/QR fail, the step retries in fp64 with jitter and otherwise keeps the last good
  basis; a non-finite gradient leaves factors and moments untouched and skips that parameter's step.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


def merged_shape(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Merge adjacent dimensions greedily while their product stays <= max_dim (dims of 1 are absorbed)."""
    out: list[int] = []
    for d in shape:
        if out and out[-1] * d <= max_dim:
            out[-1] *= d
        else:
            out.append(d)
    return tuple(out) or (1,)


def _project(x: torch.Tensor, qs: list, back: bool = False) -> torch.Tensor:
    """Rotate every dimension i of x by Q_i^T (into the eigenbasis) or, with back=True, by Q_i (out of it)."""
    if len(qs) == 2 and qs[0] is not None and qs[1] is not None:  # the common matrix case, as two matmuls
        ql, qr = qs
        return ql @ x @ qr.T if back else ql.T @ x @ qr
    for q in qs:
        # tensordot contracts dim 0 and appends the new axis last: after all dims the order is restored.
        x = x.movedim(0, -1) if q is None else torch.tensordot(x, q, dims=([0], [1 if back else 0]))
    return x


def _eigh_descending(m: torch.Tensor) -> torch.Tensor | None:
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


class SOAP(Optimizer):
    def __init__(
        self,
        params,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        bias_correction: bool = True,
        basis_refresh: str = "qr",
    ):
        if lr <= 0 or eps < 0 or weight_decay < 0:
            raise ValueError("SOAP needs lr > 0, eps >= 0, weight_decay >= 0")
        if not all(0 <= b < 1 for b in betas) or (shampoo_beta is not None and not 0 <= shampoo_beta < 1):
            raise ValueError("SOAP betas must be in [0, 1)")
        if precondition_frequency < 1:
            raise ValueError("precondition_frequency must be at least 1")
        if basis_refresh not in ("qr", "eigh"):
            raise ValueError("basis_refresh must be 'qr' (power iteration + QR, the default) or 'eigh' (exact)")
        defaults = dict(
            lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim, merge_dims=merge_dims,
            precondition_1d=precondition_1d, bias_correction=bias_correction, basis_refresh=basis_refresh,
        )
        super().__init__(params, defaults)

    # ---- shapes and state ----------------------------------------------------------------------------------------
    @staticmethod
    def _work_shape(p: torch.Tensor, group: dict) -> tuple[int, ...]:
        shape = tuple(p.shape) or (1,)
        if group["merge_dims"] and len(shape) > 1:
            shape = merged_shape(shape, group["max_precond_dim"])
        return shape

    @staticmethod
    def _factor_dtype(p: torch.Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _fresh_state(self, p: torch.Tensor, group: dict) -> dict:
        """A new, unstored state for p: zero moments and factors, no basis yet."""
        shape = self._work_shape(p, group)
        dtype = self._factor_dtype(p)
        precondition = len(shape) > 1 or group["precondition_1d"]
        factors = [
            torch.zeros(d, d, dtype=dtype, device=p.device) if precondition and 1 < d <= group["max_precond_dim"] else None
            for d in shape
        ]
        return {
            "step": 0,
            "exp_avg": torch.zeros(shape, dtype=dtype, device=p.device),  # in the rotated space
            "exp_avg_sq": torch.zeros(shape, dtype=dtype, device=p.device),
            "GG": factors,
            "Q": [None] * len(shape),
        }

    # ---- the pieces of a step ------------------------------------------------------------------------------------
    @staticmethod
    def _accumulate_factors(state: dict, g: torch.Tensor, beta: float) -> None:
        for i, f in enumerate(state["GG"]):
            if f is None:
                continue
            gi = g.movedim(i, 0).reshape(g.shape[i], -1)
            f.lerp_(gi @ gi.T, 1 - beta)

    @staticmethod
    def _refresh_basis(state: dict, exact: bool) -> None:
        """New eigenbases: eigh (first time, or exact=True) or one power-iteration step + QR."""
        old = list(state["Q"])
        m_orig = _project(state["exp_avg"], old, back=True) if any(q is not None for q in old) else state["exp_avg"]
        v = state["exp_avg_sq"]
        new = list(old)
        for i, f in enumerate(state["GG"]):
            if f is None:
                continue
            if exact or old[i] is None:
                q = _eigh_descending(f)
            else:
                q = None
                scale = f.abs().max()
                if torch.isfinite(scale) and scale > 0:
                    fs = f / scale  # as in eigh: keep fp32 away from underflow
                    est = (old[i] * (fs @ old[i])).sum(0)  # diag(Q^T F Q): current eigenvalue estimates
                    order = torch.argsort(est, descending=True)
                    try:
                        q, _ = torch.linalg.qr(fs @ old[i][:, order])
                    except RuntimeError:
                        q = None
                    if q is not None and torch.isfinite(q).all():
                        v = v.index_select(i, order)
                    else:
                        q = None
            if q is not None:
                new[i] = q
        state["Q"] = new
        state["exp_avg_sq"] = v
        state["exp_avg"] = _project(m_orig, new) if any(q is not None for q in new) else m_orig

    def _direction(self, state: dict, group: dict, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int):
        """The update (to subtract, before weight decay) for given moments, in the working shape."""
        b1, b2 = group["betas"]
        bc1, bc2 = (1 - b1**step, 1 - b2**step) if group["bias_correction"] else (1.0, 1.0)
        # Same operations in the same order as torch.optim.Adam (bit-identical without preconditioning).
        denom = (exp_avg_sq.sqrt() / bc2**0.5).add_(group["eps"])
        return _project(exp_avg * (group["lr"] / bc1) / denom, state["Q"], back=True)

    # ---- public API ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            shampoo_beta = b2 if group["shampoo_beta"] is None else group["shampoo_beta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SOAP does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._fresh_state(p, group))
                g = p.grad.reshape(state["exp_avg"].shape).to(state["exp_avg"].dtype)
                if not torch.isfinite(g).all():
                    continue  # never let a bad gradient into the factors, moments or weights
                state["step"] += 1
                t = state["step"]
                if t == 1:
                    self._accumulate_factors(state, g, shampoo_beta)
                    self._refresh_basis(state, exact=True)
                g_rot = _project(g, state["Q"])
                state["exp_avg"].lerp_(g_rot, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g_rot, g_rot, value=1 - b2)
                update = self._direction(state, group, state["exp_avg"], state["exp_avg_sq"], t)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.sub_(update.reshape(p.shape).to(p.dtype))
                if t > 1:
                    self._accumulate_factors(state, g, shampoo_beta)
                if t % group["precondition_frequency"] == 0:
                    self._refresh_basis(state, exact=group["basis_refresh"] == "eigh")
        return loss

    @torch.no_grad()
    def precondition(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The update step() would apply (as a tensor to add to the parameter) if these were the gradients.

        Side-effect free: moments, factors and bases are read, never written. Parameters without state yet use
        the basis of the factors their gradient would create. Weight decay is included. `grads` follows the order
        of the parameters over all groups; None gives None.
        """
        params = [p for group in self.param_groups for p in group["params"]]
        if len(grads) != len(params):
            raise ValueError(f"precondition got {len(grads)} gradients for {len(params)} parameters")
        groups = [group for group in self.param_groups for _ in group["params"]]
        out: list[torch.Tensor | None] = []
        for p, grad, group in zip(params, grads, groups):
            if grad is None:
                out.append(None)
                continue
            b1, b2 = group["betas"]
            shampoo_beta = b2 if group["shampoo_beta"] is None else group["shampoo_beta"]
            real = self.state.get(p)
            if real and real["step"] > 0:
                state = {"Q": real["Q"], "exp_avg": real["exp_avg"], "exp_avg_sq": real["exp_avg_sq"]}
                t = real["step"] + 1
            else:
                state = self._fresh_state(p, group)
                g0 = grad.reshape(state["exp_avg"].shape).to(state["exp_avg"].dtype)
                self._accumulate_factors(state, g0, shampoo_beta)
                self._refresh_basis(state, exact=True)
                t = 1
            g = grad.reshape(state["exp_avg"].shape).to(state["exp_avg"].dtype)
            g_rot = _project(g, state["Q"])
            m = torch.lerp(state["exp_avg"], g_rot, 1 - b1)
            v = state["exp_avg_sq"] * b2 + (1 - b2) * g_rot * g_rot
            update = -self._direction(state, group, m, v, t).reshape(p.shape)
            if group["weight_decay"]:
                update = update - group["lr"] * group["weight_decay"] * p.to(update.dtype)
            out.append(update.to(p.dtype))
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts loaded state to each parameter's dtype; SOAP's numerics need fp32 (or fp64) state.
        for p, state in self.state.items():
            dtype = self._factor_dtype(p)
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(dtype)
            for key in ("GG", "Q"):
                if key in state:
                    state[key] = [None if t is None else t.to(dtype) for t in state[key]]
