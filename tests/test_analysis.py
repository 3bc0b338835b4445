"""Analyses: Eq. 8 statistics by hand, cosines against numpy, the conflict probe against the updates the optimizer
really applies (and leaving training untouched), deviation maps against a by-hand forward pass, the commands."""

import json

import numpy as np
import pytest
import torch

from lictrain.probes.conflicts import ConflictProbe, preview_update
from lictrain.probes.outliers import deviation_map, image_features
from lictrain.probes.stats import channels_last_matrix, cosine, kurtosis, max_median
from lictrain.checkpoint import load_checkpoint, model_from_checkpoint
from lictrain.cli import main
from lictrain.errors import LictrainError
from lictrain.optim import build_optimizer
from lictrain.trainer import train
from tests.conftest import tiny_config


def test_kurtosis_and_maxmed_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # s^2 = (5, 10) -> rescaled by m2 = 7.5 to (2/3, 4/3): Kurt = ((4/9 + 16/9) / 2) / 1^2 = 10/9
    assert kurtosis(x) == pytest.approx(10 / 9, abs=1e-12)
    # rows / sqrt(7.5): max/median = 2/1.5 and 4/3.5 (median of two = their mean)
    assert max_median(x) == pytest.approx((4 / 3 + 8 / 7) / 2, abs=1e-12)
    # one outlier channel: s^2 = (1, 1, 1, 100): Kurt = mean(1, 1, 1, 10^4) / (103/4)^2
    y = torch.ones(10, 4)
    y[:, 3] = 10
    assert kurtosis(y) == pytest.approx((10003 / 4) / (103 / 4) ** 2, abs=1e-12)
    assert max_median(y) == pytest.approx(10.0)
    assert kurtosis(torch.ones(7, 5)) == pytest.approx(1.0) and max_median(torch.ones(7, 5)) == pytest.approx(1.0)
    # scale invariance: the rescaling to unit second moment changes nothing
    z = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert kurtosis(37 * z) == pytest.approx(kurtosis(z)) and max_median(37 * z) == pytest.approx(max_median(z))
    # feature maps become positions x channels
    fm = torch.arange(24.0).reshape(1, 2, 3, 4)
    m = channels_last_matrix(fm)
    assert m.shape == (12, 2) and m[5, 1].item() == fm[0, 1, 1, 1].item()


def test_cosine_against_numpy():
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert cosine(torch.tensor([1.0, 2, 3]), torch.tensor([-2.0, -4, -6])) == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    a, b = [rng.normal(size=s) for s in (7, (3, 4))], [rng.normal(size=s) for s in (7, (3, 4))]
    fa, fb = np.concatenate([t.ravel() for t in a]), np.concatenate([t.ravel() for t in b])
    want = fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb)
    assert cosine([torch.tensor(t) for t in a], [torch.tensor(t) for t in b]) == pytest.approx(want, abs=1e-12)


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))]


def test_sgd_p_r_plus_p_d_is_the_total_update():
    params = _params()
    opt = torch.optim.SGD(params, lr=0.1)
    g_r = [torch.randn_like(p) for p in params]
    g_d = [torch.randn_like(p) for p in params]
    p, (p_r, p_d) = preview_update(opt, [a + b for a, b in zip(g_r, g_d)], parts=[g_r, g_d])
    for a, b, c in zip(p_r, p_d, p):
        torch.testing.assert_close(a + b, c)
    torch.testing.assert_close(p_r[0], -0.1 * g_r[0])  # the gradient itself, scaled by -lr


@pytest.mark.parametrize("name", ["adam", "soap"])
def test_shares_are_linear_and_add_up_to_the_update_without_momentum(name):
    """beta1 = 0 (no momentum share): p_R + p_D must be p (one preconditioner, linear in the part). Checked after
    a few steps: from a fresh state the second moment is the step's own g^2, and where g_R and g_D cancel the
    shares are huge and opposite (their sum is still p, but only to float precision relative to them)."""
    params = _params()
    opt = build_optimizer(name, params, 1e-2, {"betas": (0.0, 0.95)} | ({"precondition_frequency": 2}
                                                                       if name == "soap" else {}))
    for step in range(6):
        g_r = [torch.randn_like(p) for p in params]
        g_d = [torch.randn_like(p) for p in params]
        g = [a + b for a, b in zip(g_r, g_d)]
        if step >= 3:
            p, (p_r, p_d) = preview_update(opt, g, parts=[g_r, g_d])
            for a, b, c in zip(p_r, p_d, p):
                assert float((a + b - c).norm()) <= 1e-5 * float(c.norm())
            two_r = preview_update(opt, g, parts=[[2 * x for x in g_r]])[1][0]
            for a, b in zip(two_r, p_r):
                torch.testing.assert_close(a, 2 * b)
        for q, gg in zip(params, g):
            q.grad = gg
        opt.step()


@pytest.mark.parametrize("name", ["adam", "soap", "sgd"])
def test_preview_equals_the_step_actually_taken(name):
    params = _params()
    opt = build_optimizer(name, params, 1e-2, {"precondition_frequency": 2} if name == "soap" else {})
    for step in range(4):  # from fresh state, then with moments and (for SOAP) a refreshed basis
        grads = [torch.randn_like(p) for p in params]
        want = preview_update(opt, grads)
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, b, w in zip(params, before, want):
            torch.testing.assert_close(p.detach() - b, w, rtol=1e-5, atol=5e-7)  # p - b: ulp of p


class _CheckApplied(ConflictProbe):
    """The probe's p against the parameter change the loop then applies (clipping included)."""

    def before_backward(self, ctx):
        self.want = self.vectors(ctx)[2]
        self.before = [p.detach().clone() for p in self.run.params]
        return {}

    def after_step(self, ctx):
        # p - b rounds to the ulp of p, and autograd.grad and the loop's backward may sum in another order (which
        # Adam's normalisation amplifies on near-zero gradients): compare whole tensors in norm
        for p, b, w in zip(self.run.params, self.before, self.want):
            assert float((p.detach() - b - w).norm()) <= 1e-4 * float(w.norm()) + 1e-6 * float(b.norm())
        self.checked = getattr(self, "checked", 0) + 1


@pytest.mark.parametrize("optimizer", ["adam", "soap"])
def test_probe_p_is_the_update_the_loop_applies(tmp_path, optimizer):
    probe = _CheckApplied(every=1, clip_max_norm=0.5)
    train(tiny_config(tmp_path, "train.steps=4", f"optim.name={optimizer}", "train.clip_max_norm=0.5"), hooks=(probe,))
    assert probe.checked == 4


@pytest.mark.parametrize("optimizer", ["adam", "soap"])
def test_probes_leave_training_bit_identical_and_log(tmp_path, optimizer):
    common = ("train.steps=6", f"optim.name={optimizer}", "train.val_every=3")
    train(tiny_config(tmp_path, *common, name="plain"))
    train(tiny_config(tmp_path, *common, "probe.conflicts_every=2", "probe.outliers_every=3",
                      "probe.conflicts_per_layer=true", name="probed"))
    a, b = load_checkpoint(tmp_path / "plain"), load_checkpoint(tmp_path / "probed")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = [json.loads(ln) for ln in (tmp_path / "probed" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows if r["kind"] == "probe"]
    intra = [r["step"] for r in probes if "intra_cos" in r]
    inter = [r["step"] for r in probes if "inter_cos" in r]
    kurt = [r["step"] for r in probes if "latent_kurt" in r]
    assert intra == [1, 3, 5] and inter == [3, 5] and kurt == [3, 6]  # steps 0, 2, 4 probed (step 0 has no p_-1)
    assert all(-1 <= r["intra_cos"] <= 1 for r in probes if "intra_cos" in r)
    assert any(k.startswith("intra/g_a.0") for k in probes[0])
    assert all(r["latent_kurt"] >= 1 for r in probes if "latent_kurt" in r)


def test_deviation_map_and_features_match_a_by_hand_forward_pass(tmp_path):
    train(tiny_config(tmp_path, "train.steps=2"))
    model = model_from_checkpoint(load_checkpoint(tmp_path / "run"))
    model.update(force=True)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    f = image_features(model, x, 64, "g_a.3")
    with torch.no_grad():  # mbt2018-mean by hand: y, z, z_hat around the medians, (scales, means), y_hat
        y = model.g_a(x)
        act = model.g_a[:4](x)
        z = model.h_a(y)
        z_hat = model.entropy_bottleneck.quantize(z, "dequantize", model.entropy_bottleneck._get_medians())
        _, means = model.h_s(z_hat).chunk(2, 1)
        y_hat = torch.round(y - means) + means
    torch.testing.assert_close(f["y"], y)
    torch.testing.assert_close(f["y_hat"], y_hat)
    torch.testing.assert_close(f["act"], act)
    eps = deviation_map(y, y_hat)
    want = (y_hat - y).abs().sum(1)[0].double() / y.abs().sum().double()
    torch.testing.assert_close(eps, want)
    assert eps.shape == y.shape[-2:] and float(eps.max()) > 0


def test_analyze_commands_end_to_end(tmp_path, capsys):
    train(tiny_config(tmp_path, "train.steps=3", name="src"))
    out = tmp_path / "conf"
    code = main(["analyze", "conflicts", str(tmp_path / "src"), "--optimizers", "sgd,adam", "--steps", "3",
                 "--out", str(out), "--set", "data.val_max_images=1"])
    assert code == 0
    data = json.loads((out / "conflicts.json").read_text())
    assert len(data["series"]["adam"]["intra"]) == 3 and len(data["series"]["adam"]["inter"]) == 2
    assert (out / "conflicts.png").stat().st_size > 0 and "intra-step" in (out / "conflicts.md").read_text()
    intra = data["series"]["adam"]["intra"]  # the first probed step (fresh optimizer state) apart from the means
    assert data["summary"]["adam"]["intra_first"] == intra[0]
    assert data["summary"]["adam"]["intra_mean"] == pytest.approx(np.mean(intra[1:]), rel=1e-12)
    train(tiny_config(tmp_path, "train.steps=0", name="init"))  # a second, different model: the initial weights
    code = main(["analyze", "outliers", str(tmp_path / "src"), str(tmp_path / "init" / "checkpoint.pt"),
                 "--names", "a,b", "--max-images", "2", "--maps", "1", "--out", str(tmp_path / "out")])
    assert code == 0
    rows = json.loads((tmp_path / "out" / "outliers.json").read_text())
    assert [r["name"] for r in rows] == ["a", "b"] and rows[0]["latent_kurt"] != rows[1]["latent_kurt"]
    # each row against Eq. 8 written out in numpy on the checkpoint's EMA latent of the first two sample photos
    from lictrain.data import EvalImages, pad_to_multiple

    images = EvalImages("samples:val", None, 2)
    for row, ckpt in zip(rows, (tmp_path / "src", tmp_path / "init")):
        model = model_from_checkpoint(load_checkpoint(ckpt)).eval()
        kurts = []
        for i in range(2):
            with torch.no_grad():
                y = model.g_a(pad_to_multiple(images[i].unsqueeze(0), 64))[0].double().numpy()
            s2 = (y.reshape(y.shape[0], -1) ** 2).mean(1)  # per-channel mean square (scale cancels in the ratio)
            kurts.append((s2 ** 2).mean() / s2.mean() ** 2)
        assert row["latent_kurt"] == pytest.approx(np.mean(kurts), rel=1e-9)
    assert (tmp_path / "out" / "deviation_0.png").exists()
    assert main(["analyze", "outliers", str(tmp_path / "src"), "--layer", "g_a.99", "--out", str(tmp_path / "x")]) == 2
    assert "no module 'g_a.99'" in capsys.readouterr().err
    assert main(["analyze", "plot", str(tmp_path / "src"), "--out", str(tmp_path / "p.png")]) == 2
    (run,) = out.glob("src-adam-*")
    assert main(["analyze", "plot", str(run), "--metrics", "intra_cos,inter_cos",
                 "--out", str(tmp_path / "p.png")]) == 0
    capsys.readouterr()
    # an --out without a suffix: the file matplotlib writes (.png added) is the one named; a run without probe
    # lines is named as left out
    assert main(["analyze", "plot", str(run), str(tmp_path / "src"), "--metrics", "intra_cos,inter_cos",
                 "--out", str(tmp_path / "q")]) == 0
    captured = capsys.readouterr()
    assert f"wrote {tmp_path / 'q.png'}" in captured.out and (tmp_path / "q.png").exists()
    assert "has no probe lines with intra_cos, inter_cos: left out" in captured.err


def test_the_conflict_means_leave_the_fresh_first_step_apart():
    """By hand: a first step at -0.87 and then +-0.01 gives a mean of 0 (not -0.29) and a first step of -0.87."""
    from lictrain.analysis.commands import conflict_summary

    m = conflict_summary({"intra": [-0.87, 0.01, -0.01, 0.0], "inter": [0.5, 0.2, 0.4]})
    assert m["intra_first"] == -0.87 and m["intra_mean"] == pytest.approx(0.0, abs=1e-12)
    assert m["intra_std"] == pytest.approx(np.std([0.01, -0.01, 0.0]))
    assert m["inter_first"] == 0.5 and m["inter_mean"] == pytest.approx(0.3)


def test_unsupported_optimizer_is_a_clear_error():
    params = _params()
    with pytest.raises(LictrainError, match="supports the optimizers"):
        preview_update(torch.optim.Adagrad(params), [torch.zeros_like(p) for p in params])
