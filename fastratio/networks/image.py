"""The roles of the image method built on EDM's networks: one-step generator, ratio network, score.

All take x_t on the run's noise schedule (``fastratio.noise``) and the EDM noise level sigma; class
labels are one-hot [B, K] (None when unconditional), augmentation labels [B, AUGMENT_DIM] or None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..noise import noise_coefficients
from .edm2 import UNet as EDM2UNet
from .unet import ARCHITECTURES, GroupNorm, Linear, Precond


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


class OneStepGenerator(nn.Module):
    """g(z, c) = D(sigma_init z; sigma_init, c): an EDM denoiser applied once at a fixed noise level,
    initialised from the teacher ("Towards..." Sec. 4: without this init training collapses)."""

    def __init__(self, denoiser: Precond, sigma_init: float, checkpointing: bool = False):
        super().__init__()
        self.denoiser, self.sigma_init = denoiser, sigma_init
        # Activation checkpointing per UNet block: only block inputs (and the decoder's skips) stay
        # alive between the forward and the backward, which recomputes each block once.
        denoiser.model.checkpointing = checkpointing

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.full((z.shape[0],), self.sigma_init, device=z.device)
        return self.denoiser(self.sigma_init * z, sigma, class_labels)


class DenoiserScore(nn.Module):
    """Score of the noised marginal from a denoiser: with x_t = alpha x0 + std eps (std = alpha sigma),
    grad log p(x_t) = (alpha D(x_t / alpha; sigma) - x_t) / std^2 (Tweedie)."""

    def __init__(self, denoiser: Precond, schedule: str):
        super().__init__()
        self.denoiser, self.schedule = denoiser, schedule

    def forward(self, x_t, sigma, class_labels=None, augment_labels=None) -> torch.Tensor:
        alpha, std = (_expand(v, x_t) for v in noise_coefficients(sigma, self.schedule))
        d = self.denoiser(x_t / alpha, sigma, class_labels, augment_labels)
        return (alpha * d - x_t) / std**2


class RatioUNet(nn.Module):
    """Ratio classifier c(x_t, sigma) -> logit [B]: the encoder half of an EDM UNet, or of EDM2's
    (``model_type="EDM2UNet"``), with the same mapping network and encoder blocks, so it can start
    from the teacher's, and a GroupNorm-SiLU-mean-pool linear head on the bottleneck. Input preconditioning as EDM: c_in = 1/sqrt(sigma^2 + sd^2),
    c_noise = ln(sigma)/4."""

    def __init__(
        self, img_resolution: int, img_channels: int, label_dim: int = 0, sigma_data: float = 0.5,
        schedule: str = "ve", model_type: str = "SongUNet", **model_kwargs,
    ):
        super().__init__()
        self.sigma_data, self.schedule, self.label_dim = sigma_data, schedule, label_dim
        if model_type == "EDM2UNet":  # the encoder of EDM2's magnitude-preserving UNet
            self.model = EDM2UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, encoder_only=True, **model_kwargs)
        else:
            self.model = ARCHITECTURES[model_type](
                img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                label_dim=label_dim, encoder_only=True, **model_kwargs,
            )
        channels = self.model.encoder_channels
        self.head_norm = GroupNorm(channels)
        self.head = Linear(channels, 1, init_mode="xavier_uniform")

    def forward(self, x_t, sigma, class_labels=None, augment_labels=None) -> torch.Tensor:
        alpha, _ = noise_coefficients(sigma, self.schedule)
        sigma = sigma.to(torch.float32)
        c_in = _expand((sigma**2 + self.sigma_data**2).rsqrt(), x_t)
        if self.label_dim and class_labels is None:
            class_labels = torch.zeros(x_t.shape[0], self.label_dim, device=x_t.device)
        emb = self.model.embed(sigma.log() / 4, class_labels, augment_labels)
        h = self.model.encode(c_in * (x_t.to(torch.float32) / _expand(alpha, x_t)), emb)[-1]
        h = F.silu(self.head_norm(h)).mean(dim=(2, 3))
        return self.head(h).squeeze(1).to(torch.float32)

    def load_encoder(self, denoiser: Precond) -> int:
        """Copy the teacher's mapping network and encoder (every shared name); returns tensors copied."""
        ours = self.model.state_dict()
        theirs = {k: v for k, v in denoiser.model.state_dict().items() if k in ours}
        missing = [k for k in ours if k not in theirs]
        if missing:
            raise ValueError(f"teacher encoder lacks {missing[0]} (and {len(missing) - 1} more): architectures differ")
        self.model.load_state_dict(theirs)
        return len(theirs)
