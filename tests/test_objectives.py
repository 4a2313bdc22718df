"""Objectives against autograd on their defining expressions (float64), and stability at extreme logits."""

import pytest
import torch

from fastratio import objectives

B, D = 7, 5
ALL = ("dikl", "dijs", "dirm", "lr", "kl", "be", "ls", "sba")


def _logit_fn(x: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear l(x) with logits of both signs, a stand-in for the ratio network."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(D, 4, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    return 2.0 * torch.tanh(x @ a) @ b + 0.3 * (x**2).sum(1)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    return x, w


def _direction(objective, x, w, sba_lambda=2.5):
    xx = x.clone().requires_grad_(True)
    logit = _logit_fn(xx)
    (grad_logit,) = torch.autograd.grad(logit.sum(), xx)
    return objectives.ratio_direction(logit.detach(), grad_logit, w, objective, sba_lambda)


def _autograd_direction(expression, x, w):
    """grad_x of sum_i w_i * expression(l(x_i))."""
    xx = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((w * expression(_logit_fn(xx))).sum(), xx)
    return grad


# Defining expressions with c = sigmoid(l) ("Towards..." Eq. 8, 9, 10).
DEFINING = {
    "dikl": lambda l: torch.log((1 - torch.sigmoid(l)) / torch.sigmoid(l)),
    "dijs": lambda l: torch.log(1 - torch.sigmoid(l)),
    "dirm": lambda l: -torch.log(torch.sigmoid(l)),
}
# Di-Bregman Table 1: h(r); the teacher-free direction is w grad_x h'(r(x)) with r = e^{-l}.
BREGMAN_H = {
    "lr": lambda r, lam: r * torch.log(r) - (1 + r) * torch.log(1 + r),
    "kl": lambda r, lam: r * torch.log(r) - r,
    "be": lambda r, lam: -torch.log(r),
    "ls": lambda r, lam: r**2 / 2,
    "sba": lambda r, lam: (r ** (1 + lam) - r) / (lam * (lam + 1)),
}


@pytest.mark.parametrize("objective", sorted(DEFINING))
def test_gan_style_directions_match_autograd(objective):
    x, w = _inputs()
    expected = _autograd_direction(DEFINING[objective], x, w)
    torch.testing.assert_close(_direction(objective, x, w), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(BREGMAN_H))
def test_bregman_teacher_free_direction_matches_autograd(name):
    lam = 2.5
    x, w = _inputs()
    h = BREGMAN_H[name]

    def h_prime_of_r(logit):
        r = torch.exp(-logit)
        if not r.requires_grad:
            r.requires_grad_(True)
        (h_prime,) = torch.autograd.grad(h(r, lam).sum(), r, create_graph=True)
        return h_prime

    expected = _autograd_direction(h_prime_of_r, x, w)
    torch.testing.assert_close(_direction(name, x, w, lam), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("objective", ALL)
def test_potential_derivative_is_minus_weight(objective):
    logit = torch.linspace(-6, 6, 41, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(objectives.generator_potential(logit, objective, 1.7).sum(), logit)
    torch.testing.assert_close(d, -objectives.generator_weight(logit.detach(), objective, 1.7), rtol=1e-12, atol=1e-14)


def test_named_equivalences():
    """Bregman LR is DiJS and Bregman KL is DiKL (Di-Bregman Table 1 vs "Towards..." Eq. 8-9)."""
    logit = torch.linspace(-10, 10, 101, dtype=torch.float64)
    torch.testing.assert_close(objectives.generator_weight(logit, "lr"), objectives.generator_weight(logit, "dijs"))
    torch.testing.assert_close(objectives.generator_weight(logit, "kl"), objectives.generator_weight(logit, "dikl"))
    torch.testing.assert_close(objectives.generator_weight(logit, "sba", 1.0), objectives.generator_weight(logit, "ls"))


def test_classifier_loss_is_bce():
    g = torch.Generator().manual_seed(3)
    lr, lf = torch.randn(11, generator=g, dtype=torch.float64) * 3, torch.randn(13, generator=g, dtype=torch.float64) * 3
    loss_r, loss_f = objectives.ratio_classifier_loss(lr, lf)
    bce = torch.nn.functional.binary_cross_entropy
    torch.testing.assert_close(loss_r, bce(torch.sigmoid(lr), torch.ones_like(lr), reduction="none"))
    torch.testing.assert_close(loss_f, bce(torch.sigmoid(lf), torch.zeros_like(lf), reduction="none"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_stay_finite_and_exact(dtype):
    logit = torch.tensor([-1000.0, -80.0, -30.0, 0.0, 30.0, 80.0, 1000.0], dtype=dtype)
    loss_r, loss_f = objectives.ratio_classifier_loss(logit, logit)
    assert torch.isfinite(loss_r).all() and torch.isfinite(loss_f).all()
    # softplus(80) = 80 exactly in these precisions; the naive -log(sigmoid(-80)) is inf.
    assert loss_f[5].item() == pytest.approx(80.0, rel=1e-2) and loss_r[1].item() == pytest.approx(80.0, rel=1e-2)
    for objective in ALL:
        w = objectives.generator_weight(logit, objective, 5.0)
        f = objectives.generator_potential(logit, objective, 5.0)
        assert torch.isfinite(w).all() and torch.isfinite(f).all(), objective
        assert (w >= 0).all(), objective
    # Exact where representable: DiJS weight saturates at 1 and vanishes at -inf.
    w = objectives.generator_weight(logit, "dijs")
    assert w[-1].item() == 1.0 and w[0].item() == 0.0
    assert objectives.generator_weight(logit, "be")[5].float().item() == pytest.approx(float(torch.tensor(80.0).exp()), rel=1e-2)


def test_surrogate_carries_direction_into_parameters():
    """d/dtheta mean_i <sg(g_i), x_i(theta)> = mean_i g_i^T dx_i/dtheta for x = W z (Eq. 2)."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    z = torch.randn(9, 4, dtype=torch.float64, generator=g)
    direction = torch.randn(9, 3, dtype=torch.float64, generator=g)
    x = z @ weight.T
    (grad,) = torch.autograd.grad(objectives.surrogate_loss(direction, x).mean(), weight)
    torch.testing.assert_close(grad, direction.T @ z / 9)


def test_score_difference_direction_and_dsm():
    g = torch.Generator().manual_seed(5)
    s_fake, s_teacher = torch.randn(6, 2, 3, generator=g), torch.randn(6, 2, 3, generator=g)
    w, rw = torch.rand(6, generator=g), torch.rand(6, generator=g)
    vsd = objectives.score_difference_direction(s_fake, s_teacher, w)
    torch.testing.assert_close(vsd, w[:, None, None] * (s_fake - s_teacher))
    torch.testing.assert_close(objectives.score_difference_direction(s_fake, s_teacher, w, rw), rw[:, None, None] * vsd)
    eps, std = torch.randn(6, 2, 3, generator=g), torch.rand(6, generator=g) + 0.1
    # A perfect score of the kernel, -eps/std, has zero DSM loss; sigma^2-weighting turns it into eps-MSE.
    assert objectives.dsm_loss(-eps / std[:, None, None], eps, std, w).abs().max() == 0
    eps_hat = torch.randn(6, 2, 3, generator=g)
    loss = objectives.dsm_loss(-eps_hat / std[:, None, None], eps, std, std**2)
    torch.testing.assert_close(loss, 0.5 * ((eps_hat - eps) ** 2).sum((1, 2)))


def test_denoiser_loss_is_weighted_squared_error_per_sample():
    g = torch.Generator().manual_seed(0)
    d, x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    w = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    want = torch.stack([w[i] * ((d[i] - x[i]) ** 2).sum() for i in range(3)])
    torch.testing.assert_close(objectives.denoiser_loss(d, x, w), want)


def test_gan_term_direction_is_grad_of_minus_log_d():
    """Di-Bregman Algorithm 1's optional GAN term: d/dx [-log sigmoid(l(x))], no w(sigma)."""
    x, _ = _inputs()
    xx = x.clone().requires_grad_(True)
    logit = _logit_fn(xx)
    (grad_logit,) = torch.autograd.grad(logit.sum(), xx)
    got = objectives.gan_direction(logit.detach(), grad_logit)
    want = _autograd_direction(lambda l: -torch.nn.functional.logsigmoid(l), x, torch.ones(B, dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # It is DiRM's direction at w(sigma) = 1: -log c.
    torch.testing.assert_close(got, objectives.ratio_direction(logit.detach(), grad_logit, torch.ones(B, dtype=torch.float64), "dirm"))


def test_dmd_weight_gives_dmd_x0_gradient():
    """With w = dmd_weight the step's x0-space direction alpha * w (s_fake - s_teacher) is DMD's
    (D_fake - D_real) / mean|x0 - D_real| (Yin et al. 2024, Eq. 8), scores from Tweedie on the VP schedule."""
    from fastratio.noise import noise_coefficients

    g = torch.Generator().manual_seed(0)
    x0, d_real, d_fake, eps = (torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
    sigma = torch.tensor([0.1, 0.5, 1.0, 4.0, 14.6], dtype=torch.float64)
    alpha, std = (v.reshape(-1, 1, 1, 1) for v in noise_coefficients(sigma, "vp"))
    x_t = alpha * x0 + std * eps
    s_real, s_fake = ((alpha * d - x_t) / std**2 for d in (d_real, d_fake))
    w = objectives.dmd_weight(sigma, x0, (x_t + std**2 * s_real) / alpha)
    direction = objectives.score_difference_direction(s_fake, s_real, w) * alpha
    expected = (d_fake - d_real) / (x0 - d_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(direction, expected, rtol=1e-10, atol=1e-12)
