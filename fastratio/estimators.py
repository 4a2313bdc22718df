"""How well do learned estimators recover the exact DiKL generator gradient? (toy suite)

A fixed ``MixtureGenerator`` q and a target mixture p have closed-form noised scores, so the exact
direction w (grad log q_sigma - grad log p_sigma) is known. We fit
  - DiffRatio: one ratio classifier (log q/p ~= -l), and
  - VSD: a teacher score on p and a fake score on q (two networks, together about the same number
    of parameters as the ratio network),
with the same optimiser, steps and batch, and compare the generator gradients they imply, both per
sample in x-space and as the parameter gradient of the generator.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import objectives, toy
from .config import Config, from_dict, to_dict
from .draws import Draws
from .networks.from_denoiser import DenoiserScore
from .networks.mlp import MLPDenoiser, MLPRatio
from .noise import loss_weight
from .optim import make_adam
from .step import Networks, TrainStep, draw_noised, dsm_update


def shifted_ring(rotation: float = 0.25, radius: float = 1.7, std: float = 0.2) -> toy.GaussianMixture:
    """A generator law near ring8 but wrong in position, radius and spread."""
    angles = [2 * math.pi * i / 8 + rotation for i in range(8)]
    return toy._isotropic([[radius * math.cos(a), radius * math.sin(a)] for a in angles], std)


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _theta_grad(generator: toy.MixtureGenerator, direction: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    params = [p for p in generator.parameters()]
    grads = torch.autograd.grad(objectives.surrogate_loss(direction, x_t).mean(), params, retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads])


def gradient_bias(cfg: Config | None = None, train_steps: int = 2000, eval_samples: int = 4096, seed: int = 0) -> dict:
    """Fit both estimators against ``shifted_ring`` -> ring8 and report cosines to the exact gradient."""
    # w = sigma^2 (the papers' weighting) keeps every noise level's share of the gradient O(1).
    # This is a CPU study of the estimators, not of the kernels: the PyTorch references run it.
    # The sizes are the study's own (one 256 x 3 ratio MLP against two 181 x 3 score MLPs, the same
    # parameter budget), not the toy task's defaults, which may change.
    base = cfg or from_dict(
        {"run": {"kernels": "torch"}, "noise": {"sigma_dist": "loguniform", "sigma_min": 0.05, "sigma_max": 3.0, "weighting": "sigma2"},
         "optim": {"lr_schedule": "constant"},
         "model": {"ratio_hidden": 256, "ratio_depth": 3, "score_hidden": 181, "score_depth": 3}}
    )
    cfg_ratio = from_dict({**to_dict(base), "method": {**dataclasses.asdict(base.method), "name": "diffratio", "objective": "dikl"}})
    cfg_vsd = from_dict({**to_dict(base), "method": {**dataclasses.asdict(base.method), "name": "vsd"}})
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    draws = Draws(rng)
    p, q = toy.ring8(), shifted_ring()
    p32 = p.to("cpu", torch.float32)
    generator = toy.MixtureGenerator(q.to("cpu", torch.float32))
    q32 = generator.mixture()
    m, schedule = base.model, base.noise.schedule

    ratio = MLPRatio(2, m.ratio_hidden, m.ratio_depth, m.sigma_data, schedule)
    teacher = DenoiserScore(MLPDenoiser(2, m.score_hidden, m.score_depth, m.sigma_data), schedule)
    fake = DenoiserScore(MLPDenoiser(2, m.score_hidden, m.score_depth, m.sigma_data), schedule)

    def adam(net: torch.nn.Module) -> torch.optim.Optimizer:
        return make_adam(net.parameters(), base.optim.ratio_lr, base)

    ratio_step = TrainStep(cfg_ratio, Networks(generator, ratio=ratio), {"ratio": adam(ratio)}, draws)
    vsd_step = TrainStep(cfg_vsd, Networks(generator, teacher=teacher, fake_score=fake), {}, draws)
    opt_teacher, opt_fake = adam(teacher), adam(fake)

    batch = base.optim.batch_size
    for _ in range(train_steps):
        with torch.no_grad():
            x_real, x_fake = p32.sample(batch, rng), q32.sample(batch, rng)
        ratio_step.ratio_update(x_real, x_fake)
        dsm_update(teacher, opt_teacher, x_real, cfg_vsd, draws)
        dsm_update(fake, opt_fake, x_fake, cfg_vsd, draws)

    # Same generator draws for every estimator: only the x-space direction differs.
    component = torch.multinomial(generator.weights, eval_samples, replacement=True, generator=rng)
    z = torch.randn(eval_samples, 2, generator=rng)
    x_t, sigma, _ = draw_noised(generator(component, z), cfg_ratio, draws)
    w = loss_weight(sigma, base.noise.weighting, m.sigma_data)
    with torch.no_grad():
        exact = toy.exact_dikl_direction(x_t.double(), sigma.double(), q32.to("cpu", torch.float64), p, w.double()).float()
    est_ratio, _ = ratio_step.generator_direction(x_t.detach(), sigma)
    est_vsd, _ = vsd_step.generator_direction(x_t.detach(), sigma)

    def per_sample_cos(a: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a, exact, dim=1).mean())

    g_exact = _theta_grad(generator, exact, x_t)
    return {
        "ratio_params": _param_count(ratio),
        "vsd_params": _param_count(teacher) + _param_count(fake),
        "train_steps": train_steps,
        "ratio_theta_cosine": toy.cosine(_theta_grad(generator, est_ratio, x_t), g_exact),
        "vsd_theta_cosine": toy.cosine(_theta_grad(generator, est_vsd, x_t), g_exact),
        "ratio_x_cosine": per_sample_cos(est_ratio),
        "vsd_x_cosine": per_sample_cos(est_vsd),
    }
