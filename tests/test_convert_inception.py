"""Inception converter: TorchScript (weight, beta, mean, var) per conv -> torch-fidelity's network.

CI has no Inception file, so a tiny TorchScript model (saved by TorchScript itself) with the same
per-layer layout and the same arithmetic (conv without bias, batch norm without scale, ReLU) checks
the mapping end to end, read as data: torch.jit.load is never called; with
FASTRATIO_INCEPTION_TS pointing at the real default_1.pt the full network is compared as well."""

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

from fastratio.errors import UserError
from fastratio.tools.convert_inception import (
    basic_convs,
    convert_state,
    inception_skeleton,
    read_torchscript_tensors,
)

ROOT = Path(__file__).resolve().parents[1]


class TSConv(nn.Module):
    """The source's layer: conv (no bias), batch norm with beta/mean/var only, ReLU."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) * 0.3)
        self.beta = nn.Parameter(torch.randn(cout) * 0.1)
        self.register_buffer("mean", torch.randn(cout) * 0.1)
        self.register_buffer("var", torch.rand(cout) + 0.5)
        self.pad = k // 2

    def forward(self, x):
        x = F.conv2d(x, self.weight, None, 1, self.pad)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.1, 0.001))


class TinySource(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.conv_1, self.conv_2 = TSConv(3, 8, 3), TSConv(8, 8, 1), TSConv(8, 16, 3)

    def forward(self, x):
        return self.conv_2(self.conv_1(self.conv(x))).mean(dim=(2, 3))


class TinyTarget(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = BasicConv2d(3, 8, kernel_size=3, padding=1), BasicConv2d(8, 8, kernel_size=1), BasicConv2d(8, 16, kernel_size=3, padding=1)

    def forward(self, x):
        return self.c(self.b(self.a(x))).mean(dim=(2, 3))


def _saved_source(tmp_path) -> tuple[torch.jit.ScriptModule, Path]:
    torch.manual_seed(0)
    source = torch.jit.script(TinySource().eval())
    path = tmp_path / "tiny.pt"
    source.save(str(path))  # written by TorchScript itself
    return source, path


def test_tiny_torchscript_is_read_as_data_and_converts_to_identical_features(tmp_path, monkeypatch):
    source, path = _saved_source(tmp_path)

    def no_jit_load(*args, **kwargs):
        raise AssertionError("torch.jit.load runs the archive's code")

    monkeypatch.setattr(torch.jit, "load", no_jit_load)
    tensors = read_torchscript_tensors(path)
    want = source.state_dict()
    assert list(tensors) == list(want) and all(torch.equal(tensors[k], want[k]) for k in want)
    target = TinyTarget().eval()
    target.load_state_dict(convert_state(tensors, target))
    x = torch.randn(4, 3, 11, 11)
    torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-6)


def _with_data_pkl(path: Path, out: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, payload if item.filename.endswith("/data.pkl") else src.read(item))
    return out


def test_hostile_torchscript_archives_are_refused_in_one_line(tmp_path, monkeypatch):
    _, path = _saved_source(tmp_path)
    monkeypatch.chdir(tmp_path)
    evil = _with_data_pkl(path, tmp_path / "evil.pt", b"\x80\x02cos\nsystem\n(X\x0c\x00\x00\x00touch MARKERtR.")
    with pytest.raises(UserError, match=r"refusing to load global os\.system"):
        read_torchscript_tensors(evil)
    assert not (tmp_path / "MARKER").exists()
    foreign = _with_data_pkl(path, tmp_path / "foreign.pt", pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(UserError, match="module tree malformed"):
        read_torchscript_tensors(foreign)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable TorchScript archive"):
        read_torchscript_tensors(tmp_path / "junk.pt")


def test_mismatches_are_named():
    source = torch.jit.script(TinySource())
    with pytest.raises(UserError, match="source has 3 convolutions, the target network 94"):
        convert_state(source.state_dict(), inception_skeleton())
    bad = dict(source.state_dict())
    del bad["conv_1.var"]
    with pytest.raises(UserError, match=r"conv_1 has \['beta', 'mean', 'weight'\]"):
        convert_state(bad, TinyTarget())


def test_inception_has_94_convolutions_as_the_torchscript_file():
    # default_1.pt holds 376 tensors = 94 convolutions x (weight, beta, mean, var)
    assert len(basic_convs(inception_skeleton())) == 94


@pytest.mark.skipif(not os.environ.get("FASTRATIO_INCEPTION_TS"), reason="set FASTRATIO_INCEPTION_TS=path/to/default_1.pt")
def test_real_inception_features_match(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    src = os.environ["FASTRATIO_INCEPTION_TS"]
    out = tmp_path / "inception.pth"
    subprocess.run([sys.executable, "-m", "fastratio.tools.convert_inception", src, str(out)], cwd=ROOT, check=True)
    from fastratio.inception import checked_weights

    # Through the same check evaluate and the in-loop FID apply before torch-fidelity sees a file.
    fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=checked_weights(str(out)))
    ts = torch.jit.load(src, map_location="cpu").eval()
    x = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    torch.testing.assert_close(fe(x)[0], ts((x.float() - 128) / 128), rtol=1e-4, atol=1e-5)
