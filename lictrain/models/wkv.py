"""The bidirectional WKV of Vision-RWKV (and of LALIC's Bi-RWKV blocks) in pure PyTorch: exact, differentiable, on
any device, without the authors' CUDA kernel.

For a sequence of T tokens, per channel c, with decay w per step and bonus u (LALIC learns w unconstrained, so w may
be negative: weights then grow with distance; the computation below does not assume a sign):

    wkv_t = (sum_{i != t} exp(-(|t - i| - 1) w + k_i) v_i + exp(u + k_t) v_t)
            / (sum_{i != t} exp(-(|t - i| - 1) w + k_i)     + exp(u + k_t))

(the caller chooses w's scale: Vision-RWKV and LALIC pass their learned decay and bonus divided by T; LALIC's CUDA
kernel adds 1e-6 to the denominator and, per its chunked scan, differs from this formula by O(|decay| / T), a
difference lictrain does not reproduce). Computed as two decayed scans
(tokens before t, tokens after t: the second is the first on the reversed sequence) in chunks of `chunk` tokens:
inside a chunk the decayed sums are a masked (chunk x chunk) product per channel, from chunk to chunk a carried
state (again one product over the chunks). Every partial sum is kept as (numerator, denominator, log-scale) and
exponents have their maximum subtracted before exponentiation (as a softmax is stabilised). When the log-weights
may span more than _FAST_SPREAD nats (keys far apart, or steep decays), the products could lose terms below fp32's
range, and the sums are computed pair by pair with each row's own maximum (in-chunk) and chunk by chunk (the
carried state) instead: the result is exact up to floating-point rounding for any
range of k, w and u, tested against a token-by-token reference in float64. LALIC's decays are its learned values
divided by T (tiny) and its keys are projections of layer-normed tokens, so it takes the products.

Measured on 2 CPU cores (2026-11-23): B = 2, T = 64 x 64, C = 64, forward + backward 0.24 s at chunk 64 (the first,
pair-by-pair version: 2.1 s); a LALIC block at 128 x 128 x 96 (its first stage at 256^2), 1.1 s forward + backward.
On CUDA (and under torch.compile) that path decision, one host read per call (~36 per LALIC forward), would stall
the host every time, so there bi_wkv_scan computes the same sums without one. A fused kernel would be the fast GPU
path (the authors' is built for one GPU architecture only).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# Above this spread of log-weights (keys' range plus the decays, in nats) the sums are taken pair by pair with
# per-row maxima and chunk by chunk; below it as products (fp32 keeps exp(-60) * 1e-7 well above its smallest normal
# number, so nothing underflows). The decision is per call: one outlying channel sends the whole call down the
# slow path, whose in-chunk weights take B x T x chunk x C memory.
_FAST_SPREAD = 60.0


def _logsum(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """(num, den, scale) terms, each worth exp(scale) * (num, den): their sums as (num, den) at a common scale."""
    top = torch.stack([s for _, _, s in parts]).amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    num = sum(n * torch.exp(s - top) for n, _, s in parts)
    den = sum(d * torch.exp(s - top) for _, d, s in parts)
    return num, den, top


def _per_channel_matmul(mat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out[b, n, t, c, s] = sum_i mat[t, i, c] x[b, n, i, c, s], as one batched product over the channels."""
    b, n, i, c, s = x.shape
    out = torch.bmm(mat.permute(2, 0, 1), x.permute(3, 2, 0, 1, 4).reshape(c, i, b * n * s))
    return out.view(c, -1, b, n, s).permute(2, 3, 1, 0, 4)


def _scan_before(w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int, fast: bool):
    """For every t, the sums over i < t of exp(-(t - 1 - i) w + k_i) * (v_i, 1), as (num, den, log-scale);
    k, v: (B, T, C) with T a multiple of chunk; w: (C,); fast: the log-weights' spread allows products."""
    b, t_len, c = k.shape
    n = t_len // chunk
    kc, vc = k.view(b, n, chunk, c), v.view(b, n, chunk, c)
    pos = torch.arange(chunk, device=k.device, dtype=k.dtype)
    dist = pos[:, None] - 1 - pos[None, :]  # t - 1 - i inside a chunk, (L, L)
    mask = pos[:, None] > pos[None, :]
    # in-chunk part: sum over i < t of exp(-(t - 1 - i) w) exp(k_i) (v_i, 1)
    if fast:  # every term within exp(-60) of its chunk's largest: nothing underflows, so the sums as products
        k_top = kc.amax(2, keepdim=True)  # (b, n, 1, c): finite, every chunk holds a real token
        decay = torch.exp(-dist[..., None] * w).masked_fill(~mask[..., None], 0.0)  # (L, L, c)
        ek = torch.exp(kc - k_top)
        in_num, in_den = _per_channel_matmul(decay, torch.stack((ek * vc, ek), -1)).unbind(-1)
        top = k_top.expand_as(kc)
    else:  # the log-weights of every pair, each token's row stabilised by its own maximum (exact for any range)
        logw = -dist[..., None] * w + kc[:, :, None, :, :]
        logw = logw.masked_fill(~mask[..., None], float("-inf"))
        top = logw.amax(3)  # (b, n, L, c), -inf for each chunk's first token
        safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        e = torch.exp(logw - safe[:, :, :, None, :])
        in_num, in_den = (e * vc[:, :, None]).sum(3), e.sum(3)

    # carried state: at the start of chunk j, the sum over all earlier chunks' tokens
    to_end = (chunk - 1 - pos)[:, None] * w  # decay from token i to the chunk's last step, (L, c)
    chunk_logw = kc - to_end  # weight of token i at the next chunk's first token
    chunk_top = chunk_logw.amax(2)  # (b, n, c)
    ec = torch.exp(chunk_logw - chunk_top[:, :, None])
    chunk_num, chunk_den = (ec * vc).sum(2), ec.sum(2)
    all_top = chunk_top.amax(1, keepdim=True)  # (b, 1, c): every chunk holds a real token, so finite
    if fast:
        # the chunk-level scan as one product: chunk j' reaches chunk j's start decayed by (j - 1 - j') chunks
        idx = torch.arange(n, device=k.device)
        gap = (idx[:, None] - 1 - idx[None, :]).to(k.dtype)
        carry = torch.exp(-(gap[..., None] * chunk) * w).masked_fill(~(idx[:, None] > idx[None, :])[..., None], 0.0)
        scale = torch.exp(chunk_top - all_top)
        st = _per_channel_matmul(carry, torch.stack((chunk_num * scale, chunk_den * scale), -1)[:, None])
        st_num, st_den = (x[:, 0, :, None] for x in st.unbind(-1))  # (b, n, 1, c)
        st_scale = (all_top[:, :, None] - pos[:, None] * w).expand(b, n, chunk, c)  # decayed to each token
    else:  # chunk by chunk, the carried state at its own log-scale (exact for any range)
        s_num = torch.zeros(b, c, dtype=k.dtype, device=k.device)
        s_den, s_scale = torch.zeros_like(s_num), torch.full_like(s_num, float("-inf"))
        states = []
        for j in range(n):
            states.append((s_num, s_den, s_scale))
            s_num, s_den, s_scale = _logsum([(s_num, s_den, s_scale - chunk * w),
                                             (chunk_num[:, j], chunk_den[:, j], chunk_top[:, j])])
        st_num = torch.stack([s[0] for s in states], 1)[:, :, None]  # (b, n, 1, c)
        st_den = torch.stack([s[1] for s in states], 1)[:, :, None]
        st_scale = torch.stack([s[2] for s in states], 1)[:, :, None] - pos[:, None] * w  # decayed to each token
    num, den, scale = _logsum([(in_num, in_den, top), (st_num.expand_as(in_num), st_den.expand_as(in_den), st_scale)])
    return num.reshape(b, t_len, c), den.reshape(b, t_len, c), scale.reshape(b, t_len, c)


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The bidirectional WKV (module docstring) of k, v: (B, T, C), with w, u: (C,). Returns (B, T, C)."""
    if k.shape != v.shape or k.dim() != 3 or w.shape != (k.shape[-1],) or u.shape != w.shape:
        raise ValueError(f"bi_wkv needs k, v of shape (B, T, C) and w, u of shape (C,); got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(w.shape)}, {tuple(u.shape)}")
    dtype = torch.promote_types(k.dtype, torch.float32)  # the exponentials need at least fp32's range
    if k.is_cuda or torch.compiler.is_compiling():  # choosing a path below reads the device: the scans need not
        if torch.is_grad_enabled() and any(x.requires_grad for x in (w, u, k, v)):
            # its ~35 float64 intermediates are recomputed in the backward pass instead of kept: only the inputs are
            # saved (at LALIC's paper size and a GPU batch they would otherwise take tens of GB)
            return checkpoint(bi_wkv_scan, w, u, k, v, use_reentrant=False).to(dtype)
        return bi_wkv_scan(w, u, k, v).to(dtype)
    w, u, k, v = (x.to(dtype) for x in (w, u, k, v))
    t_len = k.shape[1]
    chunk = max(1, min(chunk, t_len))
    pad = (-t_len) % chunk
    # One decision, one host read per call: the log-weights inside any chunk span at most the keys' range plus
    # chunk |w|, the chunks' sums at most that range plus 2 chunk |w| and the carry T |w|.
    fast = bool((k.amax(1) - k.amin(1)).amax() + (t_len + 2 * chunk) * w.abs().max() <= _FAST_SPREAD)
    with torch.autocast(k.device.type, enabled=False):  # autocast would run the products in bf16/fp16
        # padded tokens sit after the sequence (forward) or before it (reversed): k = -inf gives them zero weight
        kp = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf"))
        vp = torch.nn.functional.pad(v, (0, 0, 0, pad))
        fwd = [x[:, :t_len] for x in _scan_before(w, kp, vp, chunk, fast)]
        rev_k, rev_v = kp.flip(1).roll(-pad, 1), vp.flip(1).roll(-pad, 1)
        bwd = [x[:, :t_len].flip(1) for x in _scan_before(w, rev_k, rev_v, chunk, fast)]
        num, den, _ = _logsum([tuple(fwd), tuple(bwd), (v, torch.ones_like(v), u + k)])
    return num / den


def bi_wkv_scan(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """bi_wkv without reading anything from the device: log-space prefix sums (logcumsumexp), exact for any range
    of k, w and u, in float64 (returned as float64).

    With centred positions r_t, the weight of token i in token t's sum over i < t is exp(-(r_t - 1) w) exp(r_i w +
    k_i), so that sum is a prefix log-sum-exp of r_i w + k_i (and of r_i w + k_i + log v_i for the numerator); the
    sum over i > t is the same on the reversed sequence with -r. v is split as (relu(v) + d) - (relu(-v) + d), d its
    largest magnitude (so both logs are finite; the d's cancel), and the three log-sums go through one scan. In
    float32 the logs' magnitudes and that split cost ~1e-5 relative error (measured), hence float64: 2.2x the
    products' time on 2 CPU cores (B 2, T 4096, C 64, forward + backward; benchmarks/wkv_paths.py), which is why the
    CPU keeps them."""
    w, u, k, v = (x.to(torch.float64) for x in (w, u, k, v))
    t_len = k.shape[1]
    with torch.autocast(k.device.type, enabled=False):
        ramp = (torch.arange(t_len, device=k.device, dtype=k.dtype) - (t_len - 1) / 2)[:, None] * w  # r_t w, (T, C)
        d = v.detach().abs().amax(1, keepdim=True) + torch.finfo(v.dtype).tiny  # a constant: the d's cancel
        logs = torch.stack([torch.zeros_like(v), torch.log(torch.relu(v) + d), torch.log(torch.relu(-v) + d)])
        s = k + logs  # (3, B, T, C): the logs of exp(k_i) (1, v_i+, v_i-)
        edge = torch.full_like(s[:, :, :1], float("-inf"))  # an empty sum
        before = torch.cat([edge, torch.logcumsumexp(s + ramp, 2)[:, :, :-1]], 2) - (ramp - w)
        after = torch.cat([torch.logcumsumexp((s - ramp).flip(2), 2).flip(2)[:, :, 1:], edge], 2) + (ramp + w)
        den, pos, neg = torch.logsumexp(torch.stack([before, after, s + u]), 0).unbind(0)
        return torch.exp(pos - den) - torch.exp(neg - den)
