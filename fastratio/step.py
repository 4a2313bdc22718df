"""One training iteration in eager mode: ratio (or fake-score) updates, then one generator update.

The step takes its inputs (a real batch and generator latents) as tensors and draws noise levels and
noise from its own ``torch.Generator``, so a later fused/graph-captured step can refill static input
buffers and keep the same arithmetic. It returns 0-dim device tensors: nothing here syncs with the
host, the loop reads metrics every ``log_every`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import objectives, ops
from .config import Config
from .noise import add_noise, loss_weight, noise_coefficients, sample_sigma


@dataclass
class Networks:
    """The modules one method trains or reads; unused roles are None."""

    generator: nn.Module
    ratio: nn.Module | None = None  # diffratio, dibregman
    teacher: nn.Module | None = None  # vsd, dibregman: frozen data score
    fake_score: nn.Module | None = None  # vsd, dibregman: score of the generator's samples


def needs_ratio(method: str) -> bool:
    return method in ("diffratio", "dibregman")


def needs_scores(method: str) -> bool:
    return method in ("vsd", "dibregman")


def draw_noised(x0: torch.Tensor, cfg: Config, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, sigma, eps): a noise level per sample and the forward-noised batch."""
    sigma = sample_sigma(cfg.noise, x0.shape[0], rng, x0.device).to(x0.dtype)
    eps = torch.randn(x0.shape, generator=rng, device=x0.device, dtype=x0.dtype)
    return add_noise(x0, sigma, eps, cfg.noise.schedule), sigma, eps


def optimizer_step(module: nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> torch.Tensor:
    """Backward, clip (0: off) and step; returns the pre-clip gradient norm without a host sync."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    opt.step()
    return norm


def dsm_update(
    score_net: nn.Module, opt: torch.optim.Optimizer, x0: torch.Tensor, cfg: Config, rng: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoising-score-matching step (Eq. 3 for the teacher on data, Eq. 4 for the fake score on
    generated samples); returns (loss, grad norm)."""
    x_t, sigma, eps = draw_noised(x0, cfg, rng)
    _, std = noise_coefficients(sigma, cfg.noise.schedule)
    weight = loss_weight(sigma, cfg.noise.weighting, cfg.model.sigma_data)
    loss = objectives.dsm_loss(score_net(x_t, sigma), eps, std, weight).mean()
    return loss.detach(), optimizer_step(score_net, opt, loss, cfg.optim.grad_clip)


class TrainStep:
    """Callable ``step(x_real, z) -> metrics`` implementing the configured method."""

    def __init__(self, cfg: Config, nets: Networks, optimizers: dict[str, torch.optim.Optimizer], rng: torch.Generator):
        self.cfg, self.nets, self.opt, self.rng = cfg, nets, optimizers, rng
        self.method = cfg.method.name
        self.triton = ops.use_triton(cfg.run.kernels, next(nets.generator.parameters()).device)

    def _noised(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return draw_noised(x0, self.cfg, self.rng)

    def _weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return loss_weight(sigma, self.cfg.noise.weighting, self.cfg.model.sigma_data)

    def _apply(self, name: str, module: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        return optimizer_step(module, self.opt[name], loss, self.cfg.optim.grad_clip)

    # -- auxiliary updates -----------------------------------------------------------------------
    def ratio_update(self, x_real: torch.Tensor, x_fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """Classifier step, real y=1 vs generated y=0, each noised at its own sigma."""
        ratio = self.nets.ratio
        xt_real, sigma_real, _ = self._noised(x_real)
        xt_fake, sigma_fake, _ = self._noised(x_fake)
        logit_real, logit_fake = ratio(xt_real, sigma_real), ratio(xt_fake, sigma_fake)
        loss = ops.classifier_loss(logit_real, logit_fake, self.triton)
        norm = self._apply("ratio", ratio, loss)
        return {
            "ratio_loss": loss.detach(),
            "ratio_acc_real": (logit_real.detach() > 0).float().mean(),
            "ratio_acc_fake": (logit_fake.detach() < 0).float().mean(),
            "ratio_grad_norm": norm,
        }

    def fake_score_update(self, x_fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """Denoising score matching of the generator's samples (the VSD 'fake' score, Eq. 4)."""
        loss, norm = dsm_update(self.nets.fake_score, self.opt["fake_score"], x_fake, self.cfg, self.rng)
        return {"fake_dsm_loss": loss, "fake_grad_norm": norm}

    # -- generator -------------------------------------------------------------------------------
    def _ratio_logit_grad(self, x_t: torch.Tensor, sigma: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Ratio logit l [B] and d l / d x_t [B, ...] (both detached), plus the logged potential."""
        cfg = self.cfg.method
        x_in = x_t.detach().requires_grad_(True)
        with torch.enable_grad():
            logit = self.nets.ratio(x_in, sigma)
            # Only d l / d x_t is needed: the ratio net's parameters get no gradient here.
            (grad_logit,) = torch.autograd.grad(logit.sum(), x_in)
        logit = logit.detach()
        potential = (w * objectives.generator_potential(logit, cfg.objective, cfg.sba_lambda)).mean()
        return logit, grad_logit, {"gen_potential": potential}

    def generator_direction(self, x_t: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x-space gradient g of the generator loss at x_t [B, ...] and diagnostics."""
        cfg = self.cfg.method
        w = self._weight(sigma)
        metrics: dict[str, torch.Tensor] = {}
        logit = None
        if needs_ratio(self.method):
            logit, grad_logit, metrics = self._ratio_logit_grad(x_t, sigma, w)
        if self.method == "diffratio":
            direction = objectives.ratio_direction(logit, grad_logit, w, cfg.objective, cfg.sba_lambda)
        else:
            with torch.no_grad():
                s_fake = self.nets.fake_score(x_t, sigma)
                s_teacher = self.nets.teacher(x_t, sigma)
            ratio_w = None if logit is None else objectives.generator_weight(logit, cfg.objective, cfg.sba_lambda)
            direction = objectives.score_difference_direction(s_fake, s_teacher, w, ratio_w)
        metrics["gen_direction_norm"] = direction.reshape(direction.shape[0], -1).norm(dim=1).mean()
        return direction, metrics

    def _fused_ratio_surrogate(self, x0: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Teacher-free surrogate through the fused kernel: the direction is never materialised."""
        from .kernels.generator_surrogate import generator_surrogate

        cfg = self.cfg.method
        w = self._weight(sigma)
        logit, grad_logit, metrics = self._ratio_logit_grad(x_t, sigma, w)
        alpha, _ = noise_coefficients(sigma, self.cfg.noise.schedule)
        scale = w * objectives.generator_weight(logit, cfg.objective, cfg.sba_lambda)
        metrics["gen_direction_norm"] = (scale * grad_logit.reshape(grad_logit.shape[0], -1).norm(dim=1)).mean()
        return generator_surrogate(x0, grad_logit, logit, w, alpha, cfg.objective, cfg.sba_lambda), metrics

    def generator_update(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        x0 = self.nets.generator(z)
        x_t, sigma, _ = self._noised(x0)
        if self.triton and self.method == "diffratio":
            per_sample, metrics = self._fused_ratio_surrogate(x0, x_t.detach(), sigma)
        else:
            direction, metrics = self.generator_direction(x_t.detach(), sigma)
            per_sample = objectives.surrogate_loss(direction, x_t)
        metrics["gen_grad_norm"] = self._apply("generator", self.nets.generator, per_sample.mean())
        return metrics

    def __call__(self, x_real: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        metrics: dict[str, torch.Tensor] = {}
        for _ in range(self.cfg.method.ratio_steps):
            with torch.no_grad():
                x_fake = self.nets.generator(z)
            if needs_ratio(self.method):
                metrics.update(self.ratio_update(x_real, x_fake))
            if needs_scores(self.method):
                metrics.update(self.fake_score_update(x_fake))
        metrics.update(self.generator_update(z))
        return metrics

