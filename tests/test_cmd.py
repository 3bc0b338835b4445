"""CMD-LIC: mode decomposition on synthetic trajectories with known modes, Eq. 6 against the batch fit, embedded
parameters staying affine without optimizer-state drift, SMA against the bare optimizer and a hand-computed
sequence, and the sensitivity ranking of a layer made sensitive on purpose."""

import json

import pytest
import torch

from lictrain.checkpoint import load_checkpoint
from lictrain.losses import RateDistortionLoss
from lictrain.methods.cmd_modes import affine_fit, decompose, gram, layer_sensitivity, rls_update, sensitive_layers
from lictrain.models import build_model
from lictrain.optim import build_optimizer
from lictrain.optim.sma import SMA
from lictrain.train import train
from tests.conftest import tiny_config


def _synthetic(n_per_mode=40, modes=3, epochs=12, noise=1e-4, seed=0):
    """Reference random walks (one per mode) and members k * ref + d (+ a little noise)."""
    g = torch.Generator().manual_seed(seed)
    refs = torch.cumsum(torch.randn(modes, epochs, generator=g, dtype=torch.float64), 1)
    rows, truth_mode, truth_k, truth_d = [], [], [], []
    for m in range(modes):
        k = torch.empty(n_per_mode, dtype=torch.float64).uniform_(0.5, 2.0, generator=g) * \
            torch.where(torch.rand(n_per_mode, generator=g) < 0.5, -1.0, 1.0).double()
        d = torch.randn(n_per_mode, generator=g, dtype=torch.float64)
        rows.append(k[:, None] * refs[m] + d[:, None] + noise * torch.randn(n_per_mode, epochs, generator=g,
                                                                              dtype=torch.float64))
        truth_mode += [m] * n_per_mode
        truth_k.append(k)
        truth_d.append(d)
    perm = torch.randperm(n_per_mode * modes, generator=g)
    traj = torch.cat(rows)[perm]
    return traj, torch.tensor(truth_mode)[perm], torch.cat(truth_k)[perm], torch.cat(truth_d)[perm], refs


def test_cmd_recovers_known_modes_and_affine_coefficients():
    traj, truth, k_true, d_true, refs_true = _synthetic()
    refs, mode, k, d = decompose(traj, 3, samples=60, generator=torch.Generator().manual_seed(1))
    # the partition is the true one up to the naming of the modes
    pairs = {(int(a), int(b)) for a, b in zip(mode, truth)}
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3
    # every coordinate is the affine image of its reference: w = k * w_ref + d
    recon = k[:, None] * traj[refs][mode] + d[:, None]
    assert (recon - traj).abs().max() < 1e-2
    # and the coefficients are the true ones up to the reference's own (k_r, d_r)
    for m in range(3):
        r = int(refs[m])
        members = mode == m
        want_k = k_true[members] / k_true[r]
        want_d = d_true[members] - want_k * d_true[r]
        torch.testing.assert_close(k[members], want_k, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(d[members], want_d, atol=1e-2, rtol=1e-3)


def test_constant_trajectories_are_neither_sampled_nor_references():
    """Masked weights of context models never change: they must not collapse the clustering or become references
    (a constant reference makes Eq. 6's Gram singular); their fit is k = 0, d = their value."""
    traj, truth, *_ = _synthetic()
    constant = torch.full((40, traj.shape[1]), 0.25, dtype=torch.float64)
    both = torch.cat([traj, constant])
    refs, mode, k, d = decompose(both, 3, samples=200, generator=torch.Generator().manual_seed(1))
    assert len(refs) == 3 and (refs < len(traj)).all()
    assert len({(int(a), int(b)) for a, b in zip(mode[: len(traj)], truth)}) == 3  # still the true partition
    assert (k[len(traj):] == 0).all() and torch.allclose(d[len(traj):], torch.full((40,), 0.25, dtype=torch.float64))
    g = gram(both[refs, :4])
    k2, d2, _ = rls_update(k, d, mode, g, both[:, 4], both[refs, 4])
    assert torch.isfinite(k2).all() and torch.isfinite(d2).all()


def test_recursive_update_equals_the_batch_least_squares_fit():
    traj, *_ = _synthetic(noise=0.3, epochs=15)  # far from exactly affine: the fit is a real least-squares one
    head = 6
    refs, mode, k, d = decompose(traj[:, :head], 3, samples=120, generator=torch.Generator().manual_seed(0))
    g = gram(traj[refs, :head])
    for t in range(head, traj.shape[1]):
        k, d, g = rls_update(k, d, mode, g, traj[:, t], traj[refs, t])
    k_batch, d_batch = affine_fit(traj, traj[refs], mode)
    torch.testing.assert_close(k, k_batch, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(d, d_batch, atol=1e-8, rtol=1e-8)


def test_sma_with_l1_alpha1_is_the_bare_optimizer_and_alpha_half_by_hand():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5)), None
    b = torch.nn.Parameter(a.detach().clone())
    bare = build_optimizer("adam", [a], 0.1)
    wrapped = build_optimizer("adam+sma", [b], 0.1, {"sma": {"alpha": 1.0, "every": 1}})
    for step in range(7):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        bare.step()
        wrapped.step()
        assert torch.equal(a, b), step
    # by hand: SGD lr 1, gradient 1 every step, w0 = 0, alpha 0.5, every 2:
    # steps 1, 2: w = -1, -2; sync: avg = 0.5*0 + 0.5*(-2) = -1, w = -1
    # steps 3, 4: w = -2, -3; sync: avg = 0.5*(-1) + 0.5*(-3) = -2, w = -2;  step 5: w = -3
    w = torch.nn.Parameter(torch.zeros(1))
    opt = SMA(torch.optim.SGD([w], lr=1.0), alpha=0.5, every=2)
    seen = []
    for _ in range(5):
        w.grad = torch.ones(1)
        opt.step()
        seen.append(w.item())
    assert seen == [-1.0, -1.0, -2.0, -2.0, -3.0]
    # its state round-trips (a resumed run continues the same averages)
    clone = SMA(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), alpha=0.5, every=2)
    clone.load_state_dict(opt.state_dict())
    assert clone.count == 5 and clone.average[0].item() == -2.0


def test_sma_is_an_optimizer_with_torchs_hooks_and_shared_groups():
    w = torch.nn.Parameter(torch.zeros(1))
    base = torch.optim.SGD([w], lr=1.0)
    opt = SMA(base, alpha=0.5, every=2)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(o))
    w.grad = torch.ones(1)
    opt.step()
    assert calls == [opt]  # torch's step hooks run: Optimizer.__init__ was called
    opt.param_groups[0]["lr"] = 0.25  # a schedule's change is the base optimizer's
    assert base.param_groups[0]["lr"] == 0.25 and opt.state is base.state
    base.only_on_base = 1
    with pytest.raises(AttributeError):
        opt.only_on_base  # nothing is forwarded silently: the wrapped optimizer is opt.base


def test_the_layer_made_sensitive_ranks_first():
    torch.manual_seed(0)
    model = build_model("mbt2018-mean", "tiny").train()
    named = [(n, p) for n, p in model.named_parameters() if not n.endswith("quantiles")]
    with torch.no_grad():  # one huge weight: the layer's noise (relative to max|w|) swamps its other weights
        model.g_s[2].weight[0, 0, 0, 0] = 60.0
    images = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    scores = layer_sensitivity(model, named, images, RateDistortionLoss(0.013), 0.1)
    main = sorted(((v, k) for k, v in scores.items() if k.startswith(("g_a.", "g_s."))), reverse=True)
    assert main[0][1] == "g_s.2"
    picked = sensitive_layers(scores)
    assert "g_s.2" in picked
    rest = [k for k in scores if not k.startswith(("g_a.", "g_s."))]
    assert sum(k in picked for k in rest) == -(-len(rest) // 2)  # the top half of the entropy-model layers
    assert sum(k in picked for _, k in main) == -(-len(main) // 2)  # and of the main transforms' layers


CMD_FAST = ('method.options={epoch_steps: 2, head_epochs: 3, modes: [3, 6], samples_per_mode: 50, '
            'embed_percent: 10, sensitivity_images: 4}')


def test_cmd_lic_trains_embeds_and_keeps_embedded_parameters_affine(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=16", "optim.name=adam+sma", "method.name=cmd-lic", CMD_FAST,
                      "train.val_every=8")
    train(cfg)
    ck = load_checkpoint(tmp_path / "run")
    m = ck["method"]
    assert m["decomposed"] and m["embedded"].any()
    names = [n for n, p in build_model("mbt2018-mean", "tiny").named_parameters() if not n.endswith("quantiles")]
    flat = torch.cat([ck["model"][n].reshape(-1) for n in names]).double()
    emb = m["embedded"]
    want = m["k"][emb] * flat[m["refs"]][m["mode"][emb]] + m["d"][emb]
    torch.testing.assert_close(flat[emb], want, atol=1e-5, rtol=1e-5)
    assert not (emb & ~m["embeddable"]).any() and not emb[m["refs"]].any()
    # no optimizer-state drift: Adam's moments of embedded coordinates are exactly zero
    state = ck["optimizer"]["base"]["state"]
    m1 = torch.cat([state[i]["exp_avg"].reshape(-1) for i in range(len(names))])
    m2 = torch.cat([state[i]["exp_avg_sq"].reshape(-1) for i in range(len(names))])
    assert m1[emb].abs().max() == 0 and m2[emb].abs().max() == 0
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fr = [r["embedded_fraction"] for r in rows if r["kind"] == "train"]
    assert fr[0] == 0 and fr[-1] > 0.2 and all(a <= b for a, b in zip(fr, fr[1:]))


def test_cmd_lic_resumes_exactly_across_the_decomposition(tmp_path):
    common = ("optim.name=adam+sma", "method.name=cmd-lic", CMD_FAST, "train.val_every=4", "train.ckpt_every=4")
    train(tiny_config(tmp_path, "train.steps=12", *common, name="straight"))
    train(tiny_config(tmp_path, "train.steps=4", *common, name="split"))  # stops inside the head stage
    train(tiny_config(tmp_path, "train.steps=12", *common, name="split"), resume=True)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["method"]["embedded"], b["method"]["embedded"])


def test_sma_options_are_checked(tmp_path):
    from lictrain.errors import LictrainError

    with pytest.raises(LictrainError, match="wrapper 'sma' has no option"):
        build_optimizer("adam+sma", [torch.nn.Parameter(torch.zeros(1))], 0.1, {"sma": {"beta": 1}})
    with pytest.raises(LictrainError, match="alpha must be in"):
        build_optimizer("adam+sma", [torch.nn.Parameter(torch.zeros(1))], 0.1, {"sma": {"alpha": 0}})
    with pytest.raises(LictrainError, match="modes must be a list of positive integers"):
        train(tiny_config(tmp_path, "method.name=cmd-lic", "method.options={modes: 30}"))
