"""Training objectives as pure tensor functions.

Conventions (papers in ``shared/papers``):
- ``l`` is the ratio network's logit for "real": c = sigmoid(l) estimates p(y=1 | x_t), real data
  labelled y=1, generated y=0. At the optimum l = log p_t(x) - log q_t(x), so log q/p ~= -l
  ("Towards Training One-Step Diffusion Models Without Distillation", Eq. 6-7; Di-Bregman Sec. 3:
  r_t = e^{-l}).
- Every generator objective is expressed as an x-space *direction* g(x_t): the gradient of the
  generator loss with respect to the noised sample. The training step carries it into the generator
  with one backward pass of the surrogate ``sum(sg(g) * x_t)`` (see ``surrogate_loss``).
- Functions return per-sample values; callers reduce and scale them.

All weights are computed from log-sigmoid/softplus or clamped exponents, so float32 and bfloat16
stay finite for logits of any size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .noise import expand

# exp(80) ~ 5.5e34 is finite in float32 and bfloat16; a weight beyond it would overflow the
# gradient it multiplies anyway, so exponential Bregman weights saturate there.
MAX_LOG_WEIGHT = 80.0


def _per_sample_sum(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


# --- ratio estimation ---------------------------------------------------------------------------

def ratio_classifier_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy of the ratio classifier, real y=1 vs generated y=0 (Eq. 6 of "Towards...";
    Di-Bregman Eq. 5 with D = sigmoid(l)).

    Returns per-sample losses (-log c(x_real), -log(1 - c(x_fake))) = (softplus(-l_r), softplus(l_f)).
    """
    return F.softplus(-logit_real), F.softplus(logit_fake)


# --- generator weights from the ratio logit -----------------------------------------------------

def generator_weight(logit: torch.Tensor, objective: str, sba_lambda: float = 5.0) -> torch.Tensor:
    """Per-sample weight that turns grad_x log(q/p) into the generator direction, shaped like ``logit``.

    The direction of each objective is weight(l) * grad_x log(q/p) = -weight(l) * grad_x l:
      dikl: logit(1 - c)          -> weight 1                    ("Towards..." Eq. 7-8)
      dijs: log(1 - c)            -> weight sigmoid(l)           ("Towards..." Eq. 9)
      dirm: -log c                -> weight sigmoid(-l)          ("Towards..." Eq. 10)
      Bregman h''(r) r at r = e^{-l} (Di-Bregman Table 1):
      lr: sigmoid(l), kl: 1, be: e^{l}, ls: e^{-l}, sba: e^{-lambda l}.
    The exponential weights are exp(log-weight) with the log-weight clamped at MAX_LOG_WEIGHT.
    """
    if objective in ("dikl", "kl"):
        return torch.ones_like(logit)
    if objective in ("dijs", "lr"):
        return torch.sigmoid(logit)
    if objective == "dirm":
        return torch.sigmoid(-logit)
    if objective == "be":
        log_w = logit
    elif objective == "ls":
        log_w = -logit
    elif objective == "sba":
        log_w = -sba_lambda * logit
    else:
        raise ValueError(f"unknown generator objective {objective!r}")
    return torch.exp(log_w.clamp(max=MAX_LOG_WEIGHT))


def generator_potential(logit: torch.Tensor, objective: str, sba_lambda: float = 5.0) -> torch.Tensor:
    """Per-sample scalar F(l) whose derivative is -weight(l): the generator minimises w(sigma) F(l(x_t)).

    dikl/kl: -l = logit(1 - c); dijs/lr: -softplus(l) = log(1 - c); dirm: softplus(-l) = -log c;
    be: -e^{l}; ls: e^{-l}; sba: e^{-lambda l} / lambda. Used for logging and as the autograd
    reference of the direction; exponentials are clamped as in ``generator_weight``.
    """
    if objective in ("dikl", "kl"):
        return -logit
    if objective in ("dijs", "lr"):
        return -F.softplus(logit)
    if objective == "dirm":
        return F.softplus(-logit)
    if objective == "be":
        return -torch.exp(logit.clamp(max=MAX_LOG_WEIGHT))
    if objective == "ls":
        return torch.exp((-logit).clamp(max=MAX_LOG_WEIGHT))
    if objective == "sba":
        return torch.exp((-sba_lambda * logit).clamp(max=MAX_LOG_WEIGHT)) / sba_lambda
    raise ValueError(f"unknown generator objective {objective!r}")


def ratio_direction(
    logit: torch.Tensor, grad_logit: torch.Tensor, weight_sigma: torch.Tensor, objective: str, sba_lambda: float = 5.0
) -> torch.Tensor:
    """Teacher-free generator direction g = w(sigma) * weight(l) * grad_x log(q/p) = -w weight(l) grad_x l.

    DiKL/DiJS/DiRM ("Towards..." Eq. 8-10) and teacher-free Di-Bregman (Di-Bregman Eq. 37, where
    h''(r) grad_x r = h''(r) r grad_x log r; Eq. 37 as printed carries the opposite sign, which
    would contradict Eq. 4 through grad_x r = r (grad log q - grad log p), so we follow Eq. 4).

    logit: [B]; grad_logit: [B, ...] = d l / d x_t; weight_sigma: [B] = w(sigma). Returns [B, ...].
    """
    scale = -weight_sigma * generator_weight(logit, objective, sba_lambda)
    return expand(scale, grad_logit) * grad_logit


def score_difference_direction(
    score_fake: torch.Tensor, score_teacher: torch.Tensor, weight_sigma: torch.Tensor, ratio_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Generator direction from two score networks: g = w(sigma) [h''(r) r] (s_fake - s_teacher).

    With ratio_weight None this is VSD/Diff-Instruct ("Towards..." Eq. 5; Di-Bregman Eq. 1);
    with ratio_weight = generator_weight(l, objective) it is Di-Bregman with a teacher (Eq. 4).
    """
    scale = weight_sigma if ratio_weight is None else weight_sigma * ratio_weight
    return expand(scale, score_fake) * (score_fake - score_teacher)


def dmd_weight(sigma: torch.Tensor, x0: torch.Tensor, denoised_real: torch.Tensor) -> torch.Tensor:
    """DMD's per-sample normalisation as a w(sigma) [B] of ``score_difference_direction`` (Yin et al.
    2024, Eq. 8; DMD2 keeps it): the x0-space gradient is (D_fake - D_real) / mean|x0 - D_real|, the
    mean over each sample's elements, D_real the (guided) teacher's denoised estimate at x_t. The step
    carries g = w (s_fake - s_teacher) into x0 with dx_t/dx0 = alpha, and alpha (s_fake - s_teacher) =
    alpha^2 (D_fake - D_real) / std^2 = (D_fake - D_real) / sigma^2, so w = sigma^2 / mean|x0 - D_real|.
    The mean is floored at 1e-6 (a sample its teacher reproduces exactly would divide by zero)."""
    return sigma**2 / (x0 - denoised_real).abs().reshape(x0.shape[0], -1).mean(dim=1).clamp_min(1e-6)


def gan_direction(logit: torch.Tensor, grad_logit: torch.Tensor) -> torch.Tensor:
    """x-space gradient of the optional GAN term L_GAN = -log D(x_t) with D = sigmoid(l) (Di-Bregman
    Algorithm 1, "calculate GAN loss"; D is the ratio network, trained by Eq. 5):
    d/dx_t [-log sigmoid(l)] = -sigmoid(-l) grad_x l. Its potential is softplus(-l).

    logit: [B]; grad_logit: [B, ...]. Returns [B, ...]; the caller scales it by w_GAN (no w(sigma))."""
    return expand(-torch.sigmoid(-logit), grad_logit) * grad_logit


def surrogate_loss(direction: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Per-sample surrogate <sg(g), x_t>: its gradient w.r.t. the generator is g * dx_t/dtheta (Eq. 2)."""
    return _per_sample_sum(direction.detach() * x_t)


# --- denoising score matching (teacher and fake score) ------------------------------------------

def dsm_loss(score: torch.Tensor, noise: torch.Tensor, noise_std: torch.Tensor, weight_sigma: torch.Tensor) -> torch.Tensor:
    """Denoising score matching, w(sigma) * 1/2 ||s(x_t) - grad log k(x_t | x0)||^2 ("Towards..." Eq. 3-4).

    For x_t = alpha x0 + std * eps the kernel score is -eps / std. score, noise: [B, ...];
    noise_std, weight_sigma: [B]. Returns [B].
    """
    target = -noise / expand(noise_std, noise)
    return weight_sigma * 0.5 * _per_sample_sum((score - target) ** 2)


def denoiser_loss(denoised: torch.Tensor, clean: torch.Tensor, weight_sigma: torch.Tensor) -> torch.Tensor:
    """EDM's training loss (Karras et al. 2022, Eq. 2 / Table 1): lambda(sigma) ||D(x + n; sigma) - x||^2
    per sample [B]; the sigma law and lambda come from ``fastratio.noise.teacher_sigma``."""
    return weight_sigma * _per_sample_sum((denoised - clean) ** 2)


def uncertainty_loss(denoised: torch.Tensor, clean: torch.Tensor, weight_sigma: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """EDM2's loss with learned uncertainty u(sigma) (Karras et al. 2024, Eq. 21): per element
    lambda(sigma) / e^u ||D - x||^2 + u, summed per sample [B]. logvar: [B, 1, 1, 1]; weight_sigma: [B]."""
    per_element = expand(weight_sigma, denoised) / logvar.exp() * (denoised - clean) ** 2 + logvar
    return _per_sample_sum(per_element)


def r1_penalty(grad_real: torch.Tensor) -> torch.Tensor:
    """R1 gradient penalty ||grad_x l(x)||^2 per real sample [B] (Mescheder et al. 2018, Eq. 9); the
    caller scales it by gamma/2 and differentiates through it (double backward)."""
    return _per_sample_sum(grad_real**2)
