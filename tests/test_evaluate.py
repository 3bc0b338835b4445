import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lictrain import bitstream
from lictrain.checkpoint import load_checkpoint
from lictrain.data import EvalImages, load_rgb, pad_to_multiple, to_tensor
from lictrain.errors import LictrainError
from lictrain.evaluation import Codec, compress_file, decompress_file, evaluate, evaluate_image, psnr_8bit, quantize_8bit
from lictrain.trainer import train
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny mean-scale hyperprior trained for 150 steps, and a second, different one."""
    tmp = tmp_path_factory.mktemp("eval")
    train(tiny_config(tmp, "train.steps=150", "train.val_every=150", "data.batch_size=8", name="a"))
    train(tiny_config(tmp, "train.steps=20", "train.val_every=20", "loss.lmbda=0.0035", name="b"))
    return tmp


def test_real_bpp_close_to_estimated_and_decode_matches_forward(trained):
    codec = Codec.from_checkpoint(load_checkpoint(trained / "a"))
    ds = EvalImages("samples:val")
    for i in range(len(ds)):
        x = ds[i]
        res, x_hat = evaluate_image(codec, x, ds.name(i))
        assert res.bytes > 0 and res.bpp == pytest.approx(res.bytes * 8 / (x.shape[1] * x.shape[2]))
        # entropy coding costs at most a few percent over the model's own estimate
        assert abs(res.bpp - res.bpp_estimated) < 0.05 * res.bpp_estimated + 0.005
        with torch.no_grad():
            h, w = x.shape[-2:]
            fwd = codec.model(pad_to_multiple(x[None], codec.multiple))["x_hat"][0, :, :h, :w].clamp(0, 1)
        assert (fwd - x_hat).abs().max().item() < 1e-4
        assert res.psnr_rgb == pytest.approx(psnr_8bit(x, fwd), abs=0.01)
        assert 0 < res.ms_ssim_rgb <= 1


def test_eval_records_the_unreadable_images_it_left_out(trained, tmp_path, image_folder):
    data = evaluate([trained / "b"], str(image_folder), tmp_path / "ev", progress=False)
    assert [(Path(s["image"]).name, bool(s["why"])) for s in data["skipped"]] == [("corrupt.png", True)]
    assert "1 unreadable, left out" in data["description"]
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["skipped"] == data["skipped"]


def test_psnr_8bit_by_hand():
    x = torch.full((3, 4, 4), 100 / 255)
    y = torch.full((3, 4, 4), 102 / 255)  # error of 2 levels everywhere: MSE 4
    assert psnr_8bit(x, y) == pytest.approx(10 * math.log10(255**2 / 4))


def test_eval_writes_compressai_results_format(trained, tmp_path):
    summary = evaluate([trained / "b", trained / "a"], "samples:val", tmp_path / "ev", progress=False)
    data = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert data == summary
    assert {"name", "description", "results"} <= set(data)
    r = data["results"]
    assert r["lmbda"] == [0.0035, 0.013]  # sorted by lambda: points of one curve
    assert len(r["bpp"]) == len(r["psnr-rgb"]) == len(r["ms-ssim-rgb"]) == 2
    rows = list(csv.DictReader(open(tmp_path / "ev" / "per_image.csv")))
    assert len(rows) == 4 and {row["image"] for row in rows} == {"chelsea.png", "coffee.png"}
    a_rows = [float(row["bpp"]) for row in rows if float(row["lmbda"]) == 0.013]
    assert r["bpp"][1] == pytest.approx(np.mean(a_rows))
    # every row and every point says which checkpoint it came from (two checkpoints of one lambda stay apart)
    assert r["checkpoint"] == [str(trained / "b"), str(trained / "a")]
    assert {(row["checkpoint"], float(row["lmbda"])) for row in rows} == {(str(trained / "b"), 0.0035),
                                                                          (str(trained / "a"), 0.013)}
    assert data["skipped"] == []
    from lictrain.cli import format_results_table

    table = format_results_table(summary).splitlines()
    assert table[0].startswith("| checkpoint | lambda") and str(trained / "a") in table[3]


def test_file_round_trip_reproduces_the_evaluation_reconstruction(trained, tmp_path):
    src = tmp_path / "in.png"
    img = load_rgb(EvalImages("samples:val").images.files[0])[:200, :300]
    Image.fromarray(img).save(src)
    info = compress_file(str(trained / "a"), str(src), str(tmp_path / "x.lic"))
    assert info["bytes"] == (tmp_path / "x.lic").stat().st_size
    decompress_file(str(trained / "a"), str(tmp_path / "x.lic"), str(tmp_path / "out.png"))
    out = np.asarray(Image.open(tmp_path / "out.png"))
    _, x_hat = evaluate_image(Codec.from_checkpoint(load_checkpoint(trained / "a")), to_tensor(img), "in.png")
    assert out.shape == img.shape
    assert np.array_equal(out, quantize_8bit(x_hat).byte().permute(1, 2, 0).numpy())


def test_file_errors_are_one_line(trained, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(load_rgb(EvalImages("samples:val").images.files[0])[:64, :64]).save(src)
    lic = tmp_path / "x.lic"
    compress_file(str(trained / "a"), str(src), str(lic))
    data = lic.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "bad magic": b"XXXX" + data[4:],
        "checksum": data[:20] + bytes([data[20] ^ 0xFF]) + data[21:],
        "trailing": data + b"\x00",
        "version": data[:4] + b"\x09" + data[5:],
    }
    for why, blob in cases.items():
        bad = tmp_path / f"{why}.lic"
        bad.write_bytes(blob)
        with pytest.raises(LictrainError) as e:
            decompress_file(str(trained / "a"), str(bad), str(tmp_path / "o.png"))
        assert "\n" not in str(e.value), why
    # the same architecture with other weights: said so, with both fingerprints
    with pytest.raises(LictrainError, match=r"other weights of mbt2018-mean/tiny \(fingerprint [0-9a-f]{16}, "
                                            r"lmbda=0.013\); this checkpoint's weights are [0-9a-f]{16}"):
        decompress_file(str(trained / "b"), str(lic), str(tmp_path / "o.png"))
    with pytest.raises(LictrainError, match="not found"):
        compress_file(str(trained / "a"), str(tmp_path / "missing.png"), str(tmp_path / "y.lic"))
    (tmp_path / "broken.png").write_bytes(src.read_bytes()[:50])
    with pytest.raises(LictrainError, match="cannot read image"):
        compress_file(str(trained / "a"), str(tmp_path / "broken.png"), str(tmp_path / "y.lic"))
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "y.lic").exists()


def test_every_truncation_is_a_clean_error(trained, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(load_rgb(EvalImages("samples:val").images.files[0])[:64, :64]).save(src)
    compress_file(str(trained / "a"), str(src), str(tmp_path / "x.lic"))
    data = (tmp_path / "x.lic").read_bytes()
    for n in range(len(data)):
        with pytest.raises(LictrainError):
            bitstream.decode(data[:n])


def test_elic_codes_under_no_grad(tmp_path):
    # ELIC's compress() fails with autograd on; the codec must take care of it.
    train(tiny_config(tmp_path, "model.name=elic", "train.steps=2", "data.batch_size=2", "train.val_every=2"))
    codec = Codec.from_checkpoint(load_checkpoint(tmp_path / "run"))
    x = to_tensor(load_rgb(EvalImages("samples:val").images.files[0])[:64, :96])
    bs = bitstream.decode(bitstream.encode(codec.compress(x)))
    x_hat = codec.decompress(bs)
    with torch.no_grad():
        fwd = codec.model(pad_to_multiple(x[None], 64))["x_hat"][0, :, :64, :96].clamp(0, 1)
    assert x_hat.shape == x.shape
    # the checkerboard context is recomputed in another order when decoding: allow rare rounding flips
    assert (fwd - x_hat).abs().mean().item() < 1e-3


def test_device_option_errors_are_one_line(trained):
    ckpt = load_checkpoint(trained / "a")
    with pytest.raises(LictrainError, match="unknown device 'gpu0'"):
        Codec.from_checkpoint(ckpt, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(LictrainError, match="no CUDA device"):
            Codec.from_checkpoint(ckpt, device="cuda")
    # and the CPU path is the default one, explicitly
    x = to_tensor(load_rgb(EvalImages("samples:val").images.files[0])[:64, :64])
    a = Codec.from_checkpoint(ckpt, device="cpu").decompress(Codec.from_checkpoint(ckpt).compress(x))
    assert a.device.type == "cpu" and a.shape == x.shape


def test_write_errors_name_the_file_asked_for_and_leave_no_temporary(tmp_path):
    """A write that fails (here the target is a folder, which stops root too): the error names the path the user
    gave, not lictrain's temporary file beside it, and no temporary file is left."""
    from lictrain.io import save_atomic, write_atomic

    (tmp_path / "summary.json").mkdir()
    for write in (lambda p: write_atomic(p, "{}"), lambda p: save_atomic({"a": 1}, p)):
        with pytest.raises(OSError) as e:
            write(tmp_path / "summary.json")
        assert e.value.filename == str(tmp_path / "summary.json")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
