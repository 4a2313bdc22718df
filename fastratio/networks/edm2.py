"""EDM2's magnitude-preserving UNet and its preconditioning (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models"; NVlabs/edm2 ``training/networks_edm2.py``).

Class names, constructor arguments, parameter names and shapes are EDM2's, so the ``_init_kwargs``
and tensors of an EDM2 pickle build and load this module (fastratio.edm_import) and a state_dict
moves between the two unchanged. Equation numbers are the paper's. Differences, none numerical:
  - attention goes through ``F.scaled_dot_product_attention`` (EDM2 uses two einsums and a softmax;
    the outputs agree to float rounding, tests/test_edm2.py);
  - the resampling filter is a non-persistent buffer (EDM2 builds it per call), so a captured CUDA
    graph has no host-to-device copy inside;
  - ``use_fp16`` is kept for EDM2's kwargs but precision comes from the caller's autocast (bf16).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .unet import conditioning_labels, edm_coefficients

# train_edm2.py's img512 presets (width, dropout, reference learning rate, training length in Mi
# images at batch 2048) and the ImageNet-512 networks NVIDIA released per size, the FID-optimal
# post-hoc EMA of each (generate_images.py).
PRESETS = {
    "xxs": {"channels": 64, "dropout": 0.0, "lr": 0.0170, "duration_mi": 2048},
    "xs": {"channels": 128, "dropout": 0.0, "lr": 0.0120, "duration_mi": 2048},
    "s": {"channels": 192, "dropout": 0.0, "lr": 0.0100, "duration_mi": 2048},
    "m": {"channels": 256, "dropout": 0.1, "lr": 0.0090, "duration_mi": 2048},
    "l": {"channels": 320, "dropout": 0.1, "lr": 0.0080, "duration_mi": 1792},
    "xl": {"channels": 384, "dropout": 0.1, "lr": 0.0070, "duration_mi": 1280},
    "xxl": {"channels": 448, "dropout": 0.1, "lr": 0.0065, "duration_mi": 896},
}
IMG512_RELEASES = {
    "xs": "edm2-img512-xs-2147483-0.135.pkl", "s": "edm2-img512-s-2147483-0.130.pkl", "m": "edm2-img512-m-2147483-0.100.pkl",
    "l": "edm2-img512-l-1879048-0.085.pkl", "xl": "edm2-img512-xl-1342177-0.085.pkl", "xxl": "edm2-img512-xxl-0939524-0.070.pkl",
}


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Unit magnitude over ``dim`` (default: all but the first): x / (eps + ||x|| / sqrt(n)) (Eq. 66)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU (Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving weighted sum (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation (Eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([c / math.sqrt(na) * (1 - t) * a, c / math.sqrt(nb) * t * b], dim=dim)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features (Eq. 75): sqrt(2) cos(2 pi (f x + phi))."""

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * np.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution or linear layer (Eq. 47) with forced weight normalization
    (Eq. 66): in training mode the stored weight is renormalized in place before every use."""

    def __init__(self, in_channels: int, out_channels: int, kernel: list[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))


class Block(nn.Module):
    """Encoder or decoder block with optional self-attention (EDM2 Fig. 21)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc", resample_mode: str = "keep",
                 resample_filter=(1, 1), attention: bool = False, channels_per_head: int = 64, dropout: float = 0,
                 res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        self.out_channels, self.flavor, self.resample_mode = out_channels, flavor, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None
        f = np.asarray(resample_filter, dtype=np.float32)
        if f.ndim != 1 or len(f) % 2:
            raise ValueError(f"resample_filter {list(resample_filter)} must be a 1-D filter of even length")
        self._pad = (len(f) - 1) // 2
        f = np.outer(f / f.sum(), f / f.sum())[None, None]
        self.register_buffer("resample_kernel", torch.from_numpy(f * (4 if resample_mode == "up" else 1)), persistent=False)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample_mode == "keep":
            return x
        f = self.resample_kernel.to(x.dtype).tile([x.shape[1], 1, 1, 1])
        conv = F.conv2d if self.resample_mode == "down" else F.conv_transpose2d
        return conv(x, f, groups=x.shape[1], stride=2, padding=(self._pad,))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self._resample(x)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            y = self.attn_qkv(x)
            b, _, h, w = y.shape
            y = y.reshape(b, self.num_heads, -1, 3, h * w)
            q, k, v = normalize(y, dim=2).unbind(3)  # pixel norm, then [B, heads, C, L] each
            # EDM2's softmax(q^T k / sqrt(C)) over keys, as [B, heads, L, C] for SDPA (its default scale is 1/sqrt(C)).
            y = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)).transpose(2, 3)
            x = mp_sum(x, self.attn_proj(y.reshape(*x.shape)), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)  # EDM2 clips in place; same values
        return x


class UNet(nn.Module):
    """EDM2's UNet (Fig. 21): ``enc`` and ``dec`` ModuleDicts keyed ``{res}x{res}_{conv,down,blockN,in0,in1,up}``.
    ``encoder_only`` builds the embedding and the encoder alone (the ratio network's half; its names
    are a subset of the full network's, so it loads from a teacher)."""

    # Activation checkpointing (model.checkpointing, set on the generator): each block keeps only its
    # input and recomputes its activations in the backward pass.
    checkpointing: bool = False

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult=(1, 2, 3, 4), channel_mult_noise: int | None = None, channel_mult_emb: int | None = None,
                 num_blocks: int = 3, attn_resolutions=(16, 8), label_balance: float = 0.5, concat_balance: float = 0.5,
                 encoder_only: bool = False, **block_kwargs):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="enc", attention=res in attn_resolutions, **block_kwargs)
        self.encoder_channels = cout
        if encoder_only:
            self.dec = None
            return

        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="dec", attention=res in attn_resolutions, **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None, augment_labels=None) -> torch.Tensor:
        if augment_labels is not None:
            raise ValueError("EDM2 networks take no augmentation labels")
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance)
        return mp_silu(emb)

    def encode(self, x: torch.Tensor, emb: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's outputs, one per block (the decoder's skips; the last is the bottleneck)."""
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else self._block(block, x, emb)
            skips.append(x)
        return skips

    def _block(self, block: Block, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, emb, use_reentrant=False)
        return block(x, emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        if self.dec is None:
            raise RuntimeError("an encoder_only UNet has no decoder: use embed() and encode()")
        emb = self.embed(noise_labels, class_labels)
        skips = self.encode(x, emb)
        x = skips[-1]
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = self._block(block, x, emb)
        return self.out_conv(x, gain=self.out_gain)


class Precond(nn.Module):
    """EDM2's denoiser D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma)/4) (EDM's coefficients) with
    the learned uncertainty u(sigma) of its loss (Eq. 21), returned with ``return_logvar``."""

    sigma_min, sigma_max = 0.0, float("inf")  # EDM2 bounds no noise level (samplers use 0.002..80)

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = True, sigma_data: float = 0.5,
                 logvar_channels: int = 128, **unet_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = use_fp16  # kept for EDM2's kwargs; precision comes from the caller's autocast
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    @property
    def model(self) -> UNet:
        """The UNet under EDM's attribute name (generator checkpointing, the ratio net's encoder copy)."""
        return self.unet

    def forward(self, x, sigma, class_labels=None, augment_labels=None, return_logvar: bool = False):
        if augment_labels is not None:
            raise ValueError("EDM2 networks take no augmentation labels")
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        f_x = self.unet(c_in * x, c_noise.flatten().expand(x.shape[0]), conditioning_labels(self.label_dim, class_labels, x.shape[0], x.device))
        d_x = c_skip * x + c_out * f_x.to(torch.float32)
        if return_logvar:
            return d_x, self.logvar_linear(self.logvar_fourier(c_noise.flatten().expand(x.shape[0]))).reshape(-1, 1, 1, 1)
        return d_x
