"""The toy generator and ratio net started from the teacher, as on images (Stage 1 -> Stage 2)."""

import torch

from fastratio import checkpoint, config
from fastratio.networks.from_denoiser import DenoiserScore, OneStepGenerator
from fastratio.networks.mlp import MLPDenoiser, MLPRatio
from fastratio.noise import noise_coefficients
from fastratio.tasks.toy2d import Toy2DTask, needs_teacher
from fastratio.train import pretrain_teacher, train


def _denoiser(seed: int) -> MLPDenoiser:
    torch.manual_seed(seed)
    return MLPDenoiser(2, 32, 3, 1.0)


def test_denoiser_is_edm_preconditioned():
    """D = c_skip x + c_out F(c_in x, c_noise) (EDM Table 1): the skip dominates at small sigma, the
    network's output at large sigma, and the score through it is Tweedie's (alpha D - x_t) / std^2."""
    den = _denoiser(0)
    x, sigma = torch.randn(8, 2), torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 2.5, 10.0, 80.0])
    with torch.no_grad():
        f = den.net(den.features(x, sigma))
        c_skip, c_out = 1 / (sigma**2 + 1), sigma / torch.sqrt(sigma**2 + 1)
        torch.testing.assert_close(den(x, sigma), c_skip[:, None] * x + c_out[:, None] * f)
        torch.testing.assert_close(den.features(x, sigma)[:, :2], x / torch.sqrt(sigma**2 + 1)[:, None])
        for schedule in ("ve", "vp"):
            alpha, std = noise_coefficients(sigma, schedule)
            x_t = alpha[:, None] * x
            expected = (alpha[:, None] * den(x_t / alpha[:, None], sigma) - x_t) / std[:, None] ** 2
            torch.testing.assert_close(DenoiserScore(den, schedule)(x_t, sigma), expected)


def test_stage1_starts_generator_fake_score_and_ratio_trunk_from_the_fitted_teacher():
    """As on images: after stage 1 the generator is D(sigma_init z; sigma_init) with the teacher's
    weights, the fake score a copy of the teacher, the ratio net's trunk the teacher's."""
    cfg = config.load(None, ["method.name=dibregman", "model.score_hidden=24", "method.teacher_steps=3", "optim.batch_size=16"])
    task = Toy2DTask(cfg, torch.device("cpu"))
    nets = task.build_networks()
    before = {k: v.clone() for k, v in nets.teacher.state_dict().items()}
    pretrain_teacher(task, nets, cfg, torch.Generator().manual_seed(1))
    teacher = nets.teacher.denoiser
    assert not torch.equal(before["denoiser.net.0.weight"], teacher.net[0].weight)  # fitted
    assert not any(p.requires_grad for p in teacher.parameters())
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    sigma_init = cfg.model.sigma_init
    with torch.no_grad():
        torch.testing.assert_close(nets.generator(z), teacher(sigma_init * z, torch.full((16,), sigma_init)))
        for mine, theirs in zip(nets.fake_score.parameters(), nets.teacher.parameters()):
            assert torch.equal(mine, theirs)
        x, sigma = torch.randn(8, 2), torch.rand(8) + 0.1
        torch.testing.assert_close(nets.ratio.net[:-1](nets.ratio.features(x, sigma)), teacher.net[:-1](teacher.features(x, sigma)))


def test_ratio_net_starts_from_the_teachers_trunk_with_a_fresh_head():
    teacher = _denoiser(0)
    torch.manual_seed(5)
    ratio = MLPRatio(2, 32, 3, 1.0, "ve")
    head = ratio.net[-1].weight.clone()
    ratio.load_trunk(teacher)
    for mine, theirs in zip(ratio.net[:-1], teacher.net[:-1]):
        for a, b in zip(mine.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(ratio.net[-1].weight, head)
    # The hidden features now equal the teacher's at any input.
    x, sigma = torch.randn(8, 2), torch.rand(8) + 0.1
    hidden = lambda net: net.net[:-1](net.features(x, sigma))
    torch.testing.assert_close(hidden(ratio), hidden(teacher))


def test_which_toy_runs_fit_a_teacher_and_the_ratio_net_width():
    base = ["model.score_hidden=24", "model.ratio_hidden=40"]
    cfg = config.load(None, base)
    nets = Toy2DTask(cfg, torch.device("cpu")).build_networks()
    # DiJS reads no score: stage 1 fits a teacher, the nets start from it, and it is not kept.
    assert needs_teacher(cfg) and nets.teacher is None and nets.fake_score is None
    assert isinstance(nets.generator, OneStepGenerator) and nets.ratio.net[0].out_features == 24  # the teacher's width
    cfg = config.load(None, [*base, "model.generator_from_teacher=false", "model.ratio_from_teacher=false"])
    nets = Toy2DTask(cfg, torch.device("cpu")).build_networks()
    assert not needs_teacher(cfg) and nets.teacher is None and nets.ratio.net[0].out_features == 40
    assert not isinstance(nets.generator, OneStepGenerator)
    cfg = config.load(None, [*base, "method.name=vsd"])
    nets = Toy2DTask(cfg, torch.device("cpu")).build_networks()
    assert needs_teacher(cfg) and nets.teacher is not None and nets.fake_score is not None and nets.ratio is None


def test_exact_teacher_is_read_in_place_of_the_fitted_one(tmp_path):
    """model.exact_teacher: VSD reads the mixture's closed-form score; stage 1 still fits the denoiser
    the generator and the fake score start from; the run checkpoints and resumes (the exact teacher
    has no state)."""
    base = ["method.name=vsd", "model.exact_teacher=true", "model.score_hidden=24", "method.teacher_steps=3",
            "optim.batch_size=16", "data.eval_samples=100", "run.progress=false", "run.plot_every=0", "run.kernels=torch",
            "run.eval_every=4", "run.ckpt_every=4", "run.log_every=2", f"run.out_dir={tmp_path}"]
    cfg = config.load(None, [*base, "run.steps=4"])
    task = Toy2DTask(cfg, torch.device("cpu"))
    nets = task.build_networks()
    pretrain_teacher(task, nets, cfg, torch.Generator().manual_seed(1))
    x, sigma = torch.randn(64, 2, dtype=torch.float64), torch.exp(torch.linspace(-4, 1, 64, dtype=torch.float64))
    torch.testing.assert_close(nets.teacher(x, sigma), task.mixture.score(x, sigma))
    assert nets.teacher.state_dict() == {}
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    fitted = nets.fake_score.denoiser  # a copy of the fitted teacher, which the generator also starts from
    with torch.no_grad():
        torch.testing.assert_close(nets.generator(z), fitted(cfg.model.sigma_init * z, torch.full((16,), cfg.model.sigma_init)))
    train(cfg)
    train(config.load(None, [*base, "run.steps=8"]), resume="auto")
    _, state = checkpoint.load_latest(tmp_path)
    assert state["step"] == 8 and state["nets"]["teacher"] == {}
