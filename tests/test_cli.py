import json
import subprocess
import sys

import pytest

from lictrain.cli import main


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_the_commands():
    p = subprocess.run([sys.executable, "-m", "lictrain", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("train", "eval", "compare", "compress", "decompress", "demo", "list"):
        assert cmd in p.stdout
    for cmd in ("train", "eval", "compress", "decompress", "demo"):
        sub = subprocess.run([sys.executable, "-m", "lictrain", cmd, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and "usage: lictrain " + cmd in sub.stdout


def test_every_command_and_argument_has_help_and_names_its_default():
    """--help of every command says what each argument does, and what it is when left out."""
    import argparse

    from lictrain.cli import build_parser

    def walk(parser, name):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub_name, sub in a.choices.items():
                    assert sub.description, f"{name} {sub_name}: no description"
                    yield from walk(sub, f"{name} {sub_name}")
            elif not isinstance(a, argparse._HelpAction):
                yield name, a

    for name, a in walk(build_parser(), "lictrain"):
        assert a.help, f"{name} {a.option_strings or a.dest}: no help"
        if a.option_strings and a.default not in (None, False, [], argparse.SUPPRESS) and not a.required:
            assert "default" in a.help, f"{name} {a.option_strings}: default {a.default!r} not named"


@pytest.mark.parametrize("args,needle", [
    (["train", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean optim.lr"),
    (["train", "--set", "optim.qqqqqqqqqqqq=1"], "unknown config key 'optim.qqqqqqqqqqqq'; keys of optim: optim.name"),
    (["train", "--set", "zzz.q=1"], "unknown config key 'zzz'; top-level keys: compare, data,"),
    (["train", "--set", "train.steps=abc"], "train.steps"),
    (["train", "--config", "/no/such.yaml"], "config not found"),
    (["train", "--set", "model.name=vgg"], "unknown model 'vgg'"),
    (["train", "--optimizer", "lion", "--set", "train.steps=1"], "unknown optimizer 'lion'"),
    (["train", "--set", "data.train=/no/such/folder"], "image folder not found"),
    (["train", "--resume", "/no/such/run"], "nothing to resume: /no/such/run holds no run"),
    (["train", "--recipe", "fast"], "unknown recipe 'fast'"),
    (["train", "--recipe", "balanced-rd-qp", "--init-from", "/no/such/run"], "checkpoint not found"),
    (["train", "--set", "method.name=balanced"], "unknown method 'balanced'"),
    (["eval", "/no/such/run"], "checkpoint not found"),
    (["decompress", "/no/such.lic", "-o", "x.png", "--checkpoint", "/no/run"], "not found"),
])
def test_user_errors_are_one_line(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(args, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and needle in lines[-1]
    assert "Traceback" not in err


def test_optimizer_options_are_checked(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["train", "--set", "optim.options={momentom: 0.9}", "--optimizer", "sgd"], capsys)
    assert code == 2 and "momentom" in err and "momentum" in err


def test_verbose_train_logs_its_data_and_every_training_line(capsys, tmp_path):
    """-v adds where the images come from, how they are drawn, and the training line of every log step (the
    progress bar's numbers, which a log file otherwise never gets); without it, none of these."""
    base = ["--set", "data.crop=64", "--set", "data.batch_size=2", "--set", "data.val_crop=64",
            "--set", "train.progress=false", "--set", "train.val_every=4", "--set", "train.log_every=2",
            "--set", "train.steps=4"]
    assert main(["train", "--run-dir", str(tmp_path / "quiet"), *base]) == 0
    quiet = capsys.readouterr().err
    assert main(["-v", "train", "--run-dir", str(tmp_path / "loud"), *base]) == 0
    loud = capsys.readouterr().err
    assert "train loss" not in quiet and "training images by folder" not in quiet
    lines = [ln for ln in loud.splitlines() if "train loss" in ln]
    logged = [r for r in map(json.loads, (tmp_path / "loud" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert [int(ln.split()[1]) for ln in lines] == [r["step"] for r in logged] == [2, 4]
    assert f"train loss {logged[0]['loss']:.4f}" in lines[0]
    assert "training images by folder" in loud and "order iid" in loud
    assert (tmp_path / "loud" / "loss_curve.png").stat().st_size > 10_000 and "curves " in loud  # train's own plot


def test_train_then_resume_longer_from_the_command_line(capsys, tmp_path):
    base = ["--set", "data.crop=64", "--set", "data.batch_size=2", "--set", "data.val_crop=64",
            "--set", "train.progress=false", "--set", "train.val_every=2"]
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--set", "train.steps=2", *base]) == 0
    assert main(["train", "--resume", str(tmp_path / "r"), "--set", "train.steps=4"]) == 0
    from lictrain.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "r")["state"]["step"] == 4


def test_demo_prints_table_writes_plots_and_reuses_finished_runs(capsys, tmp_path):
    args = ["demo", "--run-dir", str(tmp_path / "demo"), "--set", "train.steps=10", "--set", "train.val_every=5",
            "--set", "data.crop=64", "--set", "data.val_crop=128"]
    code, out, _ = run(args, capsys)
    assert code == 0
    assert "| recipe | Steps-to-adam | Time-to-adam |" in out and "| soap |" in out and "PSNR-RGB" in out
    for png in ("loss_vs_steps.png", "loss_vs_time.png", "rd_samples-val.png"):
        path = tmp_path / "demo" / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert len(list((tmp_path / "demo" / "runs").glob("*/loss_curve.png"))) == 2
    code, out, err = run(args, capsys)
    assert code == 0 and err.count("reusing") == 2


def test_list_shows_registries(capsys):
    from lictrain.methods import METHODS
    from lictrain.models import MODELS
    from lictrain.optim import OPTIMIZERS

    code, out, _ = run(["list", "--params"], capsys)
    assert code == 0
    lines = out.splitlines()
    for name, spec in MODELS.items():  # every model on its own line, followed by a line per preset with its widths
        i = next(i for i, ln in enumerate(lines) if ln.strip().startswith(name + ":") or ln.strip().startswith(name + " "))
        for j, (preset, widths) in enumerate(spec.presets.items()):
            assert lines[i + 1 + j].split()[0] == preset and lines[i + 1 + j].endswith(str(widths)), (name, preset)
    # parameter counts: TCM-S's as published (45.18M, CMD-LIC Table 1)
    assert next(ln for ln in lines if ln.split()[:1] == ["paper"] and "'N': 64" in ln).split()[1] == "45.18M"
    for name in OPTIMIZERS:
        assert any(ln.strip().startswith(name + ":") for ln in lines), name
    methods = next(ln for ln in lines if ln.startswith("methods: "))
    assert methods == "methods: " + ", ".join(METHODS)


def test_resume_refuses_changes_that_do_not_fit_the_checkpoint(capsys, tmp_path):
    base = ["--set", "data.crop=64", "--set", "data.batch_size=2", "--set", "data.val_crop=64",
            "--set", "train.progress=false", "--set", "train.val_every=1"]
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--set", "train.steps=1", *base]) == 0
    capsys.readouterr()
    for args, needle in [(["--set", "optim.name=soap"], "'optim.name' cannot change"),
                         (["--set", "model.preset=small"], "'model.preset' cannot change"),
                         (["--optimizer", "soap"], "do not go with it")]:
        code, _, err = run(["train", "--resume", str(tmp_path / "r"), *args], capsys)
        assert code == 2 and needle in err and "Traceback" not in err


def test_bad_optimizer_values_and_paths_are_one_line_errors(capsys, tmp_path):
    code, _, err = run(["train", "--set", "optim.options={betas: [2.0, 0.9]}", "--set", "train.steps=1"], capsys)
    assert code == 2 and err.startswith("error: optimizer 'adam'")
    (tmp_path / "file").write_text("x")
    code, _, err = run(["train", "--run-dir", str(tmp_path / "file" / "sub"), "--set", "train.steps=1",
                        "--set", "data.crop=64"], capsys)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err


def test_import_wraps_a_compressai_state_dict_into_a_checkpoint_that_evaluates(tmp_path, capsys):
    import torch

    from lictrain.checkpoint import load_checkpoint, model_from_checkpoint
    from lictrain.models import build_model

    torch.manual_seed(0)
    model = build_model("mbt2018-mean", "tiny")
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    out = tmp_path / "ckpt.pt"
    assert main(["import", str(tmp_path / "weights.pth"), "--model", "mbt2018-mean", "--preset", "tiny",
                 "--lmbda", "0.0067", "--out", str(out)]) == 0
    loaded = model_from_checkpoint(load_checkpoint(out))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert main(["eval", str(out), "--data", "samples:val", "--out", str(tmp_path / "eval")]) == 0
    # tiny weights imported as the default preset (paper): the error names the preset and the shapes
    assert main(["import", str(tmp_path / "weights.pth"), "--model", "mbt2018-mean", "--lmbda", "0.0067",
                 "--out", str(tmp_path / "p.pt")]) == 2
    err = capsys.readouterr().err
    assert "(as mbt2018-mean, preset paper) does not fit MeanScaleHyperprior: wrong shape " in err
    assert "(16, 3, 3) where MeanScaleHyperprior has (192, 3, 3)" in err
    assert main(["import", str(out), "--model", "mbt2018-mean", "--preset", "tiny", "--lmbda", "0.0067",
                 "--out", str(tmp_path / "again.pt")]) == 2  # already a lictrain checkpoint


def test_eval_of_a_run_folder_names_the_file_it_used_and_keeps_data_sets_apart(tmp_path, capsys):
    """`lictrain eval RUN_DIR` evaluates the run's end (checkpoint.pt, as compare does), `--pick best` the best
    validation's weights; the rows name the file, and the default output folder is per data set, so evaluating on
    another set does not overwrite the first."""
    import json

    from lictrain.trainer import train
    from tests.conftest import tiny_config

    run = train(tiny_config(tmp_path, "train.steps=2", "train.val_every=1")).run_dir
    assert main(["eval", str(run), "--max-images", "1"]) == 0
    assert main(["eval", str(run), "--pick", "best", "--data", "samples:train", "--max-images", "1"]) == 0
    last = json.loads((run / "eval-samples-val" / "results.json").read_text())["results"]["checkpoint"]
    best = json.loads((run / "eval-samples-train" / "results.json").read_text())["results"]["checkpoint"]
    assert last == [str(run / "checkpoint.pt")] and best == [str(run / "checkpoint_best.pt")]
    assert "checkpoint_best.pt" in capsys.readouterr().out


def test_version_and_list_show_what_a_user_looks_for(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("lictrain ")
    # in a fresh process: in this one another test has already imported the modules that register the recipes
    out = subprocess.run([sys.executable, "-m", "lictrain", "list"], capture_output=True, text=True, check=True).stdout
    assert "recipes (compare, train --recipe): adam, " in out and "soap" in out
    assert "built-in configs (--config NAME): bench, " in out and "train.steps" in out
