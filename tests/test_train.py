"""The training loop: run folder contents, resume, every method and objective for a few steps."""

import math

import pytest
import torch

from fastratio import checkpoint, config, ops
from fastratio.errors import UserError
from fastratio.runlog import TIMING_KEYS, read_jsonl
from fastratio.tasks import build_task
from fastratio.train import train

SMALL = [
    "run.progress=false", "run.log_every=1", "run.eval_every=4", "run.plot_every=4", "run.ckpt_every=3",
    "optim.batch_size=32", "model.gen_hidden=32", "model.ratio_hidden=32", "model.score_hidden=24",
    "data.eval_samples=200", "method.teacher_steps=5",
]


def _cfg(tmp_path, *extra, steps=6):
    return config.load(None, SMALL + [f"run.out_dir={tmp_path / 'run'}", f"run.steps={steps}", *extra])


def test_run_folder_has_config_metrics_plots_and_checkpoints(tmp_path):
    cfg = _cfg(tmp_path, "run.keep_ckpts=1")
    run = train(cfg)
    assert config.load(run / "config.yaml") == cfg
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(math.isfinite(r["ratio_loss"]) and math.isfinite(r["gen_grad_norm"]) for r in rows)
    assert {"eval_energy_distance", "eval_modes_covered"} <= set(rows[3]) and "eval_energy_distance" not in rows[2]
    assert (run / "samples-000000004.png").stat().st_size > 1000
    ckpts = checkpoint.list_checkpoints(run)
    assert [p.name for p in ckpts] == ["ckpt-000000006.pt"]  # keep_ckpts=1 pruned step 3
    state = torch.load(ckpts[0], weights_only=True)
    assert state["step"] == 6 and state["nimg"] == 6 * 32 and set(state["nets"]) == {"generator", "ratio"}  # stage 1's teacher is not kept


def test_refuses_to_overwrite_a_run(tmp_path):
    cfg = _cfg(tmp_path, steps=3)
    train(cfg)
    with pytest.raises(UserError, match="run.out_dir"):
        train(cfg)


@pytest.mark.parametrize("method", ["diffratio", "vsd"])
def test_resume_continues_the_same_run(tmp_path, method):
    """Stop at step 6, resume to 10: losses and weights equal an uninterrupted 10-step run."""
    full = train(_cfg(tmp_path / "a", f"method.name={method}", steps=10))
    part_cfg = _cfg(tmp_path / "b", f"method.name={method}", steps=6)
    train(part_cfg)
    resumed = train(_cfg(tmp_path / "b", f"method.name={method}", steps=10), resume="auto")
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 11))
    keys = [k for k in a[0] if k not in TIMING_KEYS]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}
    sa = checkpoint.load(checkpoint.list_checkpoints(full)[-1])
    sb = checkpoint.load(checkpoint.list_checkpoints(resumed)[-1])
    for name in sa["nets"]:
        for key, value in sa["nets"][name].items():
            assert torch.equal(value, sb["nets"][name][key]), (name, key)


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path):
    run = train(_cfg(tmp_path, steps=6))
    newest = checkpoint.list_checkpoints(run)[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by a crash mid-copy
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        path, state = checkpoint.load_latest(run)
    assert state["step"] == 3 and path.name == "ckpt-000000003.pt"


@pytest.mark.parametrize(
    "method, objective",
    [("diffratio", o) for o in config.OBJECTIVES] + [("dibregman", "sba"), ("dibregman", "lr"), ("vsd", "dikl")],
)
def test_every_method_and_objective_trains(tmp_path, method, objective):
    cfg = _cfg(tmp_path, f"method.name={method}", f"method.objective={objective}", "run.plot_every=0", "run.ckpt_every=1", steps=3)
    run = train(cfg)
    rows = read_jsonl(run / "metrics.jsonl")
    assert all(math.isfinite(v) for r in rows for v in r.values())
    expected = {"diffratio": {"ratio_loss"}, "vsd": {"fake_dsm_loss"}, "dibregman": {"ratio_loss", "fake_dsm_loss"}}[method]
    assert expected <= set(rows[-1])
    first, last = (checkpoint.load(p)["nets"] for p in checkpoint.list_checkpoints(run)[::2])
    trained = last["generator"]
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert ("teacher" in last) == (method != "diffratio")  # kept only where its score is read
    assert not torch.equal(trained["denoiser.net.0.weight"], first["generator"]["denoiser.net.0.weight"])


@pytest.mark.parametrize("objective", ["dijs", "sba"])
def test_kernels_on_and_off_give_the_same_run(tmp_path, objective, monkeypatch):
    """Triton kernels (interpreter) vs PyTorch references: same losses step for step, same weights.

    The reference path is handed the kernel's Philox noise (drawing its seed from the run generator
    as the kernel path does), so the comparison is of the arithmetic; the noise's own statistics
    are tested in test_kernel_noise_injection.py."""
    from fastratio.kernels.noise_injection import noise_inject

    def philox_normal(shape, like, draws):
        seed = draws.randint(ops._SEED_BOUND, (1,), like.device)
        zeros = like.new_zeros(shape)
        return noise_inject(zeros, like.new_zeros(shape[0]), like.new_ones(shape[0]), seed)

    monkeypatch.setattr(ops, "standard_normal", philox_normal)
    runs = {}
    for kernels in ("triton", "torch"):
        runs[kernels] = train(_cfg(tmp_path / kernels, f"run.kernels={kernels}", f"method.objective={objective}", "run.plot_every=0", steps=5))
    a, b = (read_jsonl(runs[k] / "metrics.jsonl") for k in ("triton", "torch"))
    for ra, rb in zip(a, b):
        for key in ("ratio_loss", "gen_potential", "gen_direction_norm", "gen_grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    wa, wb = (checkpoint.load(checkpoint.list_checkpoints(runs[k])[-1])["nets"]["generator"] for k in ("triton", "torch"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["diffratio", "dibregman"])
def test_gan_term_adds_w_gan_times_minus_log_d_gradient(tmp_path, method):
    """method.gan_weight (Di-Bregman Alg. 1): the generator direction is the method's own plus
    w_GAN * d/dx_t[-log sigmoid(l)], at the same x_t; the run trains and logs the GAN loss."""
    from fastratio import objectives
    from fastratio.draws import Draws
    from fastratio.step import TrainStep

    base, gan = (_cfg(tmp_path, f"method.name={method}", f"method.gan_weight={w}") for w in (0.0, 0.7))
    torch.manual_seed(0)
    nets = build_task(base, torch.device("cpu")).build_networks()
    x_t, sigma = torch.randn(16, 2), torch.rand(16) + 0.1
    d_base, _ = TrainStep(base, nets, {}, Draws(torch.Generator())).generator_direction(x_t, sigma)
    d_gan, metrics = TrainStep(gan, nets, {}, Draws(torch.Generator())).generator_direction(x_t, sigma)
    x_in = x_t.clone().requires_grad_(True)
    logit = nets.ratio(x_in, sigma)
    (grad,) = torch.autograd.grad(logit.sum(), x_in)
    torch.testing.assert_close(d_gan, d_base + 0.7 * objectives.gan_direction(logit.detach(), grad))
    assert metrics["gen_gan_loss"] == pytest.approx(float(torch.nn.functional.softplus(-logit.detach()).mean()), rel=1e-5)
    run = train(_cfg(tmp_path, f"method.name={method}", "method.gan_weight=0.7", "run.plot_every=0", steps=3))
    rows = read_jsonl(run / "metrics.jsonl")
    assert all(math.isfinite(r["gen_gan_loss"]) for r in rows)


def test_gan_term_needs_a_ratio_network(tmp_path):
    with pytest.raises(config.ConfigError, match="method.gan_weight: the GAN term uses the ratio network"):
        _cfg(tmp_path, "method.name=vsd", "method.gan_weight=0.5")
