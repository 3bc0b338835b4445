"""The package as a user installs it: a wheel built from the checkout carries the configs and the licence, and
installed outside the checkout it lists its registries and finds the demo's config."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # no build isolation: builds with this environment's setuptools, without the network
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, cwd=out)
    (whl,) = out.glob("lictrain-*.whl")
    return whl


def test_wheel_holds_the_configs_and_the_licence(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for cfg in ("demo", "mini", "bench", "bench-qp", "bench-cmd", "soap-lic", "converge"):
        assert f"lictrain/configs/{cfg}.yaml" in names, cfg
    assert any(n.endswith("LICENSE") for n in names)
    for dataset in ("kodak", "clic2020-professional", "clic2020-mobile"):  # the published curves
        assert f"lictrain/anchors/published/{dataset}.json" in names, dataset
    assert not any(n.startswith("tests/") for n in names)


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,  # noqa
                                       text=True, check=True).stdout
    where = run("-c", "import lictrain, lictrain.config as c; print(lictrain.__file__); print(c.resolve_config_path('demo'))")
    module_file, demo = where.split()
    assert module_file.startswith(str(site)) and demo.startswith(str(site)), where  # not the checkout's copy
    listing = run("-m", "lictrain", "list")
    assert "mbt2018-mean" in listing and "soap" in listing and "balanced-rd" in listing
