"""The image ratio network, built on EDM's (or EDM2's) UNet encoder; the one-step generator and the
score are ``fastratio.networks.from_denoiser``'s, shared with the toy.

It takes x_t on the run's noise schedule (``fastratio.noise``) and the EDM noise level sigma; class
labels are one-hot [B, K] (None when unconditional), augmentation labels [B, AUGMENT_DIM] or None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..noise import expand, noise_coefficients
from .edm2 import UNet as EDM2UNet
from .unet import ARCHITECTURES, GroupNorm, Linear, Precond


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
        c_in = expand((sigma**2 + self.sigma_data**2).rsqrt(), x_t)
        if self.label_dim and class_labels is None:
            class_labels = torch.zeros(x_t.shape[0], self.label_dim, device=x_t.device)
        emb = self.model.embed(sigma.log() / 4, class_labels, augment_labels)
        h = self.model.encode(c_in * (x_t.to(torch.float32) / expand(alpha, x_t)), emb)[-1]
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


class SharedEncoderRatio(nn.Module):
    """The Di-Bregman paper's CIFAR-10 discriminator (App. D, after SiDA): the fake score's own EDM UNet
    encoder, "the mean feature vector used as the predicted discriminator logits": logit = mean of the
    bottleneck activation over channels and positions, at the fake score's own preconditioning. It holds
    no parameters (the fake score stays out of its module tree, so checkpoints and optimizers see the
    encoder once); the fake score's update trains the encoder with both losses (``TrainStep.shared_update``)."""

    def __init__(self, fake_denoiser: Precond, schedule: str = "ve"):
        super().__init__()
        self.__dict__["fake_denoiser"] = fake_denoiser
        self.schedule = schedule

    def forward(self, x_t, sigma, class_labels=None, augment_labels=None) -> torch.Tensor:
        d = self.__dict__["fake_denoiser"]
        alpha, _ = noise_coefficients(sigma, self.schedule)
        x = x_t.to(torch.float32) / expand(alpha, x_t)
        _, _, c_in, c_noise = d.coefficients(sigma.to(torch.float32).reshape(-1, 1, 1, 1))
        emb = d.model.embed(c_noise.flatten().expand(x.shape[0]), d.class_labels(class_labels, x.shape[0], x.device), augment_labels)
        return d.model.encode(c_in * x, emb)[-1].float().mean(dim=(1, 2, 3))
