"""CMD-LIC's mathematics (Steps 1-3 of STDET): correlation mode decomposition, the recursive least-squares update
of the affine coefficients (Eq. 6), and the layer / parameter sensitivity ranking. The method that drives them
through training is in cmd.py, whose docstring describes the algorithm.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from ..models import transforms


def main_prefixes(model) -> tuple[str, ...]:
    """Parameter-name prefixes of the main transforms (CompressAI's g_a. and g_s. unless the model names others)."""
    return tuple(n + "." for n in transforms(model))


# ---- Step 1: correlation mode decomposition ------------------------------------------------------------------

def _normalised(traj: torch.Tensor) -> torch.Tensor:
    """Rows centred and scaled to unit norm (float64); constant rows become zero (correlation 0 with anything)."""
    t = traj.double()
    t = t - t.mean(1, keepdim=True)
    norm = t.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, t / norm.clamp_min(1e-300), torch.zeros_like(t))


def abs_corr(traj: torch.Tensor) -> torch.Tensor:
    z = _normalised(traj)
    c = (z @ z.T).abs()
    c.fill_diagonal_(1.0)
    return c


def cluster_modes(corr: torch.Tensor, modes: int) -> np.ndarray:
    """Labels 0..M-1 from complete-linkage clustering on the distance 1 - |corr|."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    dist = (1.0 - corr).clamp_min(0).cpu().numpy()
    np.fill_diagonal(dist, 0.0)
    z = linkage(squareform(dist, checks=False), method="complete")
    labels = fcluster(z, t=modes, criterion="maxclust") - 1
    return labels


def pick_references(corr: torch.Tensor, labels: np.ndarray) -> list[int]:
    """Per mode, the member with the highest mean |corr| to the other members (row positions in `corr`)."""
    refs = []
    for m in np.unique(labels):
        members = np.flatnonzero(labels == m)
        sub = corr[np.ix_(members, members)] if len(members) > 1 else None
        if sub is None:
            refs.append(int(members[0]))
            continue
        mean = (sub.sum(1) - 1.0) / (len(members) - 1)
        refs.append(int(members[int(torch.argmax(mean))]))
    return refs


def assign_modes(traj: torch.Tensor, ref_traj: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """For every trajectory, the mode whose reference it correlates with most (|corr|)."""
    zr = _normalised(ref_traj)
    out = torch.empty(traj.shape[0], dtype=torch.long)
    for s in range(0, traj.shape[0], chunk):
        out[s:s + chunk] = (_normalised(traj[s:s + chunk]) @ zr.T).abs().argmax(1)
    return out


def affine_fit(traj: torch.Tensor, ref_traj: torch.Tensor, mode: torch.Tensor, chunk: int = 1 << 18):
    """(k, d) minimising sum_t (w_i(t) - k w_m(t) - d)^2 per trajectory (Eq. 4); k = 0 for a constant reference."""
    k = torch.empty(traj.shape[0], dtype=torch.float64)
    d = torch.empty(traj.shape[0], dtype=torch.float64)
    r = ref_traj.double()
    rc = r - r.mean(1, keepdim=True)
    var = (rc * rc).sum(1)
    for s in range(0, traj.shape[0], chunk):
        w = traj[s:s + chunk].double()
        m = mode[s:s + chunk]
        cov = ((w - w.mean(1, keepdim=True)) * rc[m]).sum(1)
        kk = torch.where(var[m] > 0, cov / var[m].clamp_min(1e-300), torch.zeros_like(cov))
        k[s:s + chunk] = kk
        d[s:s + chunk] = w.mean(1) - kk * r[m].mean(1)
    return k, d


def decompose(traj: torch.Tensor, modes: int, samples: int, generator: torch.Generator):
    """One CMD at a given M: (reference flat indices (M,), mode per coordinate (N,), k (N,), d (N,)).

    Trajectories that never changed (masked weights of context models, parameters without gradients) correlate
    with nothing: they are neither sampled nor references (a constant reference would make Eq. 6's Gram singular);
    their fit is k = 0, d = their value."""
    live = torch.nonzero(traj.double().var(1) > 0).flatten()
    if len(live) == 0:
        raise ValueError("no parameter changed during the head stage: nothing to decompose")
    s = min(samples, len(live))
    sample = live[torch.randperm(len(live), generator=generator)[:s]].sort().values
    corr = abs_corr(traj[sample])
    labels = cluster_modes(corr, min(modes, s))
    refs = sample[torch.tensor(pick_references(corr, labels))]
    ref_traj = traj[refs]
    mode = assign_modes(traj, ref_traj)
    mode[refs] = torch.arange(len(refs))  # a reference is its own mode's member, k = 1, d = 0
    k, d = affine_fit(traj, ref_traj, mode)
    k[refs], d[refs] = 1.0, 0.0
    return refs, mode, k, d


# ---- Step 3: the recursive least-squares update (Eq. 6) -------------------------------------------------------

def gram(ref_values: torch.Tensor) -> torch.Tensor:
    """Per mode, sum over epochs of [w_m; 1][w_m; 1]^T: (M, 2, 2) from (M, E) reference trajectories."""
    r = ref_values.double()
    g = torch.empty(r.shape[0], 2, 2, dtype=torch.float64)
    g[:, 0, 0] = (r * r).sum(1)
    g[:, 0, 1] = g[:, 1, 0] = r.sum(1)
    g[:, 1, 1] = r.shape[1]
    return g


def rls_update(k, d, mode, g_prev, w_now, ref_now):
    """Eq. 6: K~(t) = (K~(t-1) G(t-1) + W(t) w~(t)^T) (G(t-1) + w~(t) w~(t)^T)^-1, for all coordinates at once."""
    r = ref_now.double()
    outer = torch.zeros_like(g_prev)
    outer[:, 0, 0], outer[:, 0, 1], outer[:, 1, 0], outer[:, 1, 1] = r * r, r, r, 1.0
    g_new = g_prev + outer
    inv = torch.linalg.pinv(g_new)  # = the inverse when the reference moved; never an error when it did not
    gp, gi = g_prev[mode], inv[mode]
    kt = torch.stack([k, d], 1).unsqueeze(1)  # (N, 1, 2)
    b = (kt @ gp).squeeze(1) + w_now.double().unsqueeze(1) * torch.stack([r[mode], torch.ones_like(r[mode])], 1)
    new = (b.unsqueeze(1) @ gi).squeeze(1)
    return new[:, 0], new[:, 1], g_new


# ---- Step 2: sensitivity ------------------------------------------------------------------------------------

def tensors_by_layer(named_params: list[tuple[str, nn.Parameter]]) -> dict[str, list[int]]:
    """Positions in named_params of each layer's tensors (a layer = the parameter name less its last part)."""
    layers: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(named_params):
        layers.setdefault(name.rsplit(".", 1)[0], []).append(i)
    return layers


def _rng_devices(model) -> list:
    """The CUDA device whose RNG a fixed-seed evaluation must restore (torch.manual_seed seeds CUDA too)."""
    dev = next(model.parameters()).device
    return [dev] if dev.type == "cuda" else []


@torch.no_grad()
def sample_loss(model, images: list[torch.Tensor], criterion, seed: int) -> tuple[float, float]:
    """(R-D loss, rate) over the images in training mode with a fixed noise draw (so two calls compare weights)."""
    loss = rate = 0.0
    with torch.random.fork_rng(devices=_rng_devices(model)):
        torch.manual_seed(seed)
        for x in images:
            t = criterion(model(x), x)
            loss, rate = loss + float(t.rd), rate + float(t.rate)  # R-D only: not a model's regularizer
    return loss / len(images), rate / len(images)


def layer_sensitivity(model, named_params, images, criterion, perturb_std: float, seed: int = 0) -> dict[str, float]:
    """Loss increase when a layer's parameters get Gaussian noise of std perturb_std * max|w| (R-D loss for
    g_a / g_s layers, rate for the others)."""
    base_loss, base_rate = sample_loss(model, images, criterion, seed)
    main = main_prefixes(model)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer, idx in tensors_by_layer(named_params).items():
        ps = [named_params[i][1] for i in idx]
        saved = [p.detach().clone() for p in ps]
        scale = max(float(p.detach().abs().max()) for p in ps) * perturb_std
        with torch.no_grad():
            for p in ps:
                p.add_(torch.randn(p.shape, generator=g).to(p) * scale)
        loss, rate = sample_loss(model, images, criterion, seed)
        with torch.no_grad():
            for p, s in zip(ps, saved):
                p.copy_(s)
        out[layer] = (loss - base_loss) if layer.startswith(main) else (rate - base_rate)
    return out


def sensitive_layers(scores: dict[str, float], prefixes: tuple[str, ...] = ("g_a.", "g_s.")) -> list[str]:
    """The top half of the main-transform layers (names starting with `prefixes`: main_prefixes(model)) and the top
    half of the other layers, by loss increase."""
    main = sorted((v, k) for k, v in scores.items() if k.startswith(prefixes))
    rest = sorted((v, k) for k, v in scores.items() if not k.startswith(prefixes))
    pick = [k for _, k in main[::-1][: math.ceil(len(main) / 2)]] + [k for _, k in rest[::-1][: math.ceil(len(rest) / 2)]]
    return pick


def parameter_saliency(model, named_params, images, criterion, seed: int = 0) -> list[torch.Tensor]:
    """|w| * |E_X[dL/dw]| per parameter (Eq. 5), gradients by autograd.grad (the .grad fields are untouched)."""
    params = [p for _, p in named_params]
    total = [torch.zeros_like(p) for p in params]
    with torch.random.fork_rng(devices=_rng_devices(model)):
        torch.manual_seed(seed)
        for x in images:
            t = criterion(model(x), x)
            gs = torch.autograd.grad(t.loss, params, allow_unused=True)
            for acc, gr in zip(total, gs):
                if gr is not None:
                    acc.add_(gr.detach())
    return [(p.detach().abs() * (acc / len(images))).abs() for p, acc in zip(params, total)]
