"""EDM snapshot import: a pickle written in EDM's persistence layout (with module source that must
never run) loads every tensor into EDMPrecond; foreign or unsafe globals are refused by name."""

import collections
import copyreg
import os
import pickle
import sys
import types

import pytest
import torch

from fastratio.edm_import import load_edm_denoiser, read_edm_pickle
from fastratio.errors import UserError
from fastratio.networks.unet import EDMPrecond

KWARGS = {
    "img_resolution": 16, "img_channels": 3, "label_dim": 2, "use_fp16": False, "sigma_min": 0, "sigma_max": float("inf"), "sigma_data": 0.5,
    "model_type": "SongUNet", "embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard",
    "channel_mult_noise": 1, "resample_filter": [1, 1], "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
    "attn_resolutions": [8], "augment_dim": 9, "dropout": 0.13,
}


@pytest.fixture
def edm_modules(monkeypatch):
    """Stand-ins for EDM's torch_utils.persistence and dnnlib.util so pickle can name them; the
    reconstruct function fails loudly if anything ever calls it."""

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("EDM reconstruction code ran")

    persistence = types.ModuleType("torch_utils.persistence")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = EasyDict
    for name, mod in {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
                      "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return persistence, EasyDict


def _write_edm_pickle(path, net, kwargs, edm_modules, marker, extra=None):
    persistence, EasyDict = edm_modules
    # EDM embeds the whole networks.py; this one would leave a marker file if it were ever executed.
    source = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\n"

    class Persistent:
        def __init__(self, class_name, state):
            self.class_name, self.state = class_name, state

        def __reduce__(self):
            meta = {"type": "class", "version": 6, "module_src": source, "class_name": self.class_name, "state": self.state}
            return persistence._reconstruct_persistent_obj, (meta,)

    class Container:
        def __init__(self, cls, state):
            self.cls, self.state = cls, state

        def __reduce__(self):
            return copyreg._reconstructor, (self.cls, object, None), self.state

    def convert(module, init_kwargs=None):
        state = dict(module.__dict__)
        state["_modules"] = collections.OrderedDict((k, convert(v)) for k, v in module._modules.items())
        if isinstance(module, torch.nn.ModuleDict):
            return Container(torch.nn.ModuleDict, state)
        state["_init_args"], state["_init_kwargs"] = (), EasyDict(init_kwargs or {})
        return Persistent(type(module).__name__, state)

    net = net.eval().requires_grad_(False)
    data = {"ema": convert(net, kwargs), "loss_fn": Persistent("EDMLoss", {"P_mean": -1.2, "P_std": 1.2}),
            "augment_pipe": None, "dataset_kwargs": {"path": "datasets/cifar10-32x32.zip"}}
    data.update(extra or {})
    with open(path, "wb") as f:
        pickle.dump(data, f)


def _edm_net():
    kwargs = {k: v for k, v in KWARGS.items() if k not in ("encoder_type", "decoder_type")}
    net = EDMPrecond(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    return net


def test_every_tensor_round_trips_and_no_code_runs(tmp_path, edm_modules):
    net, marker = _edm_net(), tmp_path / "EXECUTED"
    path = tmp_path / "network-snapshot-000100.pkl"
    _write_edm_pickle(path, net, KWARGS, edm_modules, marker)
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        del sys.modules[name]  # the reader must not need EDM's modules either
    class_name, kwargs, state = read_edm_pickle(path)
    assert class_name == "EDMPrecond" and kwargs["model_channels"] == 16
    want = net.state_dict()
    assert set(state) == set(want) and len(state) == len(want)
    for k, v in want.items():
        assert torch.equal(state[k], v), k
    loaded = load_edm_denoiser(path)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0])
    torch.testing.assert_close(loaded.eval()(x, sigma), net(x, sigma), rtol=0, atol=0)
    assert not marker.exists()


class Evil:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_malicious_global_is_refused_by_name(tmp_path, edm_modules):
    path = tmp_path / "evil.pkl"
    _write_edm_pickle(path, _edm_net(), KWARGS, edm_modules, tmp_path / "EXECUTED", extra={"payload": Evil()})
    with pytest.raises(UserError, match=r"refusing to load global (posix|os)\.system"):
        read_edm_pickle(path)


def test_unknown_class_and_bad_files_give_clear_errors(tmp_path, edm_modules):
    path = tmp_path / "unknown.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": collections.Counter()}, f)
    with pytest.raises(UserError, match=r"refusing to load global collections\.Counter"):
        read_edm_pickle(path)
    truncated = tmp_path / "truncated.pkl"
    _write_edm_pickle(truncated, _edm_net(), KWARGS, edm_modules, tmp_path / "EXECUTED")
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(UserError, match="not a readable EDM pickle"):
        read_edm_pickle(truncated)
    with pytest.raises(UserError, match="not found"):
        read_edm_pickle(tmp_path / "missing.pkl")


def test_architecture_mismatch_is_named(tmp_path, edm_modules):
    path = tmp_path / "snap.pkl"
    net = _edm_net()
    wrong = dict(KWARGS, model_channels=32)  # kwargs that disagree with the stored tensors
    _write_edm_pickle(path, net, wrong, edm_modules, tmp_path / "EXECUTED")
    with pytest.raises(UserError, match="does not fit"):
        load_edm_denoiser(path)
