"""Models named by import path (`model.name: package.module:ClassName`, `model.kwargs`): trained, evaluated and
coded end to end from the checkpoint alone; bad paths and classes get one-line errors."""

import textwrap

import pytest
import torch
import torch.nn.functional as F

import lictrain
from lictrain import bitstream
from lictrain.checkpoint import load_checkpoint, model_from_checkpoint
from lictrain.errors import LictrainError
from lictrain.evaluation import Codec
from lictrain.models import build_model, downsampling

MODULE = textwrap.dedent('''
    import torch
    from compressai.models import FactorizedPrior

    class SmallFactorized(FactorizedPrior):
        """A user's model: CompressAI's factorized prior with its own defaults and stride declaration."""
        downsampling_factor = 16

        def __init__(self, N=8, M=12):
            super().__init__(N=N, M=M)

    class NotACodec(torch.nn.Module):
        def forward(self, x):
            return x

    def not_a_class():
        return None
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_lic_models.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_lic_models"


def test_a_model_by_import_path_trains_evaluates_and_codes(tmp_path, user_module):
    torch.manual_seed(0)
    name = f"{user_module}:SmallFactorized"
    result = lictrain.train({"model": {"name": name, "kwargs": {"M": 10}}, "data": {"crop": 64, "batch_size": 2},
                             "train": {"steps": 3, "progress": False}, "optim": {"lr": 1e-3}},
                            ["run_dir=" + str(tmp_path / "run")])
    ckpt = load_checkpoint(result.run_dir)
    assert ckpt["config"]["model"]["name"] == name and ckpt["config"]["model"]["kwargs"] == {"M": 10}
    model = model_from_checkpoint(ckpt)  # rebuilt from the checkpoint alone, with the recorded kwargs
    assert type(model).__name__ == "SmallFactorized" and model.g_a[-1].out_channels == 10
    assert downsampling(name) == 16

    summary = lictrain.evaluate([result.run_dir], "samples:val", tmp_path / "eval")
    assert summary["results"]["bpp"][0] > 0

    # the bitstream decodes to the encoder-side reconstruction: g_s of the latent rounded around the medians
    codec = Codec.from_checkpoint(ckpt)
    g = torch.Generator().manual_seed(1)
    x = F.interpolate(torch.rand(1, 3, 6, 7, generator=g), size=(40, 52), mode="bicubic").clamp(0, 1)
    padded = F.pad(x, (0, (-52) % 16, 0, (-40) % 16), mode="replicate")
    with torch.no_grad():
        y = codec.model.g_a(padded)
        medians = codec.model.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1)
        ref = codec.model.g_s(torch.round(y - medians) + medians)[0, :, :40, :52].clamp(0, 1)
    decoded = codec.decompress(bitstream.decode(bitstream.encode(codec.compress(x[0]))))
    assert ref.std() > 0.01 and (decoded - ref).abs().max() < 1e-4


def test_preset_values_can_be_overridden_for_registered_models():
    assert build_model("mbt2018-mean", "tiny", {"N": 20}).g_a[0].out_channels == 20
    with pytest.raises(LictrainError, match=r"cannot build model mbt2018-mean \(tiny\)"):
        build_model("mbt2018-mean", "tiny", {"width": 3})


@pytest.mark.parametrize("path,message", [
    ("no_such_module_xyz:Model", "cannot import no_such_module_xyz"),
    ("{mod}:Missing", "has no attribute Missing"),
    ("{mod}:NotACodec", "not a CompressAI-style compression model .missing compress, decompress, update, aux_loss"),
    ("{mod}:not_a_class", "is not an nn.Module class"),
    (":Model", "written package.module:ClassName"),
])
def test_bad_import_paths_get_one_line_errors(user_module, path, message):
    with pytest.raises(LictrainError, match=message) as info:
        build_model(path.format(mod=user_module))
    assert "\n" not in str(info.value)


def test_bad_constructor_arguments_get_one_line_errors(user_module):
    with pytest.raises(LictrainError, match="cannot build model .*SmallFactorized with {'K': 3}"):
        build_model(f"{user_module}:SmallFactorized", kwargs={"K": 3})


def _renamed_model():
    from compressai.models import FactorizedPrior

    class Renamed(FactorizedPrior):
        """CompressAI's factorized prior with its transforms under other names, declared for lictrain."""
        lictrain_transforms = ("encoder", "decoder")

        def __init__(self):
            super().__init__(N=8, M=12)
            self.encoder, self.decoder = self.g_a, self.g_s
            del self.g_a, self.g_s

        def forward(self, x):
            y_hat, likelihoods = self.entropy_bottleneck(self.encoder(x))
            return {"x_hat": self.decoder(y_hat), "likelihoods": {"y": likelihoods}}

    return Renamed, FactorizedPrior


def test_analyses_find_the_transforms_a_model_declares():
    from lictrain.probes.outliers import image_features
    from lictrain.methods.cmd_modes import sensitive_layers
    from lictrain.models import transforms

    Renamed, FactorizedPrior = _renamed_model()
    torch.manual_seed(0)
    renamed, plain = Renamed(), FactorizedPrior(N=8, M=12)
    state = {k.replace("encoder.", "g_a.").replace("decoder.", "g_s."): v for k, v in renamed.state_dict().items()}
    plain.load_state_dict(state)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = image_features(renamed, x, 16, "encoder.2")
    b = image_features(plain, x, 16, "g_a.2")
    for key in ("y", "y_hat", "act"):
        assert torch.equal(a[key], b[key]), key
    assert transforms(renamed) == ("encoder", "decoder") and transforms(plain) == ("g_a", "g_s")
    scores = {"encoder.0": 3.0, "encoder.2": 1.0, "entropy_bottleneck": 2.0, "h_s.0": 0.5}
    assert sensitive_layers(scores, ("encoder.", "decoder.")) == ["encoder.0", "entropy_bottleneck"]

    class Undeclared(Renamed):
        lictrain_transforms = ("g_a", "g_s")

    with pytest.raises(LictrainError, match="has no module g_a, g_s: name its analysis and synthesis") as info:
        transforms(Undeclared())
    assert "\n" not in str(info.value)


def test_values_that_do_not_fit_and_custom_checkpoints_get_one_line_errors():
    with pytest.raises(LictrainError, match=r"cannot build model tcm \(tiny\) .*M = 42 is not divisible into 5"):
        build_model("tcm", "tiny", {"M": 42})
    with pytest.raises(LictrainError, match=r"lictrain.train\(model=...\): build that model yourself"):
        build_model("custom", "FactorizedPrior")
