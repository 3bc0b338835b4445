import json
import math
from pathlib import Path

import pytest
import torch

from lictrain.checkpoint import load_checkpoint
from lictrain.comparison.compare import compare, plan_runs
from lictrain.errors import LictrainError
from lictrain.models import build_model
from tests.conftest import tiny_config


def compare_config(tmp_path, *extra):
    return tiny_config(tmp_path, "train.steps=6", "train.val_every=3", "data.batch_size=2", "data.val_crop=64",
                       "data.val_max_images=1", "compare.recipes=[adam, soap]", "compare.lambdas=[0.0067, 0.013]",
                       "compare.eval_data=[samples:val]", "compare.eval_max_images=1", *extra)


def test_recipes_share_initial_weights_and_data_and_differ_only_in_their_overrides(tmp_path):
    runs = plan_runs(compare_config(tmp_path), tmp_path / "cmp")
    assert [(r.recipe, r.lmbda) for r in runs] == [("adam", 0.0067), ("soap", 0.0067), ("adam", 0.013), ("soap", 0.013)]
    a, s = runs[0].cfg.to_dict(), runs[1].cfg.to_dict()
    diff = {k for k in a if a[k] != s[k]}
    assert diff == {"optim", "run_dir"} and a["optim"]["name"] == "adam" and s["optim"]["name"] == "soap"
    assert runs[0].cfg.seed == runs[1].cfg.seed
    with pytest.raises(LictrainError, match="unknown recipe 'lion'"):
        plan_runs(compare_config(tmp_path, "compare.recipes=[adam, lion]"), tmp_path / "cmp")


def test_compare_runs_summarises_reuses_and_plots(tmp_path, monkeypatch):
    import matplotlib.figure

    texts = {}  # each figure's titles and annotations, as saved
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        texts[Path(path).name] = [t.get_text() for ax in fig.axes for t in (
            ax.title, *ax.texts, *(ax.get_legend().get_texts() if ax.get_legend() else []))]
        return real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    cfg = compare_config(tmp_path)
    summary = compare(cfg, tmp_path / "cmp")
    # the R-D plot names each point's lambda and how many images its points average
    assert "R-D on samples-val (1 image)" in texts["rd_samples-val.png"]
    # JPEG, measured on the same image, beside the recipes (compare.codecs' default), and in the BD-rate table
    assert "JPEG (measured)" in texts["rd_samples-val.png"]
    assert summary["field"]["bd_rate"]["samples:val"]["JPEG (measured)"] == {"adam": "unavailable (<4 λ)",
                                                                             "soap": "unavailable (<4 λ)"}
    lambdas = sorted({p["lmbda"] for p in summary["rd_points"]})
    assert sorted(t for t in texts["rd_samples-val.png"] if t.startswith("λ")) == sorted(
        f"λ {lmbda:g}" for lmbda in lambdas for _ in ("adam", "soap"))
    out = tmp_path / "cmp"
    # the same initial weights and the same first batch: the step-0 validation is identical across recipes
    curves = {}
    for d in (out / "runs").iterdir():
        first = json.loads((d / "metrics.jsonl").read_text().splitlines()[0])
        curves.setdefault(d.name.split("-lmbda")[1].split("-seed")[0], []).append(first["loss"])
    assert all(len(set(v)) == 1 for v in curves.values()) and len(curves) == 2
    torch.manual_seed(0)
    init = build_model("mbt2018-mean", "tiny").state_dict()
    for d in (out / "runs").iterdir():  # both recipes moved away from the same start
        assert not torch.equal(load_checkpoint(d)["model"]["g_a.0.weight"], init["g_a.0.weight"])
    rows = {r["recipe"]: r for r in summary["rows"]}
    assert rows["adam"]["steps_to_anchor"]["mean"] == pytest.approx(1.0)
    # SOAP's ratios against a direct reading of the two validation logs: target = min over steps > 0 of the median
    # of three neighbours of Adam's curve; ratio = first SOAP step at or below it / first Adam step at or below it
    for p in rows["soap"]["points"]:
        logs = {}
        for name in ("adam", "soap"):
            (d,) = (out / "runs").glob(f"{name}-lmbda{p['lmbda']:g}-*")
            logs[name] = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
            logs[name] = [(r["step"], r["loss"]) for r in logs[name] if r["kind"] == "val"]
        a = [loss for step, loss in logs["adam"] if step > 0]
        windows = [sorted(a[max(0, i - 1): i + 2]) for i in range(len(a))]
        target = min(w[1] if len(w) == 3 else sum(w) / len(w) for w in windows)
        reach = {n: next((s for s, loss in logs[n] if loss <= target), None) for n in logs}
        expected = None if reach["soap"] is None else reach["soap"] / reach["adam"]
        assert p["target"] == pytest.approx(target)
        assert p["steps_to_anchor"] == (pytest.approx(expected) if expected is not None else None)
    assert rows["adam"]["bd_rate"]["samples:val"] is None  # 2 lambdas < 4: unavailable, not extrapolated
    md = (out / "summary.md").read_text()
    assert "| adam | 1.00 | 1.00 |" in md and "unavailable (<4 λ)" in md
    assert "| recipe | vs JPEG (measured) |" in md
    # the R-D points behind the BD-rates, each the run's own evaluation (results.json in its eval folder)
    assert "Real bitstreams on samples-val (bpp / PSNR-RGB (dB)):" in md
    for p in summary["rd_points"]:
        (d,) = (out / "runs").glob(f"{p['recipe']}-lmbda{p['lmbda']:g}-seed{p['seed']}-*")
        (res,) = d.glob("eval*/results.json")
        r = json.loads(res.read_text())["results"]
        assert (p["bpp"], p["quality"]) == (r["bpp"][0], r["psnr-rgb"][0])
        assert f"{p['bpp']:.4f} / {p['quality']:.3f}" in md
    assert len(summary["rd_points"]) == 4
    for png in ("loss_vs_steps.png", "loss_vs_time.png", "rd_samples-val.png", "rd_samples-val_ms-ssim.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "summary.json").read_text())["anchor"] == "adam"
    # every row says whether its run finished learning (plateau, 6 steps: no LR cut, so "not converged"), and the
    # summary names what each data set did: validation and test are both samples:val here, and it says so
    assert all(p["finish"].startswith("not converged (0 LR cuts") for r in summary["rows"] for p in r["points"])
    assert "| not converged (0 LR cuts" in md
    assert summary["data"]["shared_images"]["validation&test"] == 1  # one image each, the same one
    assert "Images shared between roles: validation and test: 1" in md

    # a second compare trains and evaluates nothing again
    import lictrain.comparison.compare as cmp_mod

    def fail(*a, **k):
        raise AssertionError("should have been reused")

    monkeypatch.setattr(cmp_mod, "train", fail)
    monkeypatch.setattr(cmp_mod, "evaluate", fail)
    again = compare(cfg, out)
    assert again["rows"] == summary["rows"]


def test_evaluation_sets_are_named_by_the_folder_in_use(tmp_path):
    from lictrain.comparison.compare import set_name

    assert set_name("../shared/data/kodak/") == "kodak"
    assert set_name("../shared/data/kodak[val:6]") == "kodak-val-6"  # it names files and folders: no brackets
    assert set_name(f"{tmp_path / 'nope'} || samples:val") == "samples-val"
    assert set_name(f"{tmp_path} || samples:val") == tmp_path.name


def test_a_run_with_the_same_configuration_under_another_name_is_reused(tmp_path):
    cfg = compare_config(tmp_path, "compare.recipe_sets={fast: {optim.name: adam}}", "compare.recipes=[fast]")
    first = plan_runs(cfg, tmp_path / "cmp")
    (first[0].run_dir).mkdir(parents=True)
    again = plan_runs(compare_config(tmp_path, "compare.recipes=[adam]"), tmp_path / "cmp")
    assert again[0].run_dir == first[0].run_dir and again[0].recipe == "adam"


def test_an_interrupted_run_stops_the_compare_before_evaluation(tmp_path, monkeypatch):
    import lictrain.comparison.compare as cmp_mod
    from lictrain.trainer import RunResult

    def interrupted(cfg, resume=False, hooks=()):
        return RunResult(cfg.run_dir, 2, 0.1, 0, 0, {})

    monkeypatch.setattr(cmp_mod, "train", interrupted)
    monkeypatch.setattr(cmp_mod, "evaluate", lambda *a, **k: pytest.fail("evaluated a half-trained run"))
    with pytest.raises(LictrainError, match="interrupted .* at step 2; run the same command again"):
        compare(compare_config(tmp_path), tmp_path / "cmp")


def test_a_resumed_run_is_announced_once(tmp_path, monkeypatch, caplog):
    """The trainer says "resuming RUN at step N"; compare used to say it too, in other words."""
    import lictrain.comparison.compare as cmp_mod
    from lictrain.trainer import RunResult

    def resumed(cfg, resume=False, hooks=()):
        assert resume
        cmp_mod.log.info("resuming %s at step %d", cfg.run_dir, 1)  # what the trainer reports
        return RunResult(cfg.run_dir, 2, 0.1, 0, 0, {})

    cfg = compare_config(tmp_path)
    run = plan_runs(cfg, tmp_path / "cmp")[0]
    monkeypatch.setattr(cmp_mod, "train", resumed)
    monkeypatch.setattr(cmp_mod, "load_checkpoint", lambda path: {"state": {"step": 1}})
    monkeypatch.setattr(cmp_mod.Path, "exists", lambda self: True)
    run.cfg.train.steps = 2
    with caplog.at_level("INFO", logger="lictrain"):
        cmp_mod.train_or_reuse(run)
    assert sum("resuming" in r.getMessage() for r in caplog.records) == 1


def test_a_run_timed_on_a_busy_machine_is_flagged():
    """Time-to-X depends on every interval's wall-clock time: a run whose slowest validation interval took more
    than twice its median seconds per step is named under the table (hand-made curves: 1 s per step, one interval
    at 3 s per step; a quiet run varies by 10%)."""
    from lictrain.comparison.compare import summary_markdown
    from lictrain.comparison.figures import CurvePoint, time_spread

    def curve(rates):
        points, t = [CurvePoint(0, 0.0, 9.0)], 0.0
        for i, rate in enumerate(rates, 1):
            t += 100 * rate
            points.append(CurvePoint(100 * i, t, 1.0))
        return points

    assert time_spread(curve([1.0, 1.0, 3.0, 1.0, 1.0])) == pytest.approx(3.0)
    assert time_spread(curve([1.0, 1.1, 0.9, 1.0])) == pytest.approx(1.1)
    assert time_spread(curve([1.0, 5.0])) is None  # too few intervals to tell
    point = {"lmbda": 0.0067, "seed": 0, "steps_to_anchor": 1.0, "time_to_anchor": 1.0, "final_gap": None,
             "target": 1.0, "final_val_loss": 1.0, "finish": "annealed"}
    rows = [{"recipe": "adam", "points": [dict(point, time_spread=1.1)], "steps_to_anchor": None,
             "steps_to_anchor_reached": "1/1", "time_to_anchor": None, "time_to_anchor_reached": "1/1",
             "bd_rate": {}, "bd_rate_average": None},
            {"recipe": "soap", "points": [dict(point, time_spread=3.0)], "steps_to_anchor": None,
             "steps_to_anchor_reached": "1/1", "time_to_anchor": None, "time_to_anchor_reached": "1/1",
             "bd_rate": {}, "bd_rate_average": None}]
    md = summary_markdown({"anchor": "adam", "lambdas": [0.0067], "seeds": [0], "bd_method": "akima", "eval_sets": [],
                           "rows": rows})
    flagged = [ln for ln in md.splitlines() if ln.startswith("Timing:")]
    assert len(flagged) == 1 and "soap λ 0.0067 seed 0 (3.0x)" in flagged[0] and "adam" not in flagged[0].split(":")[1]


def test_noise_floor_is_each_recipe_against_itself_over_every_pair_of_seeds():
    """BD-rate between the seeds of one recipe: a curve whose every rate is 0.9x the other's at the same PSNR is -10%
    by definition, the reverse 1/0.9 - 1 = +11.1%, an identical curve 0; rms and sigma = rms / sqrt(2) by hand, and
    the standard error of a 3-seed mean difference sqrt((sigma_a^2 + sigma_b^2) / 3) in the summary's text."""
    from lictrain.comparison.compare import noise_floor, summary_markdown

    bpp, psnr = [0.2, 0.35, 0.6, 1.0], [26.0, 27.5, 29.0, 30.5]
    seed0 = [(i, b, p) for i, (b, p) in enumerate(zip(bpp, psnr))]
    scaled = [(i, 0.9 * b, p) for i, b, p in seed0]
    points = {("adam", 0, "k"): seed0, ("adam", 1, "k"): scaled, ("adam", 2, "k"): list(seed0),
              ("soap", 0, "k"): seed0, ("soap", 1, "k"): list(seed0), ("soap", 2, "k"): list(seed0)}
    floor = noise_floor(points, ["adam", "soap"], [0, 1, 2], ["k"], "akima")
    adam = floor["k"]["adam"]
    assert adam["pairs"]["1 vs 0"] == pytest.approx(-10.0, abs=1e-6)
    assert adam["pairs"]["2 vs 0"] == pytest.approx(0.0, abs=1e-9)
    assert adam["pairs"]["2 vs 1"] == pytest.approx(100 / 9, abs=1e-6)
    rms = math.sqrt((10.0 ** 2 + (100 / 9) ** 2) / 3)
    assert adam["rms"] == pytest.approx(rms, rel=1e-6) and adam["sigma"] == pytest.approx(rms / math.sqrt(2), rel=1e-6)
    assert floor["k"]["soap"]["sigma"] == pytest.approx(0.0, abs=1e-9)
    assert noise_floor(points, ["adam"], [0], ["k"], "akima") == {"k": {}}

    rows = [{"recipe": r, "points": [], "steps_to_anchor": None, "steps_to_anchor_reached": "0/0",
             "time_to_anchor": None, "time_to_anchor_reached": "0/0", "bd_rate": {"k": bd}, "bd_rate_average": bd}
            for r, bd in (("adam", 0.0), ("soap", -9.0))]
    md = summary_markdown({"anchor": "adam", "lambdas": [], "seeds": [0, 1, 2], "bd_method": "akima",
                           "eval_sets": ["k"], "rows": rows, "noise_floor": floor})
    se = math.sqrt((rms ** 2 / 2 + 0.0) / 3)
    line = next(ln for ln in md.splitlines() if ln.startswith("- soap against adam"))
    assert f"≈ {se:.2f}%" in line and f"({9.0 / se:.1f} standard errors)" in line
    assert "- adam: 1 vs 0 -10.00%, 2 vs 0 +0.00%, 2 vs 1 +11.11%" in md


def test_init_source_fills_lambda_and_seed_and_needs_exactly_one_match(tmp_path):
    from lictrain.comparison.compare import init_source
    from lictrain.errors import LictrainError

    for run in ("adam-lmbda0.0018-seed0-1a2b3c4d", "adam-lmbda0.0035-seed0-5e6f7a8b", "adam-lmbda0.0035-seed0-99999999"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "runs" / "adam-lmbda0.0018-seed1-unfinished").mkdir()  # no checkpoint: not a source
    pattern = str(tmp_path / "runs" / "adam-lmbda{lmbda}-seed{seed}-*")
    assert init_source(pattern, 0.0018, 0) == str(tmp_path / "runs" / "adam-lmbda0.0018-seed0-1a2b3c4d")
    with pytest.raises(LictrainError, match="gives 2 checkpoints for lambda 0.0035"):
        init_source(pattern, 0.0035, 0)
    with pytest.raises(LictrainError, match="gives 0 checkpoints"):
        init_source(pattern, 0.0018, 1)  # the folder exists but holds no checkpoint
    assert init_source("plain/path", 0.1, 0) == "plain/path" and init_source(None, 0.1, 0) is None
    with pytest.raises(LictrainError, match=r"only \{lmbda\} and \{seed\}"):
        init_source("runs/{recipe}-lmbda{lmbda}", 0.1, 0)


def test_a_target_not_reached_names_its_largest_relative_gap_and_lambda():
    from lictrain.comparison.compare import _cell_ratio

    row = {"steps_to_anchor": None, "steps_to_anchor_reached": "1/3",
           "points": [{"final_gap": 0.5, "target": 10.0, "lmbda": 0.013},  # +5%: the larger absolute gap
                      {"final_gap": 0.3, "target": 2.0, "lmbda": 0.0018},  # +15%
                      {"final_gap": None, "target": 1.0, "lmbda": 0.025}]}
    assert _cell_ratio(row, "steps_to_anchor") == "not reached (1/3; largest gap +15.0% at λ 0.0018)"


def test_a_recipe_on_its_own_lambda_grid_is_planned_there_and_checked(tmp_path, capsys):
    """compare.lambdas_for (--lambdas-for) gives a recipe its own lambdas: its runs are there, the anchor's at
    compare.lambdas; the anchor cannot have one, and a recipe not compared is named."""
    from lictrain.cli import main

    runs = plan_runs(compare_config(tmp_path, "compare.lambdas_for={soap: [0.002, 0.03]}"), tmp_path / "cmp")
    assert [(r.recipe, r.lmbda) for r in runs] == [("soap", 0.002), ("adam", 0.0067), ("adam", 0.013), ("soap", 0.03)]
    assert [r.cfg.loss.lmbda for r in runs] == [0.002, 0.0067, 0.013, 0.03]
    with pytest.raises(LictrainError, match="cannot give the anchor"):
        compare_config(tmp_path, "compare.lambdas_for={adam: [0.002]}")
    with pytest.raises(LictrainError, match="names recipes not in compare.recipes: lion"):
        compare_config(tmp_path, "compare.lambdas_for={lion: [0.002]}")
    assert main(["compare", "--config", "bench", "--lambdas-for", "soap:0.1", "--out", str(tmp_path / "x")]) != 0
    assert "--lambdas-for takes RECIPE=L1,L2,..., got 'soap:0.1'" in capsys.readouterr().err


def test_parallel_compare_plans_the_runs_the_full_compare_plans_with_own_grids(tmp_path):
    """benchmarks/parallel_compare.py runs each (recipe, lambda, seed) as its own compare and then summarises with the
    full one: with a recipe on its own grid (--lambdas-for), its jobs are exactly the full compare's runs (checked
    against plan_runs, which the summary uses), each job's run folder is the one the full compare reuses, and the jobs
    go seed by seed (a deadline leaves whole curves)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "parallel_compare", Path(__file__).resolve().parents[1] / "benchmarks" / "parallel_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    jobs = module.plan_jobs(["adam", "soap"], ["0.0067", "0.013"], ["0", "1"], {"soap": ["0.002", "0.03"]})
    assert jobs[:4] == [("soap", "0.002", "0"), ("adam", "0.0067", "0"), ("adam", "0.013", "0"), ("soap", "0.03", "0")]
    full = plan_runs(compare_config(tmp_path, "compare.lambdas_for={soap: [0.002, 0.03]}", "compare.seeds=[0, 1]"),
                     tmp_path / "cmp")
    by_key = {(r.recipe, r.lmbda, r.cfg.seed): r.run_dir for r in full}
    assert sorted((r, float(lm), int(s)) for r, lm, s in jobs) == sorted(by_key)
    for r, lm, s in jobs:  # the job's own command: one recipe, one lambda, one seed, no per-recipe grid
        [run] = plan_runs(compare_config(tmp_path, f"compare.recipes=[{r}]", f"compare.lambdas=[{lm}]",
                                         f"compare.seeds=[{s}]", "compare.lambdas_for={}"), tmp_path / "cmp")
        assert run.run_dir == by_key[(r, float(lm), int(s))]


def _fake_run(tmp_path, recipe, lmbda, seed, losses, lrs=None, seconds_per_step=1.0):
    """A finished run folder as summarize reads it: validation records every 100 steps."""
    from lictrain.comparison.compare import Run

    schedule = "plateau" if lrs else "cosine"
    cfg = compare_config(tmp_path, f"run_dir={tmp_path / f'{recipe}-{lmbda}-{seed}'}", f"train.schedule={schedule}",
                         "optim.lr=0.001")
    cfg.loss.lmbda, cfg.seed = lmbda, seed
    Path(cfg.run_dir).mkdir(parents=True)
    lrs = lrs or [1e-3] * len(losses)
    lines = [json.dumps({"kind": "val", "step": 100 * i, "train_time": 100.0 * i * seconds_per_step, "loss": loss,
                         "lr": lr}) for i, (loss, lr) in enumerate(zip(losses, lrs))]
    (Path(cfg.run_dir) / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return Run(recipe, lmbda, seed, cfg)


def test_bd_rate_over_the_overlap_is_named_for_a_recipe_on_its_own_grid(tmp_path):
    """Curves with log(bpp) linear in PSNR (every interpolation exact): the test recipe spends 0.9x the anchor's
    rate at every PSNR, on its own lambdas, over 27.5-32 dB where the anchor spans 26-30.5: BD-rate -10% over the
    overlap 27.5-30.5 dB, both stated; Steps-to-anchor has no anchor loss at its lambdas and says so."""
    from lictrain.comparison.compare import summarize, summary_markdown

    rate = lambda psnr: 0.1 * 2.718281828459045 ** (0.5 * (psnr - 26))  # noqa: E731
    a_q, t_q = [26.0, 27.5, 29.0, 30.5], [27.5, 29.0, 30.5, 32.0]
    a_l, t_l = [0.002, 0.004, 0.008, 0.016], [0.003, 0.006, 0.012, 0.024]
    runs = [_fake_run(tmp_path, "adam", l, 0, [5.0, 2.0, 1.0]) for l in a_l]
    runs += [_fake_run(tmp_path, "balanced-rd", l, 0, [5.0, 3.0, 2.0]) for l in t_l]
    points = {("adam", 0, "k"): [(l, rate(q), q) for l, q in zip(a_l, a_q)],
              ("balanced-rd", 0, "k"): [(l, 0.9 * rate(q), q) for l, q in zip(t_l, t_q)]}
    summary = summarize(runs, points, ["adam", "balanced-rd"], ["k"], "akima")
    row = summary["rows"][1]
    assert row["bd_rate"]["k"] == pytest.approx(-10.0, abs=1e-6)
    assert row["bd_rate_overlap"]["k"] == [27.5, 30.5]
    assert row["own_lambdas"] and row["steps_to_anchor"] is None and all(p["target"] is None for p in row["points"])
    md = summary_markdown(summary)
    assert "| balanced-rd | n/a (own λ grid) | n/a (own λ grid) | -10.00% (over 27.50-30.50 dB) |" in md
    assert "| balanced-rd | 0.003 | 0 | - | 2.0000 | - | - |" in md


def test_steps_and_time_to_convergence_are_relative_to_the_anchor(tmp_path):
    """Plateau runs: the anchor meets the converged rule at step 800, the recipe at step 400 with twice the seconds
    per step: steps 0.50, time 1.00; a recipe that never converges has no ratio and says 0/1."""
    from lictrain.comparison.compare import summarize, summary_markdown

    flat = [10, 6, 4.5, 4.1, 4.02, 4.01, 4.0, 4.0, 4.0, 4.0, 4.0]
    anchor = _fake_run(tmp_path, "adam", 0.01, 0, [10, 8, 6, 5, 4.5, 4.2, 4.1, 4.05, 4.02, 4.01, 4.0],
                       [1e-3] * 5 + [5e-4] * 3 + [2.5e-4] * 3)
    fast = _fake_run(tmp_path, "soap", 0.01, 0, flat, [1e-3, 1e-3, 5e-4, 5e-4] + [2.5e-4] * 7, seconds_per_step=2.0)
    never = _fake_run(tmp_path, "sgd", 0.01, 0, [10 - 0.5 * i for i in range(11)], [1e-3] * 11)
    points = {(r.recipe, 0, "k"): [(0.01, 1.0, 30.0)] for r in (anchor, fast, never)}
    summary = summarize([anchor, fast, never], points, ["adam", "soap", "sgd"], ["k"], "akima")
    rows = {r["recipe"]: r for r in summary["rows"]}
    assert rows["adam"]["points"][0]["converged_at"]["step"] == 800
    assert rows["soap"]["points"][0]["converged_at"]["step"] == 400
    assert rows["soap"]["converge_ratio"]["steps"][0] == pytest.approx(0.5)
    assert rows["soap"]["converge_ratio"]["time"][0] == pytest.approx(1.0)
    assert rows["sgd"]["converge_ratio"] is None
    md = summary_markdown(summary)
    assert "- soap: steps 0.50 ± 0.00, time 1.00 ± 0.00 (1 pairs; its runs converged: 1/1)" in md
    assert "; met at step 800 |" in md


def test_to_anchor_has_no_ratio_when_the_anchor_starts_at_its_target():
    """A chained stage (video-compare) that the anchor does not improve on: its step-0 loss is at or below its own
    target, so there is no ratio to report; the summary says so instead of failing on the missing gap."""
    from lictrain.comparison.figures import CurvePoint, to_anchor

    anchor = [CurvePoint(0, 0.0, 0.9805), CurvePoint(250, 40.0, 0.9880), CurvePoint(500, 80.0, 0.9864)]
    recipe = [CurvePoint(0, 0.0, 0.9824), CurvePoint(250, 41.0, 0.30), CurvePoint(500, 82.0, 0.21)]
    ratio = to_anchor(recipe, anchor)
    assert ratio.steps is None and ratio.time is None
    assert ratio.describe("steps") == "undefined (the anchor starts at its target)"
    # compare's summary says "undefined" there too, not "not reached"
    from lictrain.comparison.compare import _cell_ratio

    row = {"steps_to_anchor": None, "steps_to_anchor_reached": "0/1",
           "points": [{"final_gap": ratio.final_gap, "target": 0.9864, "lmbda": 0.0067, "undefined": ratio.undefined}]}
    assert _cell_ratio(row, "steps_to_anchor") == "undefined (the anchor starts at its target)"
    # an anchor that reaches its target (0.95, the median-smoothed best) after training: the recipe's first step at
    # or below it (250) over the anchor's (500), and the same for time
    anchor = [CurvePoint(0, 0.0, 2.0), CurvePoint(250, 40.0, 1.0), CurvePoint(500, 80.0, 0.9)]
    ratio = to_anchor(recipe, anchor)
    assert ratio.steps == pytest.approx(250 / 500) and ratio.time == pytest.approx(41.0 / 80.0)
    assert ratio.describe("steps") == "0.50"
