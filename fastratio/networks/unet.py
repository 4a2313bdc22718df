"""EDM's image networks: DDPM++ (``SongUNet``), ADM (``DhariwalUNet``) and ``EDMPrecond``.

Written from the description in Karras et al. 2022 (EDM, Appendix B and Table 7) and the parameter
layout of NVlabs/edm ``training/networks.py``: every parameter and buffer has EDM's name and shape,
so an EDM snapshot's tensors load with ``load_state_dict(strict=True)`` (see ``fastratio.edm_import``)
and the same settings give EDM's parameter counts (tests/test_unet.py). Differences that do not touch
the weights: attention runs through ``F.scaled_dot_product_attention``; mixed precision comes from the
caller's bf16 autocast instead of EDM's ``use_fp16`` casts. ``SongUNet`` builds every encoder
('standard' for DDPM++, 'residual' for NCSN++, 'skip') and decoder ('standard', 'skip') EDM has;
the preconditionings are EDM's own (``EDMPrecond``) and the VP/VE baselines (``VPPrecond``,
``VEPrecond``), all behind one denoiser interface D(x; sigma, class_labels, augment_labels).

Each UNet can be built ``encoder_only``: the mapping network plus the encoder, the half the ratio
network (``fastratio.networks.ratio_unet``) reuses with a scalar head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def _init_weight(shape: list[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = {"mode": init_mode, "fan_in": in_features, "fan_out": out_features}
        self.weight = nn.Parameter(_init_weight([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(_init_weight([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """3x3/1x1 convolution with optional 2x FIR up/downsampling (``resample_filter`` taps, separable).
    ``kernel=0`` is a pure resampler (a skip path)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False, down: bool = False,
        resample_filter: tuple[int, ...] = (1, 1), fused_resample: bool = False, init_mode: str = "kaiming_normal",
        init_weight: float = 1.0, init_bias: float = 0.0,
    ):
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        self.fused_resample = fused_resample
        fans = {"mode": init_mode, "fan_in": in_channels * kernel * kernel, "fan_out": out_channels * kernel * kernel}
        self.weight = nn.Parameter(_init_weight([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
        self.bias = nn.Parameter(_init_weight([out_channels], **fans) * init_bias) if kernel and bias else None
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        taps = torch.outer(taps, taps)[None, None] / taps.sum().square()
        self.register_buffer("resample_filter", taps if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        if self.up or self.down:
            f = self.resample_filter.to(x.dtype)
            f_pad = (f.shape[-1] - 1) // 2
        if self.fused_resample and w is not None and self.up:
            # EDM's fused order (NCSN++'s residual encoder uses the down case): filter and conv share padding.
            x = F.conv_transpose2d(x, (f * 4).tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and w is not None and self.down:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """Residual block (GroupNorm-SiLU-conv x2, embedding injected between) with optional resampling
    and self-attention; the union of DDPM++ and ADM blocks, as in EDM."""

    def __init__(
        self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
        attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64, dropout: float = 0.0,
        skip_scale: float = 1.0, eps: float = 1e-5, resample_filter: tuple[int, ...] = (1, 1), resample_proj: bool = False,
        adaptive_scale: bool = True, init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None,
    ):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else {"init_weight": 0}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self._attention(self.norm2(x))) + x) * self.skip_scale
        return x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        # EDM's qkv channel layout is [head, channel, (q|k|v)]: keep it so EDM weights load unchanged.
        # q, k, v go to SDPA as [B, heads, L, D] with unit last stride (one copy of qkv), which the fused
        # flash / memory-efficient GPU kernels require; a strided last dim falls back to the math
        # kernel and materialises the [L, L] scores.
        b, c, h, w = x.shape
        qkv = self.qkv(x).reshape(b, self.num_heads, c // self.num_heads, 3, h * w)
        q, k, v = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)  # 3 x [B, heads, L, D]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, L, D]
        return out.transpose(2, 3).reshape(b, c, h, w)


class PositionalEmbedding(nn.Module):
    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class _UNetBase(nn.Module):
    """Shared forward: mapping network -> encoder (skips kept) -> decoder (skips concatenated)."""

    map_label: Linear | None
    map_augment: Linear | None
    label_dropout: float
    # Activation checkpointing (model.checkpointing, set on the generator): each block keeps only its
    # input and recomputes its activations in the backward pass.
    checkpointing: bool = False

    def _block(self, block: nn.Module, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if not isinstance(block, UNetBlock):
            return block(x)
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, emb, use_reentrant=False)
        return block(x, emb)

    def _dropped_labels(self, class_labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.label_dropout:
            keep = torch.rand(class_labels.shape[0], 1, device=class_labels.device) >= self.label_dropout
            return class_labels * keep.to(class_labels.dtype)
        return class_labels

    def _build_unet(
        self, img_resolution: int, in_channels: int, model_channels: int, channel_mult, num_blocks: int, attn_resolutions,
        block: dict, init: dict, *, scale_first_conv: bool, attend_every_decoder_block: bool, encoder_only: bool,
        song_aux: dict | None = None,
    ) -> int:
        """EDM's encoder (``enc``) and decoder (``dec``) layout, shared by DDPM++/NCSN++ and ADM; returns the
        last width. They differ in the first conv's width (ADM scales it by the first multiplier), in
        which decoder blocks attend (ADM: all at an attention resolution; SongUNet: the last of each),
        and in SongUNet's auxiliary paths (``song_aux``: encoder_type, decoder_type, resample_filter,
        out_channels, init_zero), whose layers carry 'aux' in their names as in EDM."""
        aux = song_aux or {"encoder_type": "standard", "decoder_type": "standard"}
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * (mult if scale_first_conv else 1)
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if aux["encoder_type"] == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True, resample_filter=aux["resample_filter"])
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if aux["encoder_type"] == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, 3, down=True, resample_filter=aux["resample_filter"], fused_resample=True, **init
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.encoder_channels = cout
        self.dec = None
        if encoder_only:
            return cout
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = res in attn_resolutions and (attend_every_decoder_block or idx == num_blocks)
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if song_aux is not None and (aux["decoder_type"] == "skip" or level == 0):
                out = aux["out_channels"]
                if aux["decoder_type"] == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out, out, 0, up=True, resample_filter=aux["resample_filter"])
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out, 3, **aux["init_zero"])
        return cout

    def encode(self, x: torch.Tensor, emb: torch.Tensor) -> list[torch.Tensor]:
        """Every encoder activation, in order (the decoder's skips; the last is the bottleneck input).
        SongUNet's aux layers feed a second path built from the input image (EDM's forward)."""
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = self._block(block, x, emb)
                skips.append(x)
        return skips

    def decode(self, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        x, aux, tmp = skips[-1], None, None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = self._block(block, x, emb)
        return self.output(x, aux)

    def output(self, x: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None) -> torch.Tensor:
        if self.dec is None:
            raise RuntimeError("an encoder_only UNet has no decoder: use embed() and encode()")
        emb = self.embed(noise_labels, class_labels, augment_labels)
        return self.decode(self.encode(x, emb), emb)


class SongUNet(_UNetBase):
    """DDPM++ (Song et al. 2021) as configured in EDM: defaults are EDM's; its CIFAR-10 config sets
    model_channels=128, channel_mult=(2, 2, 2), dropout 0.13 and augment_dim=9."""

    def __init__(
        self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0, augment_dim: int = 0,
        model_channels: int = 128, channel_mult: tuple[int, ...] = (1, 2, 2, 2), channel_mult_emb: int = 4,
        num_blocks: int = 4, attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.10, label_dropout: float = 0.0,
        embedding_type: str = "positional", channel_mult_noise: int = 1, encoder_type: str = "standard",
        decoder_type: str = "standard", resample_filter: tuple[int, ...] = (1, 1), encoder_only: bool = False,
    ):
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"SongUNet: embedding_type {embedding_type!r} is not positional or fourier")
        if encoder_type not in ("standard", "skip", "residual") or decoder_type not in ("standard", "skip"):
            raise ValueError(f"SongUNet: encoder_type {encoder_type!r} / decoder_type {decoder_type!r} unknown to EDM")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = {"init_mode": "xavier_uniform"}
        init_zero = {"init_mode": "xavier_uniform", "init_weight": 1e-5}
        init_attn = {"init_mode": "xavier_uniform", "init_weight": math.sqrt(0.2)}
        block = {
            "emb_channels": emb_channels, "num_heads": 1, "dropout": dropout, "skip_scale": math.sqrt(0.5), "eps": 1e-6,
            "resample_filter": tuple(resample_filter), "resample_proj": True, "adaptive_scale": False,
            "init": init, "init_zero": init_zero, "init_attn": init_attn,
        }
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        song_aux = {"encoder_type": encoder_type, "decoder_type": decoder_type, "resample_filter": tuple(resample_filter),
                    "out_channels": out_channels, "init_zero": init_zero}
        self._build_unet(img_resolution, in_channels, model_channels, channel_mult, num_blocks, attn_resolutions, block, init,
                         scale_first_conv=False, attend_every_decoder_block=False, encoder_only=encoder_only, song_aux=song_aux)

    def embed(self, noise_labels, class_labels=None, augment_labels=None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # EDM orders (sin, cos)
        if self.map_label is not None:
            emb = emb + self.map_label(self._dropped_labels(class_labels) * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def output(self, x: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        return aux  # the decoder's aux path ends in the image (EDM returns it)


class DhariwalUNet(_UNetBase):
    """ADM (Dhariwal & Nichol 2021) as configured in EDM; its ImageNet-64 config is the defaults with
    label_dim=1000."""

    def __init__(
        self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0, augment_dim: int = 0,
        model_channels: int = 192, channel_mult: tuple[int, ...] = (1, 2, 3, 4), channel_mult_emb: int = 4,
        num_blocks: int = 3, attn_resolutions: tuple[int, ...] = (32, 16, 8), dropout: float = 0.10,
        label_dropout: float = 0.0, encoder_only: bool = False,
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = {"init_mode": "kaiming_uniform", "init_weight": math.sqrt(1 / 3), "init_bias": math.sqrt(1 / 3)}
        init_zero = {"init_mode": "kaiming_uniform", "init_weight": 0, "init_bias": 0}
        block = {"emb_channels": emb_channels, "channels_per_head": 64, "dropout": dropout, "init": init, "init_zero": init_zero}

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal", init_weight=math.sqrt(label_dim)) if label_dim else None
        )

        cout = self._build_unet(img_resolution, in_channels, model_channels, channel_mult, num_blocks, attn_resolutions, block, init,
                                scale_first_conv=True, attend_every_decoder_block=True, encoder_only=encoder_only)
        if encoder_only:
            return
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def embed(self, noise_labels, class_labels=None, augment_labels=None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(self._dropped_labels(class_labels))
        return F.silu(emb)

    def output(self, x: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        return self.out_conv(F.silu(self.out_norm(x)))


ARCHITECTURES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def conditioning_labels(label_dim: int, class_labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
    """[B, label_dim] float labels (zeros when unconditional input is given to a conditional net)."""
    if label_dim == 0:
        return None
    if class_labels is None:
        return torch.zeros(batch, label_dim, device=device)
    return class_labels.to(torch.float32).reshape(-1, label_dim)


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple:
    """EDM's (c_skip, c_out, c_in, c_noise) (Table 1), also EDM2's: sd^2/(s^2+sd^2), s sd/sqrt(s^2+sd^2),
    1/sqrt(s^2+sd^2), ln(s)/4."""
    sd2 = sigma_data**2
    return sd2 / (sigma**2 + sd2), sigma * sigma_data / (sigma**2 + sd2).sqrt(), (sigma**2 + sd2).rsqrt(), sigma.log() / 4


class Precond(nn.Module):
    """A denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) over one of the UNets (EDM Eq. 7).
    Subclasses give the coefficients; the constructor arguments are EDM's, so an EDM pickle's
    ``_init_kwargs`` build the same network."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 model_type: str = "DhariwalUNet", **model_kwargs):
        if model_type not in ARCHITECTURES:
            raise ValueError(f"{type(self).__name__}: model_type {model_type!r} is not one of {', '.join(ARCHITECTURES)}")
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = use_fp16  # kept for EDM's kwargs; precision comes from the caller's autocast
        self.model = ARCHITECTURES[model_type](
            img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs
        )

    def class_labels(self, class_labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        return conditioning_labels(self.label_dim, class_labels, batch, device)

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        """(c_skip, c_out, c_in, c_noise) for sigma [B, 1, 1, 1]."""
        raise NotImplementedError

    def forward(self, x, sigma, class_labels=None, augment_labels=None) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        labels = self.class_labels(class_labels, x.shape[0], x.device)
        f_x = self.model(c_in * x, c_noise.flatten().expand(x.shape[0]), labels, augment_labels)
        return c_skip * x + c_out * f_x.to(torch.float32)


class EDMPrecond(Precond):
    """EDM's preconditioning (Table 1): c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2),
    c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        return edm_coefficients(sigma, self.sigma_data)


class VPPrecond(Precond):
    """The VP baseline (Song et al. 2021 as in EDM Table 1): c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1),
    c_noise = (M-1) t(s) with the VP schedule sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,  # M: EDM's name
                 model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min = math.sqrt(math.exp(0.5 * beta_d * epsilon_t**2 + beta_min * epsilon_t) - 1)
        self.sigma_max = math.sqrt(math.exp(0.5 * beta_d + beta_min) - 1)

    def coefficients(self, sigma):
        t = ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d
        return 1.0, -sigma, (sigma**2 + 1).rsqrt(), (self.M - 1) * t


class VEPrecond(Precond):
    """The VE baseline (EDM Table 1): c_skip = 1, c_out = s, c_in = 1, c_noise = ln(s/2)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100.0, model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return 1.0, sigma, 1.0, (0.5 * sigma).log()
