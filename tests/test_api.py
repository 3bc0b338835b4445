"""The README's Python API example, run as written (in a temporary folder), and what it promises."""

import os
import re
from pathlib import Path

import pytest
import torch

import lictrain
from lictrain.optim.soap import SOAP

README = Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_and_does_what_it_says(tmp_path, capsys):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(compile(_example(), "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    result, summary, model, optimizer = (scope[k] for k in ("result", "summary", "model", "optimizer"))
    assert result.step == 20 and result.last_val["loss"] > 0
    assert (tmp_path / "runs" / "api-example" / "checkpoint.pt").exists()
    assert len(summary["results"]["bpp"]) == 1 and summary["results"]["bpp"][0] > 0
    assert isinstance(optimizer, SOAP)
    main = [n for n, p in model.named_parameters() if not n.endswith("quantiles")]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(main) < len(list(model.parameters()))
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("20 ")


def test_config_forms_agree():
    by_name = lictrain.make_config("demo", ["optim.lr=3e-4"])
    by_dict = lictrain.make_config(by_name.to_dict())
    by_object = lictrain.make_config(by_name, ["loss.lmbda=0.02"])
    assert by_dict.to_dict() == by_name.to_dict()
    assert by_object.optim.lr == 3e-4 and by_object.loss.lmbda == 0.02 and by_name.loss.lmbda != 0.02


def test_build_optimizer_takes_parameters_too():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = lictrain.build_optimizer([p], "adam", lr=0.1)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 0.1


def test_train_a_model_you_built(tmp_path):
    from compressai.models import FactorizedPrior

    from lictrain.checkpoint import load_checkpoint
    from lictrain.errors import LictrainError

    torch.manual_seed(0)
    model = FactorizedPrior(N=8, M=12)  # not one of lictrain's registered presets
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = lictrain.train({"data": {"crop": 64, "batch_size": 2}, "train": {"steps": 3, "progress": False},
                             "optim": {"lr": 1e-3}}, ["run_dir=" + str(tmp_path / "mine")], model=model)
    assert result.step == 3
    ckpt = load_checkpoint(result.run_dir)
    assert ckpt["config"]["model"] == {"name": "custom", "preset": "FactorizedPrior", "kwargs": {}}
    assert set(ckpt["model"]) == set(before)  # the checkpoint holds this model's weights...
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())  # ...trained in place
    assert not torch.equal(before["g_a.0.weight"], model.state_dict()["g_a.0.weight"])
    with pytest.raises(LictrainError, match=re.escape("train(model=...): Linear is not a CompressAI-style compression model")):
        lictrain.train({"train": {"steps": 1}}, ["run_dir=" + str(tmp_path / "bad")], model=torch.nn.Linear(2, 2))
