"""CPU smoke run of the image pipeline with the real Fashion-MNIST configs shrunk by overrides:
teacher (stage 1) -> one-step generator + ratio network (stage 2, DiJS and the VSD baseline), on an
IDX fixture; losses finite, sample grids written, networks initialised from the teacher."""

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from testkit import idx_bytes

from fastratio import checkpoint, config
from fastratio.errors import UserError
from fastratio.runlog import read_jsonl
from fastratio.sample import main as sample_main
from fastratio.tasks import build_task
from fastratio.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "run.progress=false", "run.log_every=1", "run.eval_every=3", "run.plot_every=3", "run.ckpt_every=2",
    "model.channels=16", "model.channel_mult=[1,2]", "model.num_blocks=1", "model.attn_resolutions=[14]",
    "optim.batch_size=6", "data.eval_samples=8", "teacher.sample_steps=2", "run.precision=fp32",
]


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """48 28x28 images of bright rectangles (some structure to learn), 3 classes, as gzipped IDX."""
    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    images = np.zeros((48, 28, 28), np.uint8)
    labels = np.arange(48, dtype=np.uint8) % 3
    for i in range(48):
        y, x = rng.integers(2, 14, size=2)
        images[i, y : y + 8 + 4 * labels[i], x : x + 10] = 200 + rng.integers(0, 55)
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return root / "train-images-idx3-ubyte.gz"


def _load(name, *overrides):
    return config.load(ROOT / "configs" / f"{name}.yaml", TINY + list(overrides))


@pytest.fixture(scope="module")
def teacher_run(fashion, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = _load("fashion_mnist_teacher", f"run.out_dir={out}", f"data.path={fashion}", "run.steps=4",
                "model.augment_dim=9", "augment.p=0.5", "data.conditional=true")
    return train(cfg)


def _finite_rows(run, key):
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows][-1] == rows[-1]["step"] and rows
    values = [r[key] for r in rows]
    assert all(math.isfinite(v) for v in values), values
    return rows


def test_teacher_stage_writes_checkpoints_and_heun_samples(teacher_run):
    rows = _finite_rows(teacher_run, "teacher_loss")
    assert len(rows) == 4 and "eval_pixel_mean_gap" in rows[-1]
    state = checkpoint.load(checkpoint.list_checkpoints(teacher_run)[-1])
    assert state["network_kwargs"]["img_resolution"] == 28 and state["network_kwargs"]["label_dim"] == 3
    grid = Image.open(teacher_run / "samples-000000003.png")
    assert grid.size[0] > 28 * 8  # 64 samples, 8 per row, enlarged
    assert Image.open(teacher_run / "losses.png").size[0] > 0


@pytest.mark.parametrize("method", ["diffratio", "vsd"])
def test_stage2_from_the_teacher(teacher_run, fashion, tmp_path, method):
    ckpt = checkpoint.list_checkpoints(teacher_run)[-1]
    overrides = [f"run.out_dir={tmp_path / method}", f"data.path={fashion}", f"teacher.checkpoint={ckpt}",
                 "run.steps=3", f"method.name={method}", "model.augment_dim=9", "augment.p=0.5", "data.conditional=true"]
    if method == "diffratio":
        overrides.append("run.precision=bf16")  # autocast path; on CPU too
    cfg = _load("fashion_mnist", *overrides)

    # The networks start from the teacher: generator = teacher denoiser, ratio encoder = teacher encoder.
    teacher_ema = checkpoint.load(ckpt)["ema"]
    nets = build_task(cfg, torch.device("cpu")).build_networks()
    for k, v in nets.generator.denoiser.state_dict().items():
        assert torch.equal(v, teacher_ema[k]), k
    if method == "diffratio":
        for k, v in nets.ratio.model.state_dict().items():
            assert torch.equal(v, teacher_ema["model." + k]), k

    run = train(cfg)
    key = "ratio_loss" if method == "diffratio" else "fake_dsm_loss"
    rows = _finite_rows(run, key)
    assert all(math.isfinite(r["gen_grad_norm"]) and r["gen_grad_norm"] > 0 for r in rows)
    assert (run / "samples-000000003.png").is_file()
    state = checkpoint.load(checkpoint.list_checkpoints(run)[-1])
    assert state["sigma_init"] == 2.5
    moved = any(not torch.equal(v, teacher_ema[k.removeprefix("denoiser.")]) for k, v in state["nets"]["generator"].items())
    assert moved

    out = tmp_path / "grid.png"
    newest = str(checkpoint.list_checkpoints(run)[-1])
    assert sample_main([newest, "--n", "4", "--class", "1", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * (2 * 29 + 1), 2 * (2 * 29 + 1))  # 2x2 grid of 28px + 1px gaps, scale 2
    if method == "diffratio":  # the verifier: the ratio net's EMA is saved with its kwargs
        assert set(state["ratio_ema"]) == set(state["nets"]["ratio"])
        assert sample_main([newest, "--n", "4", "--best-of", "3", "--out", str(out)]) == 0
    else:
        with pytest.raises(UserError, match="--best-of needs a checkpoint of a run with a ratio network"):
            sample_main([newest, "--n", "4", "--best-of", "3", "--out", str(out)])


def test_stage2_dibregman_reads_the_fake_score_encoder_as_discriminator(teacher_run, fashion, tmp_path):
    """model.shared_encoder (the Di-Bregman paper's CIFAR-10 discriminator, after SiDA): no ratio net of
    its own; its logit is the mean of the fake score's bottleneck; one update trains both losses."""
    from fastratio.noise import noise_coefficients

    ckpt = checkpoint.list_checkpoints(teacher_run)[-1]
    cfg = _load("fashion_mnist", f"run.out_dir={tmp_path / 'run'}", f"data.path={fashion}", f"teacher.checkpoint={ckpt}",
                "run.steps=3", "method.name=dibregman", "method.objective=sba", "model.shared_encoder=true",
                "method.ratio_steps=1", "method.fake_score_steps=1", "model.augment_dim=9", "augment.p=0.5",
                "data.conditional=true", "noise.schedule=vp")
    nets = build_task(cfg, torch.device("cpu")).build_networks()
    assert not list(nets.ratio.parameters())
    fake = nets.fake_score.denoiser.eval()  # no dropout: two forwards to compare
    x_t, sigma = torch.randn(2, 1, 28, 28), torch.tensor([0.3, 3.0])
    labels = torch.eye(3)[:2]
    alpha = noise_coefficients(sigma, "vp")[0].reshape(-1, 1, 1, 1)
    s = sigma.reshape(-1, 1, 1, 1)
    c_in, c_noise = (s**2 + 0.25).rsqrt(), s.log().flatten() / 4  # EDM's preconditioning, sigma_data 0.5
    want = fake.model.encode(c_in * x_t / alpha, fake.model.embed(c_noise, labels, None))[-1].mean(dim=(1, 2, 3))
    torch.testing.assert_close(nets.ratio(x_t, sigma, labels), want)

    run = train(cfg)
    rows = _finite_rows(run, "ratio_loss")
    assert all(math.isfinite(r["fake_dsm_loss"]) and "ratio_grad_norm" not in r for r in rows)
    state = checkpoint.load(checkpoint.list_checkpoints(run)[-1])
    assert state["nets"]["ratio"] == {} and "ratio_ema" not in state and "ratio" not in state["optimizers"]


def test_stage2_ablations_start_from_fresh_weights(teacher_run, fashion, tmp_path):
    """model.generator_from_teacher / ratio_from_teacher = false (the papers' ablations): the teacher's
    architecture with fresh random weights, the other network still from the teacher."""
    ckpt = checkpoint.list_checkpoints(teacher_run)[-1]
    teacher_ema = checkpoint.load(ckpt)["ema"]
    base = [f"run.out_dir={tmp_path}", f"data.path={fashion}", f"teacher.checkpoint={ckpt}", "model.augment_dim=9",
            "augment.p=0.5", "data.conditional=true"]
    nets = build_task(_load("fashion_mnist", *base, "model.generator_from_teacher=false"), torch.device("cpu")).build_networks()
    generator = nets.generator.denoiser.state_dict()
    assert {k: v.shape for k, v in generator.items()} == {k: v.shape for k, v in teacher_ema.items()}
    assert not any(torch.equal(v, teacher_ema[k]) for k, v in generator.items() if k.endswith("weight") and v.dim() > 1)
    assert all(torch.equal(v, teacher_ema["model." + k]) for k, v in nets.ratio.model.state_dict().items())
    nets = build_task(_load("fashion_mnist", *base, "model.ratio_from_teacher=false"), torch.device("cpu")).build_networks()
    assert all(torch.equal(v, teacher_ema[k]) for k, v in nets.generator.denoiser.state_dict().items())
    assert not any(torch.equal(v, teacher_ema["model." + k]) for k, v in nets.ratio.model.state_dict().items()
                   if k.endswith("weight") and v.dim() > 1)


def test_stage2_refuses_mismatched_teacher_and_follows_its_architecture(teacher_run, fashion, tmp_path):
    ckpt = checkpoint.list_checkpoints(teacher_run)[-1]
    base = [f"run.out_dir={tmp_path}", f"data.path={fashion}", f"teacher.checkpoint={ckpt}", "run.steps=1",
            "model.augment_dim=9", "augment.p=0.5"]
    cfg = _load("fashion_mnist", *base)  # unconditional data, conditional teacher
    with pytest.raises(UserError, match="teacher.checkpoint: teacher is for 1x28\\^2 images with 3 classes"):
        build_task(cfg, torch.device("cpu")).build_networks()
    # The ratio net is the teacher's own encoder half, whatever the config's model.* say (16 channels here).
    cfg = _load("fashion_mnist", *base, "data.conditional=true", "model.channels=32")
    nets = build_task(cfg, torch.device("cpu")).build_networks()
    teacher_enc = nets.generator.denoiser.model.state_dict()
    ratio_enc = nets.ratio.model.state_dict()
    assert ratio_enc["enc.28x28_conv.weight"].shape[0] == 16
    assert all(torch.equal(v, teacher_enc[k]) for k, v in ratio_enc.items())
    cfg = _load("fashion_mnist", *base[:2], "teacher.checkpoint=" + str(tmp_path / "none.pt"))
    with pytest.raises(UserError, match="teacher.checkpoint: .*none.pt not found"):
        build_task(cfg, torch.device("cpu")).build_networks()


def test_teacher_resume_is_exact_with_dropout_and_augmentation(fashion, tmp_path):
    """Dropout (the default generator) and augmentation (the run's stream) resume bit-exactly."""
    common = [f"data.path={fashion}", "model.augment_dim=9", "augment.p=0.5", "model.dropout=0.3", "run.ckpt_every=2", "run.plot_every=0"]
    full = train(_load("fashion_mnist_teacher", f"run.out_dir={tmp_path / 'full'}", "run.steps=4", *common))
    train(_load("fashion_mnist_teacher", f"run.out_dir={tmp_path / 'split'}", "run.steps=2", *common))
    split = train(_load("fashion_mnist_teacher", f"run.out_dir={tmp_path / 'split'}", "run.steps=4", *common), resume="auto")
    losses = [[r["teacher_loss"] for r in read_jsonl(run / "metrics.jsonl")] for run in (full, split)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a, b = (checkpoint.load(checkpoint.list_checkpoints(run)[-1])["nets"]["teacher"] for run in (full, split))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a cold whole-step compile of even this tiny UNet takes minutes on 2 cores; the toy version runs by default (test_step_modes.py)
def test_compiled_image_step_matches_eager(teacher_run, fashion, tmp_path):
    """The DDPM++ stage-2 step (DiJS through the Triton kernels, augmentation, class labels) as one
    compiled graph gives eager's losses and weights."""
    ckpt = checkpoint.list_checkpoints(teacher_run)[-1]
    common = [f"data.path={fashion}", f"teacher.checkpoint={ckpt}", "run.steps=4", "run.kernels=triton", "run.plot_every=0",
              "run.eval_every=100", "model.augment_dim=9", "augment.p=0.5", "data.conditional=true"]
    eager = train(_load("fashion_mnist", f"run.out_dir={tmp_path / 'eager'}", *common))
    torch._dynamo.reset()
    compiled = train(_load("fashion_mnist", f"run.out_dir={tmp_path / 'compile'}", "step.mode=compile", *common))
    for a, b in zip(read_jsonl(eager / "metrics.jsonl"), read_jsonl(compiled / "metrics.jsonl"), strict=True):
        for key in ("ratio_loss", "ratio_grad_norm", "gen_direction_norm", "gen_grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    wa, wb = (checkpoint.load(checkpoint.list_checkpoints(run)[-1])["nets"] for run in (eager, compiled))
    for role in wa:
        for key in wa[role]:
            torch.testing.assert_close(wb[role][key], wa[role][key], rtol=1e-4, atol=1e-5)
