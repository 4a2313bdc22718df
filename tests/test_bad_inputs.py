"""Bad input, table-driven: every case exits with status 2 and ONE line 'error: ...' naming the
culprit (config key, file, shape), no traceback (tracebacks only with --debug)."""

import collections
import gzip
import io
import os
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from testkit import idx_bytes, png_bytes

from fastratio import checkpoint
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
    return {"dir": d, "teacher": teacher, "stage2": checkpoint.list_checkpoints(stage2)[-1],
            "toy_ckpt": checkpoint.list_checkpoints(toy)[-1], "toy_run": toy}


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
    ("checkpoint of another architecture", lambda f: [TOY, *_sets(*QUICK, "run.out_dir=" + str(f["dir"] / "other"), "model.gen_hidden=24"), "--resume", str(f["toy_ckpt"])], {}, "ckpt-000000001.pt: checkpoint does not match this config"),
    ("missing resume file", lambda f: [TOY, "--resume", str(f["dir"] / "gone.pt")], {}, "--resume: checkpoint .*gone.pt not found"),
    ("run folder in use", lambda f: [TOY, *_sets(*QUICK, "run.out_dir=" + str(f["toy_run"]))], {}, "run.out_dir: .* already holds checkpoints"),
    ("bad kernel switch", lambda f: [TOY, *_sets(*QUICK, "run.out_dir=" + str(f["dir"] / "k"))], {"FASTRATIO_KERNELS": "cuda-magic"}, "FASTRATIO_KERNELS: 'cuda-magic' is not one of"),
]
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


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_sample_cli_errors(files, capsys):
    assert run_cli(sample_main, [str(files["dir"] / "none.pt")]) == 2
    assert "none.pt: checkpoint not found" in capsys.readouterr().err
    assert run_cli(sample_main, [str(files["toy_ckpt"])]) == 2
    assert "not an image-run checkpoint" in capsys.readouterr().err
    assert run_cli(sample_main, [str(files["stage2"]), "--class", "7"]) == 2
    assert "--class: 7 outside [0, 3)" in capsys.readouterr().err


def test_real_cli_exit_status_and_debug_traceback(files):
    """Through the real entry point: status 2, one stderr line; --debug shows the traceback."""
    argv = [sys.executable, "-m", "fastratio.train", TOY, "--set", "optim.batch_size=-1"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: optim.batch_size: must be > 0, got -1"
    proc = subprocess.run([*argv, "--debug"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
