"""``python -m fastratio.export`` on image runs: the loader in docs/export.md, run as it stands in a
fresh process, rebuilds the generator from model.safetensors + config.json and reproduces fastratio's
own output bit for bit (a class-conditional DDPM++ pixel run trained here, and a latent EDM2
generator with a small VAE); bad input is one line; the folder appears whole or not at all."""

import errno
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from testkit import idx_bytes

from fastratio import checkpoint, config
from fastratio.errors import run_cli
from fastratio.export import main
from fastratio.inference import latent_decoder, load_model
from fastratio.latents import LatentScaling
from fastratio.networks.from_denoiser import OneStepGenerator

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "edm2"
TINY = [
    "run.progress=false", "run.log_every=1", "run.eval_every=1000", "run.plot_every=0", "run.ckpt_every=2", "run.steps=2",
    "model.channels=16", "model.channel_mult=[1,2]", "model.num_blocks=1", "model.attn_resolutions=[14]",
    "optim.batch_size=6", "data.eval_samples=8", "teacher.sample_steps=2", "run.precision=fp32", "run.device=cpu",
    "data.conditional=true",
]


def doc_blocks() -> list[str]:
    """The python blocks of docs/export.md that say they are tested here, in order."""
    text = (ROOT / "docs" / "export.md").read_text()
    blocks = re.findall(r"<!-- tested: tests/test_export_image\.py[^\n]*-->\n```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 2, "docs/export.md: the loader and the pixel blocks"
    return blocks


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    """(teacher checkpoint, stage-2 DiffRatio checkpoint) of tiny class-conditional runs on 28x28 IDX images."""
    from fastratio.train import train

    root = tmp_path_factory.mktemp("pixel")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 28, 28), dtype=np.uint8)
    labels = (np.arange(24) % 3).astype(np.uint8)
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    data = f"data.path={root / 'train-images-idx3-ubyte.gz'}"
    teacher = train(config.load(ROOT / "configs" / "fashion_mnist_teacher.yaml", [*TINY, data, f"run.out_dir={root / 'teacher'}"]))
    teacher_ckpt = checkpoint.list_checkpoints(teacher)[-1]
    gen = train(config.load(ROOT / "configs" / "fashion_mnist.yaml", [*TINY, data, f"run.out_dir={root / 'gen'}",
                                                                       f"teacher.checkpoint={teacher_ckpt}", "method.name=diffratio"]))
    return teacher_ckpt, checkpoint.list_checkpoints(gen)[-1]


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory):
    """A latent stage-2 checkpoint as ImageTask.checkpoint_extras writes it, around EDM2's own latent
    network (4 x 8 x 8, 10 classes, from tests/fixtures/edm2) with moved weights, and the fixture VAE."""
    from fastratio.edm_import import load_edm_denoiser
    from fastratio.hf import import_diffusers

    root = tmp_path_factory.mktemp("latent")
    saved = torch.load(FIX / "vae.pt", weights_only=True)
    vae = import_diffusers("test", extra="latent").AutoencoderKL(**saved["config"])
    vae.load_state_dict(saved["state_dict"])
    vae.save_pretrained(root / "vae", safe_serialization=True)
    denoiser = load_edm_denoiser(FIX / "edm2-latent-cond" / "edm2-latent-cond-0000008-0.070.pkl")
    generator = OneStepGenerator(denoiser, 2.5)
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    state = {"step": 7, "nimg": 28, "config": {"method": {"name": "dijs"}}, "ema": generator.state_dict(),
             "network_kwargs": denoiser.init_kwargs, "sigma_init": 2.5,
             "latent": {"vae": str(root / "vae"), **LatentScaling().state()}}
    return checkpoint.save(state, root / "ckpt-000000007.pt")


def _export(ckpt: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    status = run_cli(main, [str(ckpt), "--out", str(out), *extra])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_the_docs_loader_reproduces_the_generator_bit_for_bit(kind, request, tmp_path, capsys):
    ckpt = request.getfixturevalue("pixel_run")[1] if kind == "pixel" else request.getfixturevalue("latent_ckpt")
    status, err = _export(ckpt, tmp_path / "generator", capsys)
    assert status == 0, err
    assert sorted(p.name for p in (tmp_path / "generator").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "generator" / "config.json").read_text())
    state = checkpoint.load(ckpt)
    kwargs = dict(state["network_kwargs"])
    assert cfg["architecture"] == kwargs.pop("precond", "EDMPrecond") and cfg["kwargs"] == kwargs
    assert cfg["sigma_init"] == state["sigma_init"] and cfg["latent"] == state.get("latent")
    assert (cfg["resolution"], cfg["channels"], cfg["label_dim"]) == ((28, 1, 3) if kind == "pixel" else (8, 4, 10))

    # The docs' two blocks as they stand, in a fresh process started in the folder above the export.
    loader, pixels = doc_blocks()
    dump = "\nimport sys\ntorch.save({'x': x, 'z': z, 'labels': labels, 'images': images, " \
           "'modules': sorted(m for m in sys.modules if m.startswith('fastratio'))}, 'doc.pt')\n"
    script = tmp_path / "doc_loader.py"
    script.write_text(loader + "\n" + pixels + dump)
    # fastratio's package alone on the path (not the checkout's root, whose kernels/ would shadow the
    # `kernels` package diffusers imports), as an installed fastratio is seen.
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "fastratio").symlink_to(ROOT / "fastratio")
    proc = subprocess.run([sys.executable, str(script)], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "path")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = torch.load(tmp_path / "doc.pt", weights_only=True)
    assert all(m == "fastratio" or m.startswith("fastratio.networks") for m in doc["modules"]), doc["modules"]

    model, _ = load_model(ckpt, torch.device("cpu"))  # fastratio's own rebuild (the sample CLI's)
    with torch.no_grad():
        ours = model(doc["z"], doc["labels"])
    assert doc["labels"] is not None and doc["labels"].shape == (8, cfg["label_dim"])
    assert torch.equal(doc["x"], ours)  # bit for bit
    decode = latent_decoder(state, None, ckpt, torch.device("cpu"))
    expected = ((ours * 127.5 + 128).clamp(0, 255).to(torch.uint8) if decode is None else decode(ours))
    assert torch.equal(doc["images"], expected)


def _one_line(err: str, *needles: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_bad_input_is_one_line_and_writes_nothing(pixel_run, tmp_path, capsys):
    teacher, gen = pixel_run
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    status, err = _export(gen, taken, capsys)
    assert status == 2 and (taken / "keep.txt").read_text() == "mine"
    _one_line(err, "--out", "exists")
    (tmp_path / "afile").write_text("x")
    _one_line(_export(gen, tmp_path / "afile", capsys)[1], "--out", "exists")
    _one_line(_export(teacher, tmp_path / "t", capsys)[1], "teacher")
    _one_line(_export(gen, tmp_path / "g", capsys, "--teacher", "sd")[1], "--teacher")
    _one_line(_export(tmp_path / "missing.pt", tmp_path / "m", capsys)[1], "not found")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    _one_line(_export(tmp_path / "junk.pt", tmp_path / "j", capsys)[1], "cannot read checkpoint")
    toy = checkpoint.save({"step": 1, "ema": {}, "config": {"method": {"name": "diffratio"}}}, tmp_path / "toy.pt")
    _one_line(_export(toy, tmp_path / "toy", capsys)[1], "not an image-run checkpoint")
    (tmp_path / "edm.pkl").write_bytes(b"\x80\x04N.")
    _one_line(_export(tmp_path / "edm.pkl", tmp_path / "p", capsys)[1], "EDM pickle", "teacher")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "edm.pkl", "junk.pt", "taken", "toy.pt"]


def test_a_failed_write_is_one_line_and_leaves_no_folder(pixel_run, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    status, err = _export(pixel_run[1], tmp_path / "generator", capsys)
    assert status == 2
    _one_line(err, "--out", "disk full")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its hidden temp
