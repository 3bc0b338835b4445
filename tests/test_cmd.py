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
from lictrain.trainer import train
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


CMD_FAST = ('method.options={schedule: epochs, epoch_steps: 2, head_epochs: 3, modes: [3, 6], samples_per_mode: 50, '
            'embed_percent: 10, sensitivity_images: 4, max_instant_gap: 100}')


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


def test_schedule_options_go_to_their_own_family():
    """A schedule family's options set that family; one of the other family's is refused by name (before, an
    epochs-schedule option under the budget schedule was silently ignored), an unknown one lists the valid ones."""
    from lictrain.errors import LictrainError
    from lictrain.methods import build_method
    from lictrain.methods.cmd import BudgetSchedule, EpochSchedule

    m = build_method("cmd-lic", {"schedule": "epochs", "epoch_steps": 5, "head_epochs": 3})
    assert m.schedule == EpochSchedule(epoch_steps=5, head_epochs=3, period=1)
    assert [e.step for e in m.schedule.events(30)] == [5, 10, 15, 20, 25, 30]
    m = build_method("cmd-lic", {"preset": "finetune", "dummy": False})
    assert m.schedule == BudgetSchedule(preset="finetune") and m.dummy is False
    with pytest.raises(LictrainError, match="'epoch_steps' belongs to schedule: epochs, and this run's schedule is budget"):
        build_method("cmd-lic", {"epoch_steps": 5})
    with pytest.raises(LictrainError, match="'preset' belongs to schedule: budget"):
        build_method("cmd-lic", {"schedule": "epochs", "preset": "scratch"})
    with pytest.raises(LictrainError, match="has no option head_snapshot; valid options: .*head_snapshots"):
        build_method("cmd-lic", {"head_snapshot": 5})
    with pytest.raises(LictrainError, match="head_epochs >= 2"):
        build_method("cmd-lic", {"schedule": "epochs", "head_epochs": 1})


def test_budget_schedule_event_steps_by_hand():
    from lictrain.methods.cmd import budget_schedule, epoch_schedule

    # 700 steps from scratch: head stage 200 steps (20/70), 20 samples every 10 steps; embedding from 200 to 630
    # (0.9 x 700) in 50 events of 8.6 steps: 208.6 -> 209, 217.2 -> 217, ..., 630
    ev = budget_schedule(700, 20 / 70, 20, 50, 0.9, 20)
    rec = [e for e in ev if e.kind == "record"]
    emb = [e for e in ev if e.kind == "embed"]
    assert [e.step for e in rec] == list(range(10, 201, 10))
    assert [e.epoch for e in rec] == list(range(1, 21))
    assert [e.step for e in emb[:4]] == [209, 217, 226, 234] and emb[-1].step == 630 and len(emb) == 50
    assert [e.epoch for e in emb[:3]] == [21, 22, 23] and emb[-1].epoch == 70
    # the fine-tuning proportions: 500 steps, head 10/50 = 100 steps (20 samples, every 5), 40 events up to 450
    ft = budget_schedule(500, 10 / 50, 20, 40, 0.9, 10)
    assert [e.step for e in ft if e.kind == "record"] == list(range(5, 101, 5))
    emb = [e for e in ft if e.kind == "embed"]
    assert len(emb) == 40 and emb[0].step == 109 and emb[-1].step == 450 and emb[0].epoch == 11
    # the first version's epochs: F = 3 epochs of 10 steps, embedding every 2nd epoch after F, Step 3 every epoch
    old = epoch_schedule(75, 10, 3, 2)
    assert [(e.step, e.kind) for e in old] == [(10, "record"), (20, "record"), (30, "record"), (40, "update"),
                                               (50, "embed"), (60, "update"), (70, "embed")]


def _installed(n_embeddable: int, n: int = 1000):
    """A CMD-LIC state after Step 1 on a flat 1000-parameter vector: `n_embeddable` candidates, stabilities c_i."""
    from lictrain.methods import RunContext
    from lictrain.methods.cmd import CMDLIC

    m = CMDLIC(embed_percent=1.0, dummy_cap=25.0)
    p = torch.nn.Parameter(torch.randn(n, dtype=torch.float64))
    m.attach(RunContext(torch.nn.Module(), torch.optim.SGD([p], lr=0.1), [p], total_steps=700))
    m.refs = torch.tensor([0])
    m.mode = torch.zeros(n, dtype=torch.long)
    m.k, m.d = torch.rand(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    m.k[0], m.d[0] = 1.0, 0.0
    m.k_prev, m.d_prev = m.k + torch.rand(n, dtype=torch.float64), m.d.clone()  # distinct stabilities
    m.embeddable = torch.zeros(n, dtype=torch.bool)
    m.embeddable[1:1 + n_embeddable] = True
    m.embedded = torch.zeros(n, dtype=torch.bool)
    m._after_install()
    return m, p


def test_embedding_counts_and_the_dummy_cap():
    m, p = _installed(600)
    logs = m.embed_step(epoch=21)
    # P = 1% of 1000 embedded; dummy min(21 x 1% / 2, 25%) = 10.5% -> 105, below half of the 590 left
    assert logs["embedded_now"] == 10 and logs["dummy_reset"] == 105
    logs = m.embed_step(epoch=60)  # min(30%, 25%) = 250 resets, below half of the 580 left (290)
    assert logs["dummy_reset"] == 250
    m2, _ = _installed(100)  # late in a run: 100 candidates, 10 embedded now, 90 left
    logs = m2.embed_step(epoch=60)
    assert logs["embedded_now"] == 10 and logs["dummy_reset"] == 45  # capped at half of what is left, not 90


def test_imposition_puts_embedded_coordinates_exactly_on_their_affine_values():
    m, p = _installed(600)
    m.embed_step(epoch=21)
    with torch.no_grad():
        p.add_(torch.randn_like(p))  # an optimizer step moves everything, the reference included
    m.impose()
    emb = m.embedded
    want = m.k[emb] * p.detach()[0] + m.d[emb]
    assert torch.equal(p.detach()[emb], want)
    assert emb.sum() == 10 and not emb[0]


def test_instant_model_far_from_the_true_loss_turns_embedding_off(tmp_path, monkeypatch):
    from lictrain.methods.cmd import CMDLIC

    true_instant = CMDLIC.instant_loss
    # the instant CMD model made 20% worse than it is, against a 10% tolerance
    monkeypatch.setattr(CMDLIC, "instant_loss", lambda self, *a: 1.2 * true_instant(self, *a) + 1.0)
    opts = CMD_FAST.replace("max_instant_gap: 100", "max_instant_gap: 0.1")
    train(tiny_config(tmp_path, "train.steps=12", "optim.name=adam+sma", "method.name=cmd-lic", opts,
                      "train.val_every=12", "train.log_every=1"))
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    dec = [r for r in rows if "cmd_instant_loss" in r]
    assert len(dec) == 1
    r = dec[0]
    assert r["cmd_instant_loss"] > 1.1 * r["cmd_true_loss"] and r["cmd_embedding_off"] == 1.0
    ck = load_checkpoint(tmp_path / "run")
    assert ck["method"]["embedding_off"] and not ck["method"]["decomposed"]
    assert max(r.get("embedded_fraction", 0) for r in rows) == 0


CMD_BUDGET = ('method.options={modes: [3, 6], samples_per_mode: 50, sensitivity_images: 4, max_instant_gap: 100}')


def test_budget_schedule_through_training_and_an_exact_resume(tmp_path):
    """The default schedule in a real run of 90 steps: decomposition at step 26 (20/70 of 90), embedding events up
    to step 81 (0.9 x 90) and none after; a resume inside the head stage and one after it are bit-exact."""
    from lictrain.methods.cmd import budget_schedule

    budget = CMD_BUDGET.replace("{", "{budget_steps: 90, ")  # the split runs' first parts stop early
    common = ("optim.name=adam+sma", "method.name=cmd-lic", budget, "train.val_every=10", "train.log_every=1",
              "train.ckpt_every=10")
    # (log_every 4 in a second run below: events between log steps must still reach the log)
    train(tiny_config(tmp_path, "train.steps=90", *common, name="straight"))
    rows = [json.loads(ln) for ln in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    events = budget_schedule(90, 20 / 70, 20, 50, 0.9, 20)
    decomposed_at = [r["step"] for r in train_rows if "cmd_modes" in r]
    embed_steps = sorted({e.step for e in events if e.kind == "embed"})
    embedded_at = [r["step"] for r in train_rows if r.get("embedded_now", 0) > 0]
    assert decomposed_at == [26]  # logged at the step whose completion made it 26 steps
    assert embedded_at == embed_steps[: len(embedded_at)] and embedded_at[-1] <= 81 and len(embedded_at) >= 10
    frac = [r["embedded_fraction"] for r in train_rows]
    assert frac[-1] == frac[81 - 1] > 0  # nothing embedded in the last 10%
    sparse = tuple(c if not c.startswith("train.log_every") else "train.log_every=4" for c in common)
    train(tiny_config(tmp_path, "train.steps=90", *sparse, name="sparse"))
    rows = [json.loads(ln) for ln in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "cmd_modes" in r] == [28]  # decomposed at 26, written with step 28's line
    for stop in (10, 40):  # inside the head stage, and after the decomposition
        train(tiny_config(tmp_path, f"train.steps={stop}", *common, name=f"split{stop}"))
        train(tiny_config(tmp_path, "train.steps=90", *common, name=f"split{stop}"), resume=True)
        a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / f"split{stop}")
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (stop, k)
        assert torch.equal(a["method"]["embedded"], b["method"]["embedded"])


def test_too_short_a_budget_is_a_clear_error(tmp_path):
    from lictrain.errors import LictrainError

    with pytest.raises(LictrainError, match="too few for its schedule"):
        train(tiny_config(tmp_path, "train.steps=40", "optim.name=adam+sma", "method.name=cmd-lic", CMD_BUDGET))
