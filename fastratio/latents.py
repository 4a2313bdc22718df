"""EDM2's latent space: Stable Diffusion VAE posteriors stored raw, scaled to the networks' latents.

As EDM2 (``training/encoders.py``, ``StabilityVAEEncoder``): pixels (uint8, divided by 255) go
through ``AutoencoderKL.encode`` to the *raw* latents stored in a dataset, the posterior mean and std
concatenated (8 x H/8 x W/8). Training draws mean + std * eps and maps it to the *final* latents the
networks see, x = (z - raw_mean) * final_std / raw_std + final_mean per channel (EDM2's constants
for ``stabilityai/sd-vae-ft-mse``); decoding inverts the map, runs ``AutoencoderKL.decode`` and
returns uint8 pixels (clamp to [0, 1], times 255).

The VAE is ``diffusers.AutoencoderKL`` (``pip install -e ".[latent]"``), loaded from a local folder
or the Hugging Face cache only (``local_files_only``: nothing is downloaded), and from safetensors
only: a ``diffusion_pytorch_model.bin`` is a pickle, which diffusers would unpickle.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError

RAW_MEAN = (5.81, 3.25, 0.12, -2.15)  # EDM2's assumed statistics of sd-vae-ft-mse's raw latents
RAW_STD = (4.17, 4.62, 3.71, 3.28)
FINAL_MEAN, FINAL_STD = 0.0, 0.5
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
_GET_VAE = ("get it with `huggingface-cli download stabilityai/sd-vae-ft-mse --include '*.json' '*.safetensors'` "
            "on a machine with internet and copy the folder, then give its path")


class LatentScaling:
    """The per-channel affine map raw -> final latents (EDM2's ``scale`` and ``bias``, computed in
    float32 in EDM2's order), as tensors on one device: no host copy inside a captured step."""

    def __init__(self, raw_mean=RAW_MEAN, raw_std=RAW_STD, final_mean: float = FINAL_MEAN, final_std: float = FINAL_STD,
                 device: torch.device | str = "cpu"):
        self.raw_mean, self.raw_std = tuple(float(v) for v in raw_mean), tuple(float(v) for v in raw_std)
        self.final_mean, self.final_std = float(final_mean), float(final_std)
        scale = torch.tensor(self.final_std, dtype=torch.float32) / torch.tensor(self.raw_std, dtype=torch.float32)
        bias = torch.tensor(self.final_mean, dtype=torch.float32) - torch.tensor(self.raw_mean, dtype=torch.float32) * scale
        self.scale, self.bias = scale.reshape(1, -1, 1, 1).to(device), bias.reshape(1, -1, 1, 1).to(device)

    def state(self) -> dict:
        """Plain values (saved in checkpoints; ``LatentScaling(**state)`` rebuilds it)."""
        return {"raw_mean": list(self.raw_mean), "raw_std": list(self.raw_std), "final_mean": self.final_mean, "final_std": self.final_std}

    def to_final(self, raw: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Final latents [B, C, h, w] from raw mean/std [B, 2C, h, w] and a standard normal draw [B, C, h, w]."""
        mean, std = raw.to(torch.float32).chunk(2, dim=1)
        return (mean + eps * std) * self.scale.to(raw.device) + self.bias.to(raw.device)

    def to_raw(self, final: torch.Tensor) -> torch.Tensor:
        return (final.to(torch.float32) - self.bias.to(final.device)) / self.scale.to(final.device)


def load_vae(name_or_path: str, device: torch.device):
    """``diffusers.AutoencoderKL`` from a local folder or the Hugging Face cache, safetensors only."""
    from .hf import import_diffusers

    diffusers = import_diffusers("data.vae", extra="latent")
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(name_or_path, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as err:
        where = "folder" if Path(name_or_path).exists() else "name (not in the Hugging Face cache)"
        raise UserError(f"data.vae: cannot load an AutoencoderKL from the {where} {name_or_path} "
                        f"({str(err).splitlines()[0][:120]}); {_GET_VAE}") from None
    return vae.eval().requires_grad_(False).to(device)


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Raw latents (posterior mean and std, [B, 8, H/8, W/8] float32) of uint8 pixels [B, 3, H, W]."""
    x = pixels.to(torch.float32) / 255
    out = []
    for chunk in x.split(batch):
        dist = vae.encode(chunk)["latent_dist"]
        out.append(torch.cat([dist.mean, dist.std], dim=1))
    return torch.cat(out)


@torch.no_grad()
def decode(vae, final: torch.Tensor, scaling: LatentScaling, batch: int = 8) -> torch.Tensor:
    """uint8 pixels [B, 3, H, W] of final latents [B, 4, h, w]."""
    raw = scaling.to_raw(final)
    out = [vae.decode(chunk)["sample"] for chunk in raw.split(batch)]
    return torch.cat(out).clamp(0, 1).mul(255).to(torch.uint8)
