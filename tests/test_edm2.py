"""EDM2 networks against NVlabs/edm2's own code (tests/fixtures/edm2/make_fixtures.py ran it once):
every preset's parameter count and state_dict layout, snapshots and post-hoc EMA pickles written by
EDM2's training loop and reconstruct_phema.py loaded as data and matching EDM2's outputs, and a
training-mode forward (forced weight normalization) with EDM2's uncertainty loss."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from fastratio import objectives
from fastratio.edm_import import load_edm_denoiser
from fastratio.networks.edm2 import Block, Precond

FIX = Path(__file__).resolve().parent / "fixtures" / "edm2"
OUTPUTS = torch.load(FIX / "outputs.pt", weights_only=True)
LAYOUTS = json.loads((FIX / "layouts.json").read_text())["layouts"]
PRESET_CHANNELS = {"xxs": 64, "xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}  # train_edm2.py
PICKLES = sorted(k for k in OUTPUTS if k.endswith(".pkl"))


@pytest.mark.parametrize("preset", sorted(LAYOUTS))
def test_every_edm2_preset_has_edm2_s_parameter_count_and_layout(preset):
    size = preset.split("-")[-1]
    latent = "img512" in preset
    with torch.device("meta"):
        net = Precond(img_resolution=64, img_channels=4 if latent else 3, label_dim=1000, model_channels=PRESET_CHANNELS[size])
    names = [(k, list(v.shape)) for k, v in net.state_dict().items()]
    want = LAYOUTS[preset]
    assert sum(p.numel() for p in net.parameters()) == want["parameters"]
    assert len(names) == want["tensors"] and hashlib.sha256(json.dumps(names).encode()).hexdigest() == want["layout_sha256"]


def test_the_paper_sizes_are_the_img512_presets():
    counts = {p.split("-")[-1]: LAYOUTS[p]["parameters"] for p in LAYOUTS if "img512" in p}
    assert counts["xs"] == 124_713_253 and counts["xxl"] == 1_523_164_773  # EDM2 Table 2: 125M ... 1.5B
    assert sorted(counts.values()) == [counts[s] for s in ("xxs", "xs", "s", "m", "l", "xl", "xxl")]


@pytest.mark.parametrize("name", PICKLES)
def test_edm2_written_pickles_load_as_data_and_match_edm2(name):
    net = load_edm_denoiser(FIX / name)
    assert type(net) is Precond and not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.init_kwargs["precond"] == "EDM2Precond" and all(p.dtype == torch.float32 for p in net.parameters())
    o = OUTPUTS[name]
    d, logvar = net(o["x"], o["sigma"], o["labels"], return_logvar=True)
    torch.testing.assert_close(d, o["D"], rtol=2e-5, atol=2e-5 * o["D"].abs().max().item())
    torch.testing.assert_close(logvar, o["logvar"], rtol=1e-6, atol=1e-6)
    assert net(o["x"], o["sigma"], o["labels"]).shape == o["D"].shape


@pytest.mark.parametrize("family", ["edm2-latent-cond", "edm2-rgb-uncond"])
def test_training_mode_renormalizes_weights_and_the_uncertainty_loss_is_edm2_s(family):
    o = OUTPUTS[f"{family}/train"]
    name = next(k for k in PICKLES if k.startswith(family) and "-0.070" in k)  # the post-hoc EMA pickle
    net = load_edm_denoiser(FIX / name).train().requires_grad_(True)
    for block in net.modules():
        if isinstance(block, Block):
            block.dropout = 0
    p_mean, p_std = (-0.4, 1.0) if "latent" in family else (-0.8, 1.6)
    sigma = (o["rnd_normal"] * p_std + p_mean).exp()
    images, labels = o["images"], o["train_labels"] if o["train_labels"].shape[1] else None
    denoised, logvar = net(images + o["noise"] * sigma, sigma, labels, return_logvar=True)
    weight = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2).flatten()
    loss = objectives.uncertainty_loss(denoised, images, weight, logvar)
    torch.testing.assert_close(loss.detach(), o["loss"].sum(dim=(1, 2, 3)), rtol=2e-5, atol=1e-4)
    state = net.state_dict()
    for key, value in o["weights_after"].items():  # forced weight normalization wrote the same weights
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in net.parameters() if p.requires_grad and p.ndim)


@pytest.mark.parametrize("method, checkpointing", [("diffratio", False), ("vsd", False), ("diffratio", True)])
def test_stage2_from_an_edm2_pickle_trains_and_samples(tmp_path, method, checkpointing):
    import numpy as np

    from fastratio import checkpoint, config
    from fastratio.errors import run_cli
    from fastratio.networks.image import RatioUNet
    from fastratio.runlog import read_jsonl
    from fastratio.sample import main as sample_main
    from fastratio.train import train

    np.savez(tmp_path / "data.npz", images=np.random.default_rng(0).integers(0, 256, (16, 3, 8, 8), dtype=np.uint8))
    teacher = FIX / "edm2-rgb-uncond" / "edm2-rgb-uncond-0000008-0.070.pkl"
    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / "cifar10.yaml", [
        f"run.out_dir={tmp_path / 'run'}", "data.kind=npz", f"data.path={tmp_path / 'data.npz'}", f"teacher.checkpoint={teacher}",
        f"method.name={method}", "run.steps=2", "run.log_every=1", "run.eval_every=2", "run.plot_every=2", "run.ckpt_every=2",
        "run.progress=false", "run.precision=fp32", "step.mode=eager", "optim.batch_size=4", "data.eval_samples=8",
        "augment.p=0", "model.augment_dim=0", f"model.checkpointing={str(checkpointing).lower()}",
    ])
    run = train(cfg)
    rows = read_jsonl(run / "metrics.jsonl")
    loss = "ratio_loss" if method == "diffratio" else "fake_dsm_loss"
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r[loss]) and np.isfinite(r["gen_grad_norm"]) and r["gen_grad_norm"] > 0 for r in rows)
    state = checkpoint.load(run / "ckpt-000000002.pt")
    assert state["network_kwargs"]["precond"] == "EDM2Precond"
    if method == "diffratio":
        assert state["ratio_kwargs"]["model_type"] == "EDM2UNet"
        ratio = RatioUNet(**state["ratio_kwargs"])
        teacher_net = load_edm_denoiser(teacher)
        assert ratio.load_encoder(teacher_net) == len(ratio.model.state_dict())  # the whole encoder half comes from the teacher
        enc = sum(p.numel() for p in ratio.model.parameters())
        assert enc < 0.6 * sum(p.numel() for p in teacher_net.parameters())
        assert run_cli(sample_main, [str(run / "ckpt-000000002.pt"), "--n", "4", "--best-of", "2", "--out", str(tmp_path / "g.png")]) == 0


def test_activation_checkpointing_of_an_edm2_generator_gives_the_same_gradients():
    from fastratio.networks.from_denoiser import OneStepGenerator

    teacher = FIX / "edm2-latent-cond" / "edm2-latent-cond-0000008-0.070.pkl"
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.eye(10)[[0, 4, 9]]
    grads = []
    for checkpointing in (False, True):
        gen = OneStepGenerator(load_edm_denoiser(teacher).train().requires_grad_(True), 2.5, checkpointing)
        (gen(z, labels) ** 2).sum().backward()
        grads.append({k: p.grad.clone() for k, p in gen.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for key, value in grads[0].items():
        torch.testing.assert_close(grads[1][key], value, rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_learning_rate_schedule_and_power_ema_equal_edm2_s():
    from fastratio.ema import power_ema_beta, std_to_exp
    from fastratio.optim import edm2_lr_factor

    ref = json.loads((FIX / "schedules.json").read_text())  # EDM2's learning_rate_schedule and phema, run by make_fixtures.py
    for nimg, lr in zip(ref["nimg"], ref["lr_img512_xs"]):
        factor = edm2_lr_factor(torch.tensor(float(nimg), dtype=torch.float64), 2048, 70000, 10)
        assert 0.012 * float(factor) == pytest.approx(lr, rel=1e-12, abs=1e-15)
    for std, exponent, betas in zip(ref["stds"], ref["std_to_exp"], ref["power_beta"]):
        assert std_to_exp(std) == pytest.approx(exponent, rel=1e-12)
        for nimg, beta in zip(ref["nimg"], betas):
            assert float(power_ema_beta(2048, torch.tensor(float(nimg + 2048), dtype=torch.float64), exponent)) == pytest.approx(beta, rel=1e-9, abs=1e-300)


def test_stage1_edm2_recipe_trains_a_teacher_stage2_starts_from(tmp_path):
    import numpy as np

    from fastratio import checkpoint, config
    from fastratio.runlog import read_jsonl
    from fastratio.train import train

    np.savez(tmp_path / "data.npz", images=np.random.default_rng(0).integers(0, 256, (16, 3, 8, 8), dtype=np.uint8), labels=np.arange(16) % 4)
    root = Path(__file__).resolve().parents[1] / "configs"
    common = [f"data.path={tmp_path / 'data.npz'}", "data.kind=npz", "run.log_every=1", "run.eval_every=4", "run.plot_every=4",
              "run.ckpt_every=4", "run.progress=false", "run.precision=fp32", "run.device=cpu", "step.mode=eager", "optim.batch_size=4",
              "data.eval_samples=8", "data.source=memory", "data.conditional=true", "teacher.sample_steps=2",
              "model.channel_mult=[1,2]", "model.num_blocks=1", "model.attn_resolutions=[4]"]
    teacher_sets = [*common, "model.size=xxs", "optim.lr_rampup_mimg=0.000008", "optim.lr_ref_batches=1", "run.ckpt_every=2"]
    cfg = config.load(root / "imagenet512_teacher.yaml", [*teacher_sets, f"run.out_dir={tmp_path / 'teacher'}", "run.steps=4"])
    assert cfg.model.channels == 64 and cfg.teacher.loss == "edm2" and cfg.optim.ema_std > 0
    run = train(cfg)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["teacher_loss"]) for r in rows)
    # Resumed at step 2, the schedule and the power EMA continue exactly (every logged loss equal).
    part = config.load(root / "imagenet512_teacher.yaml", [*teacher_sets, f"run.out_dir={tmp_path / 'part'}", "run.steps=2"])
    train(part)
    part.run.steps = 4
    resumed = read_jsonl(train(part, resume="auto") / "metrics.jsonl")
    def losses(log):  # the shorter run also evaluated at its last step
        return [(r["step"], r["teacher_loss"], r["teacher_grad_norm"]) for r in log]

    assert losses(resumed) == losses(rows)
    state = checkpoint.load(run / "ckpt-000000004.pt")
    assert state["network_kwargs"]["precond"] == "EDM2Precond"
    # The schedule ran on the device: after 4 steps of 4 images, warm-up 8 images, decay after 1 batch: lr / sqrt(16 / 4).
    assert float(state["optimizers"]["teacher"]["param_groups"][0]["lr"]) == pytest.approx(cfg.optim.teacher_lr / 2)
    stage2 = config.load(root / "imagenet512.yaml", [*common, f"run.out_dir={tmp_path / 'dijs'}", "run.steps=2", "model.size=xxs",
                                                       f"teacher.checkpoint={run / 'ckpt-000000004.pt'}"])
    rows = read_jsonl(train(stage2) / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["ratio_loss"]) for r in rows)


def test_the_edm2_ratio_net_is_a_third_of_the_generator_at_every_size():
    from fastratio.networks.image import RatioUNet

    stated = {"xs": 38_857_873, "xxl": 471_464_913}  # README's table
    for size, channels in (("xs", 128), ("xxl", 448)):
        kwargs = {"img_resolution": 64, "img_channels": 4, "label_dim": 1000, "model_channels": channels}
        with torch.device("meta"):
            ratio = RatioUNet(sigma_data=0.5, schedule="ve", model_type="EDM2UNet", **kwargs)
        count = sum(p.numel() for p in ratio.parameters())
        assert count == stated[size] and 0.30 < count / LAYOUTS[f"edm2-img512-{size}"]["parameters"] < 0.32
