import pytest

from lictrain.config import RunConfig, load_config, parse_override, valid_keys
from lictrain.errors import LictrainError


def test_unknown_key_is_named_and_valid_keys_listed():
    with pytest.raises(LictrainError) as e:
        load_config(None, ["optim.learning_rate=1e-4"])
    msg = str(e.value)
    assert "optim.learning_rate" in msg and "optim.lr" in msg and "\n" not in msg


def test_unknown_section_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  stepz: 10\n")
    with pytest.raises(LictrainError, match="train.stepz"):
        load_config(str(p))


@pytest.mark.parametrize("override,needle", [
    ("train.steps=ten", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("optim.lr=-1", "optim.lr"),
    ("loss.metric=l1", "loss.metric"),
    ("train.progress=maybe", "train.progress"),
    ("data=5", "data"),
    ("nonsense", "key=value"),
])
def test_bad_values_are_one_line_errors(override, needle):
    with pytest.raises(LictrainError, match=needle) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


def test_yaml_scientific_notation_reads_as_float(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as a string; users mean a number.
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-4\nloss:\n  lmbda: 0.0067\n")
    cfg = load_config(str(p), ["train.clip_max_norm=2e-1"])
    assert cfg.optim.lr == 1e-4 and cfg.loss.lmbda == 0.0067 and cfg.train.clip_max_norm == 0.2
    assert parse_override("data.val_crop=null") == ("data.val_crop", None)


def test_overrides_apply_after_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 3\ntrain: {steps: 10}\n")
    cfg = load_config(str(p), ["train.steps=20", "optim.options={betas: [0.8, 0.9]}"])
    assert (cfg.seed, cfg.train.steps) == (3, 20)
    assert cfg.optim.options == {"betas": [0.8, 0.9]}
    assert RunConfig().train.steps != 20  # defaults untouched


def test_msssim_needs_large_crops():
    with pytest.raises(LictrainError, match="161"):
        load_config(None, ["loss.metric=ms-ssim", "data.crop=64"])
    load_config(None, ["loss.metric=ms-ssim", "data.crop=192"])


def test_missing_config_file():
    with pytest.raises(LictrainError, match="config not found"):
        load_config("/no/such/file.yaml")


def test_valid_keys_cover_nested_sections():
    keys = valid_keys()
    assert {"run_dir", "model.name", "optim.lr", "train.ema_decay", "data.crop"} <= set(keys)


def test_dotted_keys_into_mappings_change_one_entry():
    cfg = load_config(None, ["optim.options={betas: [0.9, 0.99]}", "optim.options.weight_decay=1e-2",
                             "compare.lambdas=[1e-3, 2.5e-3]"])
    assert cfg.optim.options == {"betas": [0.9, 0.99], "weight_decay": 0.01}
    assert cfg.compare.lambdas == [0.001, 0.0025]


def test_the_soap_lic_config_is_the_papers_protocol():
    """configs/soap-lic.yaml against the SOAP-for-LIC paper's Section 4: batch 64 of 256 x 256 crops, lr 2e-4,
    ReduceLROnPlateau (patience 10, factor 0.5) per epoch, EMA 0.999, no weight decay, 300 epochs of COCO 2017
    train (118,287 images), CompressAI's six lambdas, Adam against SOAP, a paper-width model."""
    from lictrain.config import LAMBDAS_MSE

    cfg = load_config("soap-lic")
    epoch = 118_287 // 64  # full batches: the loader drops the last partial one
    assert (cfg.data.batch_size, cfg.data.crop, cfg.optim.lr) == (64, 256, 2e-4)
    assert (cfg.train.schedule, cfg.train.plateau_patience, cfg.train.plateau_factor) == ("plateau", 10, 0.5)
    assert cfg.train.ema_decay == 0.999 and cfg.optim.options.get("weight_decay", 0) == 0
    assert cfg.train.steps == 300 * epoch and cfg.train.val_every == epoch
    assert tuple(cfg.compare.lambdas) == LAMBDAS_MSE and cfg.compare.recipes == ["adam", "soap"]
    assert cfg.model.preset == "paper"


def test_the_readme_config_table_names_every_key_with_its_default():
    """README "Configuration": each key of RunConfig is in a row of the table (or, for the GPU keys, of the GPU
    table), and a row's default cell agrees with RunConfig's default for its first key."""
    import re
    from pathlib import Path

    from lictrain.config import RunConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = [ln for ln in readme.splitlines() if ln.startswith("| `")]
    cells = {}
    for row in rows:
        parts = [c.strip() for c in row.strip("|").split("|")]
        for key in re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)*)`", parts[0]):
            cells.setdefault(key, parts[1] if len(parts) > 1 else "")

    def keys(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("kwargs", "options", "recipe_sets"):
                yield from keys(v, prefix + k + ".")
            else:
                yield prefix + k, v

    defaults = dict(keys(RunConfig().to_dict()))
    assert sorted(k for k in defaults if k not in cells) == []
    # one-key rows: the default cell is the default (numbers compared as numbers, words as words)
    checked = 0
    for row in rows:
        parts = [c.strip() for c in row.strip("|").split("|")]
        row_keys = re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)*)`", parts[0])
        if len(row_keys) != 1 or row_keys[0] not in defaults or len(parts) < 2:
            continue
        cell, value = parts[1].strip("`").lower(), defaults[row_keys[0]]
        if isinstance(value, bool) or isinstance(value, str):
            assert cell == str(value).lower(), (row_keys[0], cell, value)
        elif isinstance(value, (int, float)):
            assert float(cell) == float(value), (row_keys[0], cell, value)
        else:
            continue
        checked += 1
    assert checked >= 10 and "`iid`" in cells["data.order"]


def test_every_keys_baseline_is_pinned_as_stored_runs_were_made():
    """A key's baseline (its default, or its pinned `absent` value) is what every stored run's identity assumes:
    changing a default without pinning the old value would silently give old runs another meaning."""
    import json
    from pathlib import Path

    from lictrain.config import POLICIES

    stored = json.loads((Path(__file__).parent / "data" / "config_baselines.json").read_text())
    changed = {k: (v, POLICIES[k]["baseline"]) for k, v in stored.items() if k in POLICIES and
               POLICIES[k]["baseline"] != v}
    assert changed == {}, "pin the old default with setting(..., absent=OLD) for: " + ", ".join(changed)
    assert POLICIES["data.order"]["baseline"] == "shuffle" and RunConfig().data.order == "iid"


def test_identity_holds_what_changes_a_run_and_nothing_else():
    from lictrain.config import identity, identity_hash, load_config

    base = load_config(None, ["model.preset=bench", "loss.lmbda=0.0067"])
    assert identity(base) == {"model.preset": "bench", "loss.lmbda": 0.0067, "data.order": "iid"}
    for unchanged in ("data.workers=4", "train.progress=false", "run_dir=elsewhere", "probe.outliers_every=5",
                      "compare.codecs=[]", "data.cache_mb=0"):
        assert identity_hash(load_config(None, ["model.preset=bench", "loss.lmbda=0.0067", unchanged])) == \
            identity_hash(base), unchanged
    for changed in ("optim.lr=2e-4", "train.precision=bf16", "data.order=shuffle", "seed=1", "train.steps=10"):
        assert identity_hash(load_config(None, ["model.preset=bench", "loss.lmbda=0.0067", changed])) != \
            identity_hash(base), changed


def test_a_saved_config_without_a_pinned_key_takes_what_it_meant_then():
    from lictrain.config import config_from_saved

    saved = RunConfig().to_dict()
    del saved["data"]["order"]  # a checkpoint written before data.order existed
    assert config_from_saved(saved).data.order == "shuffle"
    saved["data"]["order"] = "iid"
    assert config_from_saved(saved).data.order == "iid"


def test_resume_refuses_a_change_of_what_a_step_computes_from_every_entry_point(tmp_path):
    import lictrain
    from lictrain.cli import main
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, "train.steps=2", "train.val_every=2")
    lictrain.train(cfg)
    cfg.train.steps = 3
    cfg.optim.lr = 5e-4
    with pytest.raises(LictrainError, match=r"'optim.lr' cannot change when resuming \(the checkpoint was made with "
                                            r"0.001, asked 0.0005\)"):
        lictrain.train(cfg, resume=True)  # the API: the trainer checks
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "loss.lmbda=0.1"]) == 2  # the CLI
    cfg.optim.lr = 1e-3
    assert lictrain.train(cfg, resume=True).step == 3  # train.steps may change


def test_compare_finds_a_run_stored_under_the_legacy_hash(tmp_path):
    from lictrain.comparison.compare import legacy_hash, plan_runs
    from lictrain.config import identity_hash, load_config

    cfg = load_config(None, ["compare.lambdas=[0.0067]", "compare.recipes=[adam]", "data.order=shuffle"])
    (run,) = plan_runs(cfg, tmp_path)
    assert run.run_dir.name.endswith(identity_hash(run.cfg))  # new runs: the identity hash
    stored = tmp_path / "runs" / f"adam-lmbda0.0067-seed0-{legacy_hash(run.cfg)}"
    stored.mkdir(parents=True)
    (run,) = plan_runs(cfg, tmp_path)
    assert run.run_dir == stored


def test_a_fixed_schedules_shape_is_no_part_of_a_plateau_runs_identity_or_resume():
    from lictrain.config import check_resume, identity_hash, load_config

    a = load_config(None, ["train.schedule=plateau"])
    b = load_config(None, ["train.schedule=plateau", "train.decay_start=0.5", "optim.options={betas: [0.9, 0.99]}"])
    a.optim.options = {"betas": (0.9, 0.99)}  # a tuple, as code writes it, and the list YAML gives: one value
    assert identity_hash(a) == identity_hash(b)
    check_resume(a, b)  # no error
    c = load_config(None, ["train.schedule=cosine", "train.decay_start=0.5"])
    assert identity_hash(c) != identity_hash(load_config(None, ["train.schedule=cosine"]))
    with pytest.raises(LictrainError, match="'train.decay_start' cannot change"):
        check_resume(load_config(None, ["train.schedule=cosine"]), c)


def test_fp16_with_a_method_that_cannot_scale_its_loss_is_refused_at_load():
    with pytest.raises(LictrainError, match="fp16 needs loss scaling"):
        load_config(None, ["train.precision=fp16", "method.name=balanced-rd"])


def test_every_built_in_config_loads_and_validates():
    """A typo in a shipped config (an unknown key, a bad value) fails here, not hours into a benchmark."""
    from lictrain.config import CONFIG_DIR, load_config, validate

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"bench", "converge", "demo"} <= set(names)
    for name in names:
        validate(load_config(name))


def test_every_built_in_compare_plans_valid_runs(tmp_path):
    """Each recipe of a shipped compare is the base config plus its overrides; a recipe set that names an unknown key
    or breaks a rule (e.g. configs/converge-cmd.yaml's cosine short runs) fails here, not when the compare reaches it.
    Configs that fine-tune from earlier runs are planned without their init_from (those runs do not exist here)."""
    from lictrain.comparison.compare import plan_runs
    from lictrain.config import CONFIG_DIR, load_config

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(path.stem)
        if cfg.train.init_from:
            cfg = load_config(path.stem, ["train.init_from=null"])
        runs = plan_runs(cfg, tmp_path)
        assert len(runs) >= len(cfg.compare.recipes), path.stem
        if path.stem == "converge-cmd":  # the anchor is converge.yaml's run; the short runs anneal over 20k steps
            anchor = {r.lmbda: r.cfg.run_dir for r in plan_runs(load_config("converge"), tmp_path) if r.recipe == "adam"}
            by = {(r.recipe, r.lmbda): r.cfg for r in runs}
            assert all(by[("adam", lmbda)].run_dir == d for lmbda, d in anchor.items()) and len(anchor) == 4
            short = by[("cmd-lic-short", 0.0067)]
            assert (short.train.steps, short.train.schedule, short.method.name) == (20000, "cosine", "cmd-lic")
