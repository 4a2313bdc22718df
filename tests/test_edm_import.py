"""EDM snapshot import, tested on pickles written by NVlabs/edm's own code (tests/fixtures/edm,
made by make_fixtures.py): every released network family loads, matches EDM's outputs, runs none of
the embedded source; hostile or malformed pickles stop with one line and change nothing in the process."""

import collections
import io
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fastratio import safe_pickle
from fastratio.edm_import import load_edm_denoiser, read_edm_pickle
from fastratio.errors import UserError
from fastratio.networks.unet import EDMPrecond, VEPrecond, VPPrecond

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "edm"
OUTPUTS = torch.load(FIXTURES / "outputs.pt", weights_only=True)
FAMILIES = {
    # fixture: (released checkpoints it stands for, fastratio class, model_type, encoder_type)
    "edm-cifar10-uncond-vp": ("edm-cifar10-32x32-uncond-vp.pkl", EDMPrecond, "SongUNet", "standard"),
    "edm-cifar10-cond-vp": ("edm-cifar10-32x32-cond-vp.pkl", EDMPrecond, "SongUNet", "standard"),
    "edm-cifar10-uncond-ve": ("edm-cifar10-32x32-uncond-ve.pkl", EDMPrecond, "SongUNet", "residual"),
    "edm-cifar10-cond-ve": ("edm-cifar10-32x32-cond-ve.pkl", EDMPrecond, "SongUNet", "residual"),
    "edm-ffhq-afhqv2-uncond-vp": ("edm-{ffhq,afhqv2}-64x64-uncond-vp.pkl", EDMPrecond, "SongUNet", "standard"),
    "edm-ffhq-afhqv2-uncond-ve": ("edm-{ffhq,afhqv2}-64x64-uncond-ve.pkl", EDMPrecond, "SongUNet", "residual"),
    "edm-imagenet-cond-adm": ("edm-imagenet-64x64-cond-adm.pkl", EDMPrecond, "DhariwalUNet", None),
    "baseline-cifar10-uncond-vp": ("baseline-cifar10-32x32-uncond-vp.pkl", VPPrecond, "SongUNet", "standard"),
    "baseline-cifar10-uncond-ve": ("baseline-cifar10-32x32-uncond-ve.pkl", VEPrecond, "SongUNet", "residual"),
}


def _edm_modules_loaded() -> list[str]:
    return [m for m in sys.modules if m.split(".")[0] in ("torch_utils", "dnnlib", "training") or m.startswith("_imported_module")]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_edm_family_loads_and_matches_edm(name):
    _, cls, model_type, encoder = FAMILIES[name]
    net = load_edm_denoiser(FIXTURES / f"{name}.pkl")
    assert type(net) is cls and type(net.model).__name__ == model_type
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    if encoder is not None:
        assert net.init_kwargs["encoder_type"] == encoder
    case = OUTPUTS[name]
    with torch.no_grad():
        out = net(case["x"], case["sigma"], case["class_labels"], case["augment_labels"])
    rel = float((out - case["out"]).abs().max() / case["out"].abs().max())
    assert rel < 1e-5, f"{name}: max rel diff {rel:.2e} to EDM's own output"
    assert not _edm_modules_loaded(), "EDM's embedded code was imported"


@pytest.mark.parametrize("protocol", [0, 2])
def test_old_pickle_protocols_load_the_same_tensors(protocol):
    _, _, want = read_edm_pickle(FIXTURES / "edm-cifar10-uncond-vp.pkl")
    _, _, got = read_edm_pickle(FIXTURES / f"edm-cifar10-uncond-vp-protocol{protocol}.pkl")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_unsupported_wrapper_is_refused_by_name():
    with pytest.raises(UserError, match="EDM's iDDPMPrecond; supported teachers are EDMPrecond, VPPrecond, VEPrecond"):
        load_edm_denoiser(FIXTURES / "baseline-iddpm-refused.pkl")


def test_kwargs_and_state_of_a_real_snapshot():
    class_name, kwargs, state = read_edm_pickle(FIXTURES / "edm-cifar10-cond-ve.pkl")
    assert class_name == "EDMPrecond"
    assert kwargs["resample_filter"] == [1, 3, 3, 1] and kwargs["channel_mult_noise"] == 2 and kwargs["label_dim"] == 10
    assert "model.enc.4x4_aux_residual.weight" in state and "model.map_noise.freqs" in state


# -- hostile and malformed pickles -----------------------------------------------------------------
# Hand-assembled opcodes: these are attacks on the reader, not imitations of EDM's format.
def _str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _bytes(raw: bytes) -> bytes:
    return b"B" + len(raw).to_bytes(4, "little") + raw


def _storage_payload() -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # TypedStorage is deprecated, but it is what Tensor.__reduce__ still writes
        warnings.simplefilter("ignore", UserWarning)
        torch.save(torch.zeros(2).storage(), buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _plain(value) -> bytes:
    """A memo-free pickle fragment of plain data (no PROTO, no STOP) to splice into a hand-built one."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.fast = True
    pickler.dump(value)
    return buf.getvalue()[2:-1]


def _persistent(class_name: str, state: bytes) -> bytes:
    meta = b"}(" + _str("type") + _str("class") + _str("class_name") + _str(class_name) + _str("state") + state + b"u"
    return _global("torch_utils.persistence", "_reconstruct_persistent_obj") + meta + b"\x85R"


def _snapshot(net: bytes) -> bytes:
    return b"\x80\x02}(" + _str("ema") + net + b"u."


def _module_state(kwargs: bytes = b"}", modules: bytes = b"}") -> bytes:
    return b"}(" + _str("_init_kwargs") + kwargs + _str("_modules") + modules + b"u"


def _reference_tensors(tmp_path):
    path = tmp_path / "reference.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}, path)
    return path, torch.load(path, weights_only=True)


def _allow_listed_state():
    objs = [torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, collections.OrderedDict, set, np.ndarray]
    return [(o, getattr(o, "__defaults__", None), dict(getattr(o, "__dict__", {}))) for o in objs] + [np.dtype("f8").byteorder]


HOSTILE = {
    # Rewrites what every later torch.load returns (the example).
    "build-on-rebuild-function": b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2") + b"N}(" + _str("__defaults__")
    + b"(K\x07t" + b"u\x86b.",
    "build-on-numpy-dtype-singleton": b"\x80\x02" + _global("numpy", "dtype") + b"(" + _str("f8") + b"\x89\x89tR"
    + b"(K\x03" + _str(">") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb.",
    "setitem-on-a-global": b"\x80\x02" + _global("collections", "OrderedDict") + b"(" + _str("k") + b"K\x01u.",
    "append-to-a-global": b"\x80\x02" + _global("builtins", "set") + b"K\x01a.",
    "os-system": b"\x80\x02" + _global("os", "system") + b"(" + _str("touch MARKER") + b"tR.",
    "posix-system": b"\x80\x02" + _global("posix", "system") + b"(" + _str("touch MARKER") + b"tR.",
    "eval": b"\x80\x02" + _global("builtins", "eval") + b"(" + _str("open('MARKER','w')") + b"tR.",
    "persistent-id": b"\x80\x02" + _str("x") + b"Q.",
    "call-a-string": b"\x80\x02" + _str("os.system") + b")R.",
    "tensor-without-storage": b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2") + b"(" + _global("collections", "OrderedDict")
    + b")RK\x00K\x05\x85K\x01\x85\x89NtR.",
    # A real 2-element storage viewed as 5 elements: would read past the allocation.
    "tensor-past-its-storage": b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2") + b"(" + _global("torch.storage", "_load_from_bytes")
    + _bytes(_storage_payload()) + b"\x85RK\x00K\x05\x85K\x01\x85\x89NtR.",
    # A storage record whose payload names os.system: torch's weights-only reader refuses it with its own
    # pickle.UnpicklingError, which once escaped as a traceback.
    "storage-naming-a-refused-global": b"\x80\x02" + _global("torch.storage", "_load_from_bytes")
    + _bytes(b"\x80\x02" + _global("os", "system") + b"(" + _str("touch MARKER") + b"tR.") + b"\x85R.",
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_pickles_are_refused_and_change_nothing(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    reference, want = _reference_tensors(tmp_path)
    before = _allow_listed_state()
    path = tmp_path / f"{case}.pkl"
    path.write_bytes(HOSTILE[case])
    with pytest.raises(UserError) as err:
        read_edm_pickle(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not (tmp_path / "MARKER").exists()
    assert _allow_listed_state() == before
    got = torch.load(reference, weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)


def test_accepted_pickle_leaves_the_process_unchanged(tmp_path):
    reference, want = _reference_tensors(tmp_path)
    before = _allow_listed_state()
    load_edm_denoiser(FIXTURES / "edm-cifar10-cond-vp.pkl")
    assert _allow_listed_state() == before
    got = torch.load(reference, weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _nested_list(depth: int) -> bytes:
    return b"]" * depth + b"a" * (depth - 1)


def _cyclic_modules() -> bytes:
    # A ModuleDict (NEWOBJ, memo slot 0) whose _modules holds itself.
    container = _global("torch.nn.modules.container", "ModuleDict") + b")\x81q\x00"
    state = b"}(" + _str("_modules") + b"}(" + _str("self") + b"h\x00uu"
    return b"}(" + _str("model") + container + state + b"bu"


MALFORMED = {
    "non-record-module": (_snapshot(_persistent("EDMPrecond", _module_state(modules=_plain({"a": 5})))), ": a is a int, not a module"),
    "cyclic-modules": (_snapshot(_persistent("EDMPrecond", _module_state(modules=_cyclic_modules()))), "appears twice"),
    "kwargs-200000-deep": (
        _snapshot(_persistent("EDMPrecond", _module_state(kwargs=b"}(" + _str("x") + _nested_list(200_000) + b"u"))),
        "nested deeper than 8",
    ),
    "mixed-keys-no-ema": (b"\x80\x02" + _plain({1: "a", "b": 2}) + b".", "no EDM network under 'ema'"),
    "absurd-channels": (
        _snapshot(_persistent("EDMPrecond", _module_state(kwargs=_plain({"img_resolution": 32, "img_channels": 3, "model_type": "SongUNet", "model_channels": 30000})))),
        "model_channels=30000 outside",
    ),
    "kwargs-disagree-with-tensors": (
        _snapshot(_persistent("EDMPrecond", _module_state(kwargs=_plain({"img_resolution": 8, "img_channels": 3, "model_type": "SongUNet",
                                                                          "model_channels": 8, "channel_mult": [1]})))),
        r"does not fit .*describe [\d,]+ weights, the file holds 0",
    ),
    "truncated": (None, "not a readable EDM pickle"),
    "not-a-dict": (b"\x80\x02" + _plain([1, 2]) + b".", "not an EDM snapshot"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_pickles_give_one_line(tmp_path, case):
    data, message = MALFORMED[case]
    if data is None:
        data = (FIXTURES / "edm-cifar10-uncond-vp.pkl").read_bytes()[:5000]
    path = tmp_path / f"{case}.pkl"
    path.write_bytes(data)
    with pytest.raises(UserError, match=message) as err:
        load_edm_denoiser(path)
    assert "\n" not in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match="missing.pkl not found"):
        read_edm_pickle(tmp_path / "missing.pkl")


def test_numpy_arrays_and_scalars_read_as_fresh_data():
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    got = safe_pickle.load(pickle.dumps({"a": arr, "s": np.float64(0.5)}, protocol=2), safe_pickle.NUMPY_HANDLERS, "x")
    assert np.array_equal(got["a"], arr) and got["a"].dtype == arr.dtype and got["s"] == 0.5
    with pytest.raises(safe_pickle.UnsafePickleError, match="object arrays are refused|plain numbers only"):
        safe_pickle.load(pickle.dumps(np.array([{}], dtype=object)), safe_pickle.NUMPY_HANDLERS, "x")


@pytest.mark.parametrize("fixture,method", [("edm-cifar10-uncond-vp", "diffratio"), ("edm-cifar10-cond-ve", "vsd")])
def test_stage2_cpu_run_from_an_edm_written_pickle(tmp_path, fixture, method):
    from fastratio import config
    from fastratio.runlog import read_jsonl
    from fastratio.train import train

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", images=rng.integers(0, 256, (16, 3, 8, 8), dtype=np.uint8),
             labels=np.arange(16) % 10)
    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / "cifar10.yaml", [
        f"run.out_dir={tmp_path / 'run'}", "data.kind=npz", f"data.path={tmp_path / 'data.npz'}", f"teacher.checkpoint={FIXTURES / fixture}.pkl",
        f"method.name={method}", "run.steps=3", "run.log_every=1", "run.eval_every=3", "run.plot_every=3", "run.ckpt_every=3",
        "run.progress=false", "run.precision=fp32", "step.mode=eager", "optim.batch_size=4", "data.eval_samples=8",
        f"data.conditional={'true' if '-cond-' in fixture else 'false'}",
    ])
    run = train(cfg)
    rows = read_jsonl(run / "metrics.jsonl")
    loss = "ratio_loss" if method == "diffratio" else "fake_dsm_loss"
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r[loss]) for r in rows)
    assert (run / "ckpt-000000003.pt").is_file()


def test_sample_cli_draws_a_heun_grid_from_an_edm_pickle(tmp_path, capsys):
    from PIL import Image

    from fastratio.errors import run_cli
    from fastratio.sample import main as sample_main

    out = tmp_path / "grid.png"
    assert run_cli(sample_main, [str(FIXTURES / "edm-cifar10-cond-ve.pkl"), "--n", "4", "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size[0] >= 8 * 2 * 2  # 4 images of 8x8, enlarged
    assert run_cli(sample_main, [str(FIXTURES / "baseline-iddpm-refused.pkl"), "--n", "4", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
