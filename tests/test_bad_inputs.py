"""Bad input, table-driven: every case exits with status 2 and ONE line 'error: ...' naming the
culprit (config key, file, shape), no traceback (tracebacks only with --debug)."""

import collections
import gzip
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from testkit import idx_bytes, png_bytes

from fastratio import checkpoint
from fastratio.data.write import write_dataset_zip
from fastratio.errors import run_cli
from fastratio.sample import main as sample_main
from fastratio.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy2d.yaml")
FASHION, FASHION_TEACHER = (str(ROOT / "configs" / f"{n}.yaml") for n in ("fashion_mnist", "fashion_mnist_teacher"))
QUICK = ["run.progress=false", "run.steps=1", "run.plot_every=0", "run.eval_every=1", "data.eval_samples=4",
         "optim.batch_size=4", "teacher.sample_steps=1"]
TINY_UNET = ["model.channels=8", "model.channel_mult=[1,2]", "model.num_blocks=1", "model.attn_resolutions=[]"]


def _sets(*kv):
    return [arg for item in kv for arg in ("--set", item)]


class Evil:
    def __reduce__(self):
        return os.system, ("echo pwned",)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real-format fixtures, some good (a teacher, a stage-2 run) and most broken."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes((np.arange(12) % 3).astype(np.uint8))))
    (d / "bad-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 12)
    np.savez(d / "rgb16.npz", images=rng.integers(0, 256, size=(6, 3, 16, 16), dtype=np.uint8))
    np.savez(d / "rgb28.npz", images=rng.integers(0, 256, size=(6, 3, 28, 28), dtype=np.uint8))
    np.savez(d / "neg_labels.npz", images=rng.integers(0, 256, size=(2, 1, 8, 8), dtype=np.uint8), labels=np.array([0, -3]))
    np.savez(d / "five_classes.npz", images=rng.integers(0, 256, size=(5, 1, 28, 28), dtype=np.uint8), labels=np.arange(5))
    (d / "empty").mkdir()
    (d / "nonsquare").mkdir()
    (d / "nonsquare" / "a.png").write_bytes(png_bytes(np.zeros((8, 12), np.uint8)))
    (d / "mixed").mkdir()
    (d / "mixed" / "a.png").write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    (d / "mixed" / "b.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    (d / "cifar.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 definitely not a tarball")
    with tarfile.open(d / "wrong.tar.gz", "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("readme.txt"), io.BytesIO(b""))
    (d / "evil.pkl").write_bytes(pickle.dumps({"ema": Evil()}))
    (d / "unknown.pkl").write_bytes(pickle.dumps({"ema": collections.Counter()}))
    # A snapshot written by EDM's own code (tests/fixtures/edm), cut short as by an interrupted download.
    (d / "truncated.pkl").write_bytes((Path(__file__).parent / "fixtures" / "edm" / "edm-cifar10-uncond-vp.pkl").read_bytes()[:20000])
    (d / "bad.yaml").write_text("run: [unclosed\n")
    (d / "list.yaml").write_text("- a\n- b\n")

    teacher_run = d / "teacher"
    assert train_main([FASHION_TEACHER, *_sets(*QUICK, *TINY_UNET, f"run.out_dir={teacher_run}",
                                               f"data.path={d / 'train-images-idx3-ubyte.gz'}", "data.conditional=true")]) == 0
    teacher = checkpoint.list_checkpoints(teacher_run)[-1]
    stage2 = d / "stage2"
    assert train_main([FASHION, *_sets(*QUICK, *TINY_UNET, f"run.out_dir={stage2}", f"teacher.checkpoint={teacher}",
                                       f"data.path={d / 'train-images-idx3-ubyte.gz'}", "data.conditional=true")]) == 0
    toy = d / "toy"
    assert train_main([TOY, *_sets(*QUICK, f"run.out_dir={toy}", "model.gen_hidden=16", "model.ratio_hidden=16")]) == 0
    out = {"dir": d, "teacher": teacher, "stage2": checkpoint.list_checkpoints(stage2)[-1],
           "toy_ckpt": checkpoint.list_checkpoints(toy)[-1], "toy_run": toy}
    _broken_files(d, out, rng)
    return out


def _zip_with_patch(path, members, patch=None):
    """A zip written by zipfile, then ``patch(bytearray)`` applied to its bytes."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    raw = bytearray(path.read_bytes())
    if patch:
        patch(raw)
    path.write_bytes(bytes(raw))


def _set_member_field(raw, local_offset, central_offset, value):
    """Overwrite a 2-byte field of the first member in its local header and central directory entry."""
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    struct.pack_into("<H", raw, local + local_offset, value)
    struct.pack_into("<H", raw, central + central_offset, value)


def _png_claiming(width, height):
    """A real PNG whose IHDR (with a correct CRC) claims width x height."""
    raw = bytearray(png_bytes(np.zeros((4, 4), np.uint8)))
    ihdr = raw.find(b"IHDR")
    struct.pack_into(">II", raw, ihdr + 4, width, height)
    struct.pack_into(">I", raw, ihdr + 17, zlib.crc32(bytes(raw[ihdr : ihdr + 17])))
    return bytes(raw)


def _broken_files(d, out, rng):
    """Broken inputs for the extended table: each is the real format with one thing wrong."""
    img = png_bytes(rng.integers(0, 256, size=(28, 28), dtype=np.uint8))
    labels = json.dumps({"labels": [["a.png", 0]]}).encode()
    _zip_with_patch(d / "badcrc.zip", {"a.png": img, "dataset.json": labels},
                    lambda raw: raw.__setitem__(raw.find(b"IDAT") + 8, raw[raw.find(b"IDAT") + 8] ^ 0xFF))
    _zip_with_patch(d / "encrypted.zip", {"a.png": img}, lambda raw: _set_member_field(raw, 6, 8, 0x1))
    _zip_with_patch(d / "method99.zip", {"a.png": img}, lambda raw: _set_member_field(raw, 8, 10, 99))
    for name, meta in {"labels_mapping": {"labels": {"a.png": 0}}, "labels_types": {"labels": [[1, 2]]}}.items():
        (d / name).mkdir()
        (d / name / "a.png").write_bytes(img)
        (d / name / "dataset.json").write_text(json.dumps(meta))
    (d / "labels_nojson").mkdir()
    (d / "labels_nojson" / "a.png").write_bytes(img)
    (d / "labels_nojson" / "dataset.json").write_text("{labels: nope")
    (d / "bomb_png").mkdir()
    (d / "bomb_png" / "a.png").write_bytes(_png_claiming(100_000, 100_000))
    (d / "corrupt_png").mkdir()
    (d / "corrupt_png" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    # Streaming: dataset_tool-layout zips; one member of six has a flipped byte (found mid-run by a worker).
    grey = rng.integers(0, 256, size=(6, 1, 28, 28), dtype=np.uint8)
    write_dataset_zip(d / "stream_nolabels.zip", grey)
    stream_bad = bytearray(write_dataset_zip(d / "stream_corrupt.zip", grey, [0, 1, 2, 0, 1, 2]).read_bytes())
    member = stream_bad.find(b"00000/img00000003.png") + len("00000/img00000003.png") + 60
    stream_bad[member] ^= 0xFF
    (d / "stream_corrupt.zip").write_bytes(bytes(stream_bad))
    write_dataset_zip(d / "latents.zip", rng.standard_normal((4, 1, 28, 28)).astype(np.float32))
    write_dataset_zip(d / "latents2.zip", rng.standard_normal((4, 2, 28, 28)).astype(np.float32))
    (d / "evil-ref.pkl").write_bytes(pickle.dumps({"fid": {"mu": Evil(), "sigma": 0}}))
    (d / "rank200-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 200]) + b"\x00\x00\x00\x01" * 200)
    (d / "overflow-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + b"\xff\xff\xff\xff" * 3 + b"\x00" * 64)
    good = gzip.compress(idx_bytes(rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)))
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 16] = b"\xff" * 16
    (d / "deflate-images-idx3-ubyte.gz").write_bytes(bytes(corrupt))
    # A gzip bomb: the header promises 2x28x28 bytes, the stream inflates to 64 MB.
    (d / "bomb-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8)) + bytes(64 << 20)))
    np.savez(d / "huge_classes.npz", images=rng.integers(0, 256, size=(2, 1, 28, 28), dtype=np.uint8), labels=np.array([0, 10**12]))
    (d / "empty.npz").write_bytes(b"")
    np.savez(d / "noimages.npz", x=np.zeros(3))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10**12,)})
    with zipfile.ZipFile(d / "hugeheader.npz", "w") as z:
        z.writestr("images.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"\x00" * 16)
    with tarfile.open(d / "evil-cifar.tar.gz", "w:gz") as tar:
        payload = pickle.dumps({b"data": Evil()}, protocol=2)
        for k in range(1, 6):
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{k}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (d / "nonutf8.yaml").write_bytes(b"run:\n  out_dir: \xff\xfe\n")
    (d / "deep.yaml").write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    (d / "dupes.yaml").write_text("optim:\n  gen_lr: 1.0e-3\n  gen_lr: 1.0e-5\n")
    (d / "emptykey.yaml").write_text('"": 3\n')
    (d / "huge.yaml").write_text("#" * (2 << 20))
    (d / "a_file").write_text("x")
    # Checkpoints with one thing wrong.
    torch.save(torch.zeros(3), d / "bare-tensor.pt")
    (d / "text.pt").write_text("not a checkpoint")
    state = checkpoint.load(out["toy_ckpt"])
    for group in state["optimizers"]["generator"]["state"].values():
        group["exp_avg"] = torch.zeros(7)
    torch.save(state, d / "badopt.pt")
    teacher = checkpoint.load(out["teacher"])
    torch.save({**teacher, "network_kwargs": {**teacher["network_kwargs"], "bogus": 1}}, d / "unknown-kwarg.pt")
    torch.save({**teacher, "network_kwargs": {**teacher["network_kwargs"], "model_channels": 30000}}, d / "absurd-kwargs.pt")
    raw = bytearray(out["teacher"].read_bytes())
    raw[len(raw) // 2] ^= 0x40
    (d / "flipped.pt").write_bytes(bytes(raw))
    stage2 = checkpoint.load(out["stage2"])
    torch.save({**stage2, "ratio_kwargs": {**stage2["ratio_kwargs"], "model_channels": 32}}, d / "bad-ratio.pt")
    torch.save({**stage2, "network_kwargs": {**stage2["network_kwargs"], "bogus": 1}}, d / "bad-gen-kwargs.pt")
    edm = Path(__file__).parent / "fixtures" / "edm"
    out["iddpm"] = edm / "baseline-iddpm-refused.pkl"
    from test_edm_import import HOSTILE, MALFORMED

    for name in ("build-on-rebuild-function", "tensor-past-its-storage"):
        (d / f"{name}.pkl").write_bytes(HOSTILE[name])
    for name in ("cyclic-modules", "kwargs-200000-deep", "mixed-keys-no-ema", "non-record-module"):
        (d / f"{name}.pkl").write_bytes(MALFORMED[name][0])
    (d / "storage-naming-a-refused-global.pkl").write_bytes(HOSTILE["storage-naming-a-refused-global"])
    # Issue 29: what a file says, bounded before use; the two data sources alike.
    from test_stream import _zip_claiming

    for name, labels in {"label_minus_one": [0, 1, -1, 0, 1, 2], "label_2_70": [0, 1, 2**70, 0, 1, 2]}.items():
        write_dataset_zip(d / f"{name}.zip", grey, labels)
    raw = write_dataset_zip(d / "stream_ok.zip", grey, [0, 1, 2, 0, 1, 2]).read_bytes()
    (d / "zip64_claim.zip").write_bytes(_zip_claiming(raw, "00000/img00000000.png", 2**40))
    write_dataset_zip(d / "float128.zip", np.zeros((4, 2, 28, 28), np.longdouble))
    write_dataset_zip(d / "empty_latents.zip", np.zeros((4, 8, 0, 0), np.float32))
    row = [0.0] * (1 << 16)
    (d / "memo-rows-ref.pkl").write_bytes(pickle.dumps({"fid": {"mu": [0.0] * 4, "sigma": [row] * (1 << 18)}}))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
    with zipfile.ZipFile(d / "huge-sigma-ref.npz", "w") as z:
        z.writestr("mu.npy", _npy(np.zeros(4)))
        z.writestr("sigma.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"\x00" * 64)
    torch.save({**teacher, "data": {"position": 1.5, "size": 6}}, d / "fractional-position.pt")
    torch.save({**checkpoint.load(out["toy_ckpt"]), "step": 1.5}, d / "fractional-step.pt")
    victim = d / "victim.txt"
    victim.write_text("precious")
    for name, make in {"lock_hardlink": lambda lock: os.link(victim, lock), "lock_fifo": os.mkfifo}.items():
        (d / name).mkdir()
        make(d / name / ".lock")
    # torch-fidelity inputs.
    torch.save(Evil(), d / "evil-inception.pth")
    torch.save({"conv.weight": torch.zeros(3)}, d / "wrong-inception.pth")
    # TorchScript archives: a real one (saved by TorchScript) with its data.pkl replaced.
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(d / "ts.pt"))
    with zipfile.ZipFile(d / "ts.pt") as src, zipfile.ZipFile(d / "ts-evil.pt", "w") as dst:
        for item in src.infolist():
            dst.writestr(item, pickle.dumps(Evil(), protocol=2) if item.filename.endswith("/data.pkl") else src.read(item))


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _image(files, kind, path, *extra):
    """A stage-2 Fashion-MNIST command on the given data, from the fixture teacher."""
    return [FASHION, *_sets(*QUICK, *TINY_UNET, f"data.kind={kind}", f"data.path={path}",
                            f"teacher.checkpoint={files['teacher']}", "run.out_dir=" + str(files["dir"] / "out"), *extra)]


# (id, argv builder, env, expected culprit in the message)
CASES = [
    ("unknown key", lambda f: [TOY, *_sets("optim.lr=1")], {}, "optim.lr: unknown key"),
    ("wrong type", lambda f: [TOY, *_sets("optim.batch_size=abc")], {}, "optim.batch_size: expected int"),
    ("negative batch", lambda f: [TOY, *_sets("optim.batch_size=-4")], {}, "optim.batch_size: must be > 0"),
    ("bad choice", lambda f: [TOY, *_sets("method.objective=fid")], {}, "method.objective: 'fid' is not one of"),
    ("missing config", lambda f: [str(f["dir"] / "nope.yaml")], {}, "nope.yaml: config file not found"),
    ("malformed yaml", lambda f: [str(f["dir"] / "bad.yaml")], {}, "bad.yaml: not valid YAML"),
    ("yaml not a mapping", lambda f: [str(f["dir"] / "list.yaml")], {}, "list.yaml: top level must be a mapping"),
    ("arch vs data", lambda f: [TOY, *_sets("model.arch=ddpmpp")], {}, "model.arch: 'ddpmpp' does not fit data.kind 'toy2d'"),
    ("augment without labels", lambda f: [FASHION, *_sets("augment.p=0.2")], {}, "model.augment_dim"),
    ("stage 2 without teacher", lambda f: [FASHION, *_sets("teacher.checkpoint=")], {}, "teacher.checkpoint: image stage 2"),
    ("missing dataset", lambda f: _image(f, "cifar10", f["dir"] / "cifar-10-python.tar.gz"), {}, "data.path: .*cifar-10-python.tar.gz not found; download"),
    ("corrupt tarball", lambda f: _image(f, "cifar10", f["dir"] / "cifar.tar.gz"), {}, "cifar.tar.gz: corrupt or unreadable tarball"),
    ("tarball without batches", lambda f: _image(f, "cifar10", f["dir"] / "wrong.tar.gz"), {}, "wrong.tar.gz: no data_batch_1 inside"),
    ("empty dataset", lambda f: _image(f, "folder", f["dir"] / "empty"), {}, "empty: no images"),
    ("mixed channels", lambda f: _image(f, "folder", f["dir"] / "mixed"), {}, r"b.png: image shape \(3, 8, 8\) differs"),
    ("non-square images", lambda f: _image(f, "folder", f["dir"] / "nonsquare"), {}, "data.path: images are 8x12"),
    ("bad IDX", lambda f: _image(f, "idx", f["dir"] / "bad-images-idx3-ubyte"), {}, "bad-images-idx3-ubyte: not an unsigned-byte IDX"),
    ("negative labels", lambda f: _image(f, "npz", f["dir"] / "neg_labels.npz"), {}, "neg_labels.npz: labels must be non-negative"),
    ("wrong image size", lambda f: _image(f, "npz", f["dir"] / "rgb16.npz"), {}, r"teacher.checkpoint: teacher is for 1x28\^2 images with 3 classes, data are 3x16\^2"),
    ("wrong channel count", lambda f: _image(f, "npz", f["dir"] / "rgb28.npz"), {}, r"teacher is for 1x28\^2 .* data are 3x28\^2"),
    ("labels out of the teacher's range", lambda f: _image(f, "npz", f["dir"] / "five_classes.npz", "data.conditional=true"), {}, "3 classes, data are 1x28\\^2 with 5"),
    ("conditional without labels", lambda f: _image(f, "npz", f["dir"] / "rgb28.npz", "data.conditional=true"), {}, "data.conditional: .*rgb28.npz has no labels"),
    ("too many resolutions", lambda f: _image(f, "idx", f["dir"] / "train-images-idx3-ubyte.gz", "model.channel_mult=[1,2,2,2]"), {}, "model.channel_mult: 4 resolutions"),
    ("missing teacher", lambda f: _image(f, "idx", f["dir"] / "train-images-idx3-ubyte.gz", "teacher.checkpoint=" + str(f["dir"] / "t.pt")), {}, "teacher.checkpoint: .*t.pt not found"),
    ("stage-2 file as teacher", lambda f: _image(f, "idx", f["dir"] / "train-images-idx3-ubyte.gz", f"teacher.checkpoint={f['stage2']}"), {}, "is not from a teacher run"),
    ("malicious EDM pickle", lambda f: _image(f, "idx", f["dir"] / "train-images-idx3-ubyte.gz", "teacher.checkpoint=" + str(f["dir"] / "evil.pkl")), {}, r"evil.pkl: refusing to load global (posix|os)\.system"),
    ("unknown global in EDM pickle", lambda f: _image(f, "idx", f["dir"] / "train-images-idx3-ubyte.gz", "teacher.checkpoint=" + str(f["dir"] / "unknown.pkl")), {}, r"refusing to load global collections\.Counter"),
    ("truncated EDM pickle", lambda f: _image(f, "idx", f["dir"] / "train-images-idx3-ubyte.gz", "teacher.checkpoint=" + str(f["dir"] / "truncated.pkl")), {}, "truncated.pkl: not a readable EDM pickle"),
    ("checkpoint of another architecture", lambda f: [TOY, *_sets(*QUICK, "run.out_dir=" + str(f["dir"] / "other"), "model.score_hidden=24"), "--resume", str(f["toy_ckpt"])], {}, "ckpt-000000001.pt: checkpoint does not match this config"),
    ("missing resume file", lambda f: [TOY, "--resume", str(f["dir"] / "gone.pt")], {}, "--resume: checkpoint .*gone.pt not found"),
    ("run folder in use", lambda f: [TOY, *_sets(*QUICK, "run.out_dir=" + str(f["toy_run"]))], {}, "run.out_dir: .* already holds checkpoints"),
    ("bad kernel switch", lambda f: [TOY, *_sets(*QUICK, "run.out_dir=" + str(f["dir"] / "k"))], {"FASTRATIO_KERNELS": "cuda-magic"}, "FASTRATIO_KERNELS: 'cuda-magic' is not one of"),
]
_IDX = lambda f: ("idx", f["dir"] / "train-images-idx3-ubyte.gz")
_D = lambda f, name: str(f["dir"] / name)
CASES += [
    # config files and overrides
    ("config not UTF-8", lambda f: [_D(f, "nonutf8.yaml")], {}, "nonutf8.yaml: not UTF-8 text"),
    ("config nested 100000 deep", lambda f: [_D(f, "deep.yaml")], {}, "deep.yaml: nested deeper than 32 levels"),
    ("config duplicate key", lambda f: [_D(f, "dupes.yaml")], {}, "dupes.yaml: duplicate key 'gen_lr' \\(line 3\\)"),
    ("config empty key", lambda f: [_D(f, "emptykey.yaml")], {}, "config: empty or non-text key ''"),
    ("config file of megabytes", lambda f: [_D(f, "huge.yaml")], {}, "huge.yaml: .* bytes is not a config file"),
    ("override without =", lambda f: [TOY, "--set", "optim.gen_lr"], {}, "--set 'optim.gen_lr': expected key=value"),
    ("override with an empty key", lambda f: [TOY, "--set", "=3"], {}, "--set '=3': empty key"),
    ("override with an empty part", lambda f: [TOY, "--set", "optim..gen_lr=3"], {}, "empty key"),
    ("infinite learning rate", lambda f: [TOY, *_sets("optim.gen_lr=inf")], {}, "optim.gen_lr: must be a finite number, got inf"),
    ("NaN noise level", lambda f: [TOY, *_sets("noise.sigma_max=nan")], {}, "noise.sigma_max: must be a finite number"),
    ("seed beyond 2^63", lambda f: [TOY, *_sets(f"run.seed={2**70}")], {}, "run.seed: .* above the largest accepted value"),
    ("negative seed", lambda f: [TOY, *_sets("run.seed=-1")], {}, "run.seed: must be >= 0"),
    ("batch of a billion", lambda f: [TOY, *_sets("optim.batch_size=1000000000")], {}, "optim.batch_size: 1000000000 is above"),
    ("steps beyond any run", lambda f: [TOY, *_sets("run.steps=100000000000")], {}, "run.steps: .* is above"),
    ("dropout above 1", lambda f: [FASHION, *_sets("model.dropout=1.5")], {}, "model.dropout: .* above the largest accepted value 1.0"),
    ("dropout of 1", lambda f: [FASHION, *_sets("model.dropout=1.0")], {}, "model.dropout: a probability below 1"),
    ("empty out_dir", lambda f: [TOY, *_sets("run.out_dir=")], {}, "run.out_dir: empty"),
    ("twenty resolutions", lambda f: [FASHION, *_sets("model.channel_mult=[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]")], {}, "model.channel_mult: .* more than 12 levels"),
    ("sigma range reversed", lambda f: [TOY, *_sets("noise.sigma_min=5", "noise.sigma_max=1")], {}, "noise.sigma_min: 5.0 must be below noise.sigma_max"),
    ("Adam beta of 1", lambda f: [TOY, *_sets("optim.beta2=1")], {}, "optim.beta1/optim.beta2"),
    ("GAN term without a ratio net", lambda f: [TOY, *_sets("method.name=vsd", "method.gan_weight=1")], {}, "method.gan_weight"),
    ("augment probability above 1", lambda f: [FASHION, *_sets("augment.p=1.5", "model.augment_dim=9")], {}, "augment.p: a probability"),
    ("graph mode without warm-up", lambda f: [TOY, *_sets("step.mode=graph", "step.warmup_steps=0")], {}, "step.warmup_steps"),
    ("unknown command-line flag", lambda f: [TOY, "--bogus"], {}, "python -m fastratio.train: unrecognized arguments: --bogus"),
    # run folder
    ("out_dir is a file", lambda f: [TOY, *_sets(*QUICK, "run.out_dir=" + _D(f, "a_file"))], {}, "run.out_dir: .*a_file exists and is not a folder"),
    ("out_dir below a file", lambda f: [TOY, *_sets(*QUICK, "run.out_dir=" + _D(f, "a_file") + "/run")], {}, "run.out_dir: cannot use .*a_file/run"),
    # datasets
    ("IDX of rank 200", lambda f: _image(f, "idx", f["dir"] / "rank200-images-idx3-ubyte"), {}, "rank200-images-idx3-ubyte: IDX rank 200"),
    ("IDX dims overflowing int64", lambda f: _image(f, "idx", f["dir"] / "overflow-images-idx3-ubyte"), {}, "IDX header claims"),
    ("IDX corrupt deflate stream", lambda f: _image(f, "idx", f["dir"] / "deflate-images-idx3-ubyte.gz"), {}, "deflate-images-idx3-ubyte.gz: unreadable"),
    ("IDX gzip bomb", lambda f: _image(f, "idx", f["dir"] / "bomb-images-idx3-ubyte.gz"), {}, "bomb-images-idx3-ubyte.gz: header says .* more follow"),
    ("/dev/zero as data", lambda f: _image(f, "idx", "/dev/zero"), {}, "data.path: /dev/zero is not a regular file or folder"),
    ("zip member with a bad CRC", lambda f: _image(f, "folder", f["dir"] / "badcrc.zip"), {}, "badcrc.zip/a.png: corrupt zip member"),
    ("encrypted zip member", lambda f: _image(f, "folder", f["dir"] / "encrypted.zip"), {}, "encrypted.zip/a.png: encrypted zip member"),
    ("unknown zip compression", lambda f: _image(f, "folder", f["dir"] / "method99.zip"), {}, "method99.zip/a.png: zip compression method 99"),
    ("dataset.json labels as a mapping", lambda f: _image(f, "folder", f["dir"] / "labels_mapping"), {}, "dataset.json: 'labels' must be a list of \\[path, class\\] pairs"),
    ("dataset.json labels of wrong types", lambda f: _image(f, "folder", f["dir"] / "labels_types"), {}, "dataset.json: 'labels' must be a list"),
    ("dataset.json not JSON", lambda f: _image(f, "folder", f["dir"] / "labels_nojson"), {}, "dataset.json: expected"),
    ("PNG claiming 10^10 pixels", lambda f: _image(f, "folder", f["dir"] / "bomb_png"), {}, "a.png: 100000x100000 pixels is more than an image dataset holds"),
    ("corrupt PNG", lambda f: _image(f, "folder", f["dir"] / "corrupt_png"), {}, "a.png: cannot decode image"),
    ("10^12 classes", lambda f: _image(f, "npz", f["dir"] / "huge_classes.npz", "data.conditional=true"), {}, "huge_classes.npz: label 1000000000000 implies"),
    ("empty npz file", lambda f: _image(f, "npz", f["dir"] / "empty.npz"), {}, "empty.npz: not a readable .npz"),
    ("npz without images", lambda f: _image(f, "npz", f["dir"] / "noimages.npz"), {}, "noimages.npz: no 'images' array"),
    ("npz header of 10^12 elements", lambda f: _image(f, "npz", f["dir"] / "hugeheader.npz"), {}, "hugeheader.npz: images header says \\(1000000000000,\\)"),
    ("stream without a path", lambda f: _image(f, "folder", "", "data.source=stream"), {}, r"data.path: \(empty\) not found; set data.path to a folder of images or an EDM dataset_tool.py zip"),
    ("stream of /dev/zero", lambda f: _image(f, "folder", "/dev/zero", "data.source=stream"), {}, "data.path: /dev/zero is not a regular file or folder"),
    ("stream of an npz", lambda f: _image(f, "npz", f["dir"] / "rgb16.npz", "data.source=stream"), {}, "data.source: 'stream' reads image folders"),
    ("streamed member corrupt mid-run", lambda f: _image(f, "folder", f["dir"] / "stream_corrupt.zip", "data.source=stream", "data.workers=1", "data.conditional=true", "optim.batch_size=6"), {},
     r"stream_corrupt.zip/00000/img00000003.png: corrupt zip member .*set data.skip_corrupt=true"),
    ("conditional stream without labels", lambda f: _image(f, "folder", f["dir"] / "stream_nolabels.zip", "data.source=stream", "data.conditional=true"), {}, "data.conditional: .*stream_nolabels.zip has no labels"),
    ("folder above the memory budget", lambda f: _image(f, "folder", f["dir"] / "stream_nolabels.zip", "data.memory_budget_gb=0.000001"), {}, "data.memory_budget_gb: .*above the budget .*data.source=stream"),
    ("latents of an odd channel count", lambda f: _image(f, "folder", f["dir"] / "latents.zip", "data.source=stream"), {}, "latents.zip holds float arrays of 1 channels"),
    ("latent run without a VAE", lambda f: _image(f, "folder", f["dir"] / "latents2.zip", "run.plot_every=1"), {}, "data.vae: a latent run decodes its samples"),
    ("latent run with a missing VAE", lambda f: _image(f, "folder", f["dir"] / "latents2.zip", "run.plot_every=1", "data.vae=" + _D(f, "no-vae")), {}, "data.vae: cannot load an AutoencoderKL from the name"),
    ("latent FID without reference statistics", lambda f: _image(f, "folder", f["dir"] / "latents2.zip", "eval.fid_samples=8", "data.vae=x"), {}, "eval.fid_ref: a latent set holds no pixels"),
    ("malicious FID reference statistics", lambda f: _image(f, *_IDX(f), "eval.fid_samples=8", "eval.fid_ref=" + _D(f, "evil-ref.pkl")), {}, "eval.fid_ref: .*evil-ref.pkl is not reference statistics readable as data"),
    ("EDM2 preset on an EDM network", lambda f: _image(f, *_IDX(f), "model.size=xs"), {}, "model.size: presets are EDM2's; model.arch is 'ddpmpp'"),
    ("released teacher without a size", lambda f: _image(f, *_IDX(f), "teacher.checkpoint=checkpoints/{release}"), {}, "teacher.checkpoint: \\{release\\} names the released EDM2 pickle of model.size"),
    ("EDM2 loss on an EDM network", lambda f: [FASHION_TEACHER, *_sets(*QUICK, "teacher.loss=edm2")], {}, "teacher.loss: 'edm2' with model.arch 'ddpmpp'"),
    ("malicious CIFAR batch", lambda f: _image(f, "cifar10", f["dir"] / "evil-cifar.tar.gz"), {}, r"data_batch_1: refusing to load global (posix|os)\.system"),
    # checkpoints
    ("resume of a bare tensor", lambda f: [TOY, *_sets(*QUICK, "run.out_dir=" + _D(f, "r1")), "--resume", _D(f, "bare-tensor.pt")], {}, "--resume: cannot read checkpoint .*bare-tensor.pt"),
    ("resume of a text file", lambda f: [TOY, *_sets(*QUICK, "run.out_dir=" + _D(f, "r2")), "--resume", _D(f, "text.pt")], {}, "--resume: cannot read checkpoint .*text.pt"),
    ("resume with optimizer state of another shape", lambda f: [TOY, *_sets(*QUICK, "run.out_dir=" + _D(f, "r3"), "model.gen_hidden=16", "model.ratio_hidden=16"), "--resume", _D(f, "badopt.pt")], {}, "badopt.pt: optimizer state generator.exp_avg is \\(7,\\)"),
    ("resume under another method", lambda f: [TOY, *_sets(*QUICK, "run.out_dir=" + _D(f, "r4"), "model.gen_hidden=16", "model.ratio_hidden=16", "method.name=vsd"), "--resume", str(f["toy_ckpt"])], {}, "written by method.name=diffratio; this config has method.name=vsd"),
    ("teacher with an unknown kwarg", lambda f: _image(f, *_IDX(f), "teacher.checkpoint=" + _D(f, "unknown-kwarg.pt")), {}, "unknown-kwarg.pt weights do not fit its own network_kwargs .*bogus"),
    ("teacher with absurd kwargs", lambda f: _image(f, *_IDX(f), "teacher.checkpoint=" + _D(f, "absurd-kwargs.pt")), {}, "model_channels=30000 outside"),
    ("teacher of a bare tensor", lambda f: _image(f, *_IDX(f), "teacher.checkpoint=" + _D(f, "bare-tensor.pt")), {}, "teacher.checkpoint: cannot read checkpoint"),
    ("teacher with a flipped bit", lambda f: _image(f, *_IDX(f), "teacher.checkpoint=" + _D(f, "flipped.pt")), {}, "teacher.checkpoint: cannot read checkpoint .*flipped.pt"),
    ("EDM iDDPM teacher", lambda f: _image(f, *_IDX(f), f"teacher.checkpoint={f['iddpm']}"), {}, "the network is EDM's iDDPMPrecond"),
    ("EDM pickle writing into torch", lambda f: _image(f, *_IDX(f), "teacher.checkpoint=" + _D(f, "build-on-rebuild-function.pkl")), {}, "BUILD on a Global refused"),
    ("EDM pickle reading past a storage", lambda f: _image(f, *_IDX(f), "teacher.checkpoint=" + _D(f, "tensor-past-its-storage.pkl")), {}, "reaches past its storage"),
    ("EDM pickle with cyclic modules", lambda f: _image(f, *_IDX(f), "teacher.checkpoint=" + _D(f, "cyclic-modules.pkl")), {}, "appears twice in the module tree"),
    ("EDM pickle with 200000-deep kwargs", lambda f: _image(f, *_IDX(f), "teacher.checkpoint=" + _D(f, "kwargs-200000-deep.pkl")), {}, "nested deeper than 8 levels"),
    ("EDM pickle without ema", lambda f: _image(f, *_IDX(f), "teacher.checkpoint=" + _D(f, "mixed-keys-no-ema.pkl")), {}, "no EDM network under 'ema'"),
    ("EDM pickle with a non-module", lambda f: _image(f, *_IDX(f), "teacher.checkpoint=" + _D(f, "non-record-module.pkl")), {}, "a is a int, not a module"),
    # issue 29: the two data sources alike, what a file says bounded before use, the run lock hostile
    ("streamed label -1", lambda f: _image(f, "folder", f["dir"] / "label_minus_one.zip", "data.source=stream", "data.conditional=true"), {},
     r"label_minus_one.zip: labels must be non-negative integers \(got int, min -1\)"),
    ("streamed label 2^70", lambda f: _image(f, "folder", f["dir"] / "label_2_70.zip", "data.source=stream", "data.conditional=true"), {},
     "label_2_70.zip: label 1180591620717411303424 implies"),
    ("label 2^70 in memory", lambda f: _image(f, "folder", f["dir"] / "label_2_70.zip", "data.conditional=true"), {},
     "label_2_70.zip: label 1180591620717411303424 implies"),
    ("zip directory claiming 2^40 bytes", lambda f: _image(f, "folder", f["dir"] / "zip64_claim.zip", "data.source=stream"), {},
     "zip64_claim.zip/00000/img00000000.png: claims 1099511627776 bytes compressed"),
    ("streamed float128 latents", lambda f: _image(f, "folder", f["dir"] / "float128.zip", "data.source=stream"), {},
     r"float128.zip/00000/img-mean-std-00000000.npy: expected a \[C, H, W\] array of uint8, float16, float32, float64 .*float128"),
    ("empty latents in memory", lambda f: _image(f, "folder", f["dir"] / "empty_latents.zip"), {},
     r"empty_latents.zip/00000/img-mean-std-00000000.npy: expected .*with no empty axis, got float32 \(8, 0, 0\)"),
    ("FID statistics of 2^18 references to one row", lambda f: _image(f, *_IDX(f), "eval.fid_samples=8", "eval.fid_ref=" + _D(f, "memo-rows-ref.pkl")), {},
     "eval.fid_ref: .*memo-rows-ref.pkl is not reference statistics .*262144 items where 4 are expected"),
    ("FID statistics npz claiming 10^12 floats", lambda f: _image(f, *_IDX(f), "eval.fid_samples=8", "eval.fid_ref=" + _D(f, "huge-sigma-ref.npz")), {},
     r"huge-sigma-ref.npz: sigma header says \(1000000, 1000000\)"),
    ("EDM pickle whose storage names a refused global", lambda f: _image(f, *_IDX(f), "teacher.checkpoint=" + _D(f, "storage-naming-a-refused-global.pkl")), {},
     r"storage payload refused by torch's weights-only reader \(Trying to load unsupported GLOBAL os.system"),
    ("resume at a fractional data position", lambda f: [FASHION_TEACHER, *_sets(*QUICK, *TINY_UNET, "run.out_dir=" + _D(f, "r5"), "data.kind=folder",
                                                                      "data.path=" + _D(f, "stream_ok.zip"), "data.source=stream",
                                                                      "data.conditional=true"), "--resume", _D(f, "fractional-position.pt")], {},
     "fractional-position.pt: data position 1.5 is not a non-negative integer"),
    ("resume at a fractional step", lambda f: [TOY, *_sets(*QUICK, "run.out_dir=" + _D(f, "r6"), "model.gen_hidden=16", "model.ratio_hidden=16"),
                                               "--resume", _D(f, "fractional-step.pt")], {}, "fractional-step.pt: step 1.5 is not a non-negative integer"),
    ("run lock hard-linked to another file", lambda f: [TOY, *_sets(*QUICK, "run.out_dir=" + _D(f, "lock_hardlink"))], {},
     "run.out_dir: cannot use .*lock_hardlink: .lock is a hard link shared with another file"),
    ("run lock that is a FIFO", lambda f: [TOY, *_sets(*QUICK, "run.out_dir=" + _D(f, "lock_fifo"))], {},
     r"run.out_dir: cannot use .*lock_fifo: .lock is not a regular file"),
    # in-loop evaluation
    ("missing in-loop Inception weights", lambda f: _image(f, *_IDX(f), "eval.fid_samples=8", "eval.inception=" + _D(f, "none.pth")), {}, "eval.inception: .*none.pth not found"),
    ("malicious in-loop Inception weights", lambda f: _image(f, *_IDX(f), "eval.fid_samples=8", "eval.inception=" + _D(f, "evil-inception.pth")), {}, "eval.inception: .*evil-inception.pth is not a weights file readable as data"),
]

# (id, argv builder, culprit) for the other command-line tools
SAMPLE_CASES = [
    ("missing checkpoint", lambda f: [_D(f, "none.pt")], "none.pt: checkpoint not found"),
    ("toy checkpoint", lambda f: [str(f["toy_ckpt"])], "not an image-run checkpoint"),
    ("class out of range", lambda f: [str(f["stage2"]), "--class", "7"], "--class: 7 outside \\[0, 3\\)"),
    ("zero steps", lambda f: [str(f["teacher"]), "--steps", "0"], "--steps: must be >= 1, got 0"),
    ("zero images", lambda f: [str(f["stage2"]), "--n", "0"], "--n: must be > 0"),
    ("best of zero", lambda f: [str(f["stage2"]), "--best-of", "0"], "--best-of: must be >= 1"),
    ("best-of on a teacher", lambda f: [str(f["teacher"]), "--best-of", "4"], "--best-of needs a checkpoint of a run with a ratio network"),
    ("ratio EMA of another shape", lambda f: [_D(f, "bad-ratio.pt"), "--best-of", "2", "--n", "2"], "bad-ratio.pt: ratio_ema does not fit ratio_kwargs"),
    ("generator kwargs unknown", lambda f: [_D(f, "bad-gen-kwargs.pt")], "bad-gen-kwargs.pt: cannot rebuild the network .*bogus"),
    ("bare tensor", lambda f: [_D(f, "bare-tensor.pt")], "checkpoint: cannot read checkpoint .*bare-tensor.pt"),
    ("unsupported EDM wrapper", lambda f: [str(f["iddpm"])], "iDDPMPrecond"),
    ("hostile EDM pickle", lambda f: [_D(f, "build-on-rebuild-function.pkl")], "BUILD on a Global refused"),
    ("unknown flag", lambda f: [str(f["teacher"]), "--bogus"], "unrecognized arguments: --bogus"),
    ("non-numeric count", lambda f: [str(f["teacher"]), "--n", "many"], "argument --n: invalid int value: 'many'"),
]
EVALUATE_CASES = [
    ("data kind outside the choices", lambda f: [str(f["stage2"]), "--data-kind", "imagenet"], "argument --data-kind: invalid choice: 'imagenet'"),
    ("zero batch", lambda f: [str(f["stage2"]), "--batch", "0"], "--batch .* >= 1 .*--batch 0"),
    ("one image", lambda f: [str(f["stage2"]), "--n", "1"], "--n must be > 1"),
    ("malicious Inception weights", lambda f: [str(f["stage2"]), "--n", "4", "--inception", _D(f, "evil-inception.pth"), "--no-progress"], "--inception: .*evil-inception.pth is not a weights file readable as data"),
    ("foreign Inception weights", lambda f: [str(f["stage2"]), "--n", "4", "--inception", _D(f, "wrong-inception.pth"), "--no-progress"], "wrong-inception.pth is not torch-fidelity's Inception"),
    ("weights for another extractor", lambda f: [str(f["stage2"]), "--n", "4", "--inception", _D(f, "wrong-inception.pth"), "--feature-extractor", "clip-vit-b-32", "--no-progress"], "--inception: weights are for inception-v3-compat"),
    ("EDM pickle without real data", lambda f: [str(Path(__file__).parent / "fixtures" / "edm" / "edm-cifar10-uncond-vp.pkl")], "no run config to take the real images from"),
    ("missing real data", lambda f: [str(f["stage2"]), "--data-path", _D(f, "gone"), "--n", "4", "--no-progress"], "data.path: .*gone not found"),
]
CONVERT_CASES = [
    ("missing source", lambda f: [_D(f, "none.pt"), _D(f, "o.pth")], "src: .*none.pt not found"),
    ("source not a zip", lambda f: [_D(f, "text.pt"), _D(f, "o.pth")], "src: .*text.pt is not a readable TorchScript archive"),
    ("hostile TorchScript", lambda f: [_D(f, "ts-evil.pt"), _D(f, "o.pth")], r"src: .*ts-evil.pt: refusing to load global (posix|os)\.system"),
    ("TorchScript of another network", lambda f: [_D(f, "ts.pt"), _D(f, "o.pth")], "source: unexpected tensor bias"),
    ("destination below a file", lambda f: [_D(f, "ts.pt"), _D(f, "a_file") + "/o.pth"], "dst: cannot create the folder of .*a_file/o.pth"),
]


def _one_line(capsys, culprit):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(culprit, err[0]), err[0]
    assert "Traceback" not in err[0]


@pytest.mark.parametrize("name, argv, culprit", SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_sample_bad_input_is_one_line(files, capsys, name, argv, culprit):
    assert run_cli(sample_main, argv(files)) == 2
    _one_line(capsys, culprit)


@pytest.mark.parametrize("name, argv, culprit", EVALUATE_CASES, ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_bad_input_is_one_line(files, capsys, name, argv, culprit):
    from fastratio.evaluate import main as evaluate_main

    assert run_cli(evaluate_main, argv(files)) == 2
    _one_line(capsys, culprit)


@pytest.mark.parametrize("name, argv, culprit", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_convert_inception_bad_input_is_one_line(files, capsys, name, argv, culprit):
    from fastratio.tools.convert_inception import main as convert_main

    assert run_cli(convert_main, argv(files)) == 2
    _one_line(capsys, culprit)


def test_the_table_covers_at_least_eighty_cases():
    assert len(CASES) + len(SAMPLE_CASES) + len(EVALUATE_CASES) + len(CONVERT_CASES) >= 80


if not __import__("torch").cuda.is_available():
    CASES.append(("cuda without a GPU", lambda f: [TOY, *_sets(*QUICK, "run.device=cuda", "run.out_dir=" + str(f["dir"] / "c"))], {}, "run.device: 'cuda' requested"))


@pytest.mark.parametrize("name, argv, env, culprit", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_naming_the_culprit(files, capsys, monkeypatch, name, argv, env, culprit):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert run_cli(train_main, argv(files)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(culprit, err[0]), err[0]


def test_real_cli_exit_status_and_debug_traceback(files):
    """Through the real entry point: status 2, one stderr line; --debug shows the traceback."""
    argv = [sys.executable, "-m", "fastratio.train", TOY, "--set", "optim.batch_size=-1"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: optim.batch_size: must be > 0, got -1"
    proc = subprocess.run([*argv, "--debug"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
