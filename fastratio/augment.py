"""Non-leaky augmentation (EDM Appendix B.5): EDM's geometric ``AugmentPipe``, with its labels.

EDM trains its CIFAR-10 networks with ``AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1,
rotate_frac=1, aniso=1, translate_frac=1)`` (NVlabs/edm ``train.py``, ``training/augment.py``): per
sample, an x-flip (the 1e8 multiplier makes it a fair coin whatever p is), a y-flip, isotropic
scaling, rotation, anisotropic scaling and fractional translation, each switched on with
probability multiplier * p. The transformation is returned as 9 labels that every network trained on
augmented inputs takes as conditioning, in EDM's order and meaning:

    0 xflip, 1 yflip, 2 log2 scale / scale_std, 3 cos(rot) - 1, 4 sin(rot),
    5 aniso * cos(r), 6 aniso * sin(r), 7 tx, 8 ty (translation in units of translate_frac_std)

At sampling and generator-update time the labels are zero, so the networks model the un-augmented
distribution and nothing leaks. The arithmetic and the order and shapes of the random draws are
EDM's, so with the same generator state the output equals EDM's (tests/test_augment.py, against a
fixture EDM's own code wrote). One deliberate difference: EDM pads the image by a margin computed
from the drawn transforms (a data-dependent shape, i.e. a host sync that a compiled step or a CUDA
graph cannot hold); here the padding is always the largest margin EDM can choose (size - 1), which
reads the same pixels and changes the output only by float rounding. A multiplier set to 0 skips its
draws as in EDM but keeps its label slots (at 0), so the label width stays 9.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import AUGMENT_DIM, AugmentConfig
from .draws import Draws
from .shard import SINGLE, Shard

# EDM's 'sym6' wavelet: the low-pass filter of its 2x up/downsampling around the resampling.
_SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
    0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
    0.0017677118642428036, -0.007800708325034148,
)


def _matrices(rows: list[list]) -> torch.Tensor:
    """[N, 3, 3] from a 3x3 nested list of [N] tensors and Python numbers."""
    ref = next(v for row in rows for v in row if isinstance(v, torch.Tensor))
    cols = [torch.stack([v if isinstance(v, torch.Tensor) else torch.full_like(ref, v) for v in row], dim=-1) for row in rows]
    return torch.stack(cols, dim=-2)


def _translate(tx, ty) -> torch.Tensor:
    return _matrices([[1, 0, tx], [0, 1, ty], [0, 0, 1]])


def _scale(sx, sy) -> torch.Tensor:
    return _matrices([[sx, 0, 0], [0, sy, 0], [0, 0, 1]])


def _rotate(theta: torch.Tensor) -> torch.Tensor:
    return _matrices([[theta.cos(), -theta.sin(), 0], [theta.sin(), theta.cos(), 0], [0, 0, 1]])


def _warp(x: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """EDM's 'Execute geometric transformations': reflect-pad, 2x upsample (sym6), bilinear resample
    by the inverse transform g_inv [N, 3, 3] in pixel coordinates about the centre, 2x downsample, crop."""
    n, c, h, w = x.shape
    taps = torch.tensor(_SYM6, dtype=x.dtype, device=x.device)
    pad_hz = len(_SYM6) // 4
    mx, my = w - 1, h - 1  # EDM's margin at its upper bound, the same for every sample
    x = F.pad(x, [mx, mx, my, my], mode="reflect")
    # Upsample: zero-stuff, then the flipped filter along each axis (EDM's order: x first).
    up = taps.flip(0).reshape(1, 1, -1).tile(c, 1, 1)
    pad = (len(_SYM6) + 1) // 2
    x = torch.stack([x, torch.zeros_like(x)], dim=4).reshape(n, c, x.shape[2], -1)[:, :, :, :-1]
    x = F.conv2d(x, up.unsqueeze(2), groups=c, padding=[0, pad])
    x = torch.stack([x, torch.zeros_like(x)], dim=3).reshape(n, c, -1, x.shape[3])[:, :, :-1, :]
    x = F.conv2d(x, up.unsqueeze(3), groups=c, padding=[pad, 0])
    one = torch.ones(n, device=x.device, dtype=g_inv.dtype)
    g_inv = _scale(2 * one, 2 * one) @ g_inv @ _scale(0.5 * one, 0.5 * one)
    g_inv = _translate(-0.5 * one, -0.5 * one) @ g_inv @ _translate(0.5 * one, 0.5 * one)
    shape = [n, c, (h + pad_hz * 2) * 2, (w + pad_hz * 2) * 2]
    g_inv = _scale(2 / x.shape[3] * one, 2 / x.shape[2] * one) @ g_inv @ _scale(shape[3] / 2 * one, shape[2] / 2 * one)
    grid = F.affine_grid(g_inv[:, :2, :], shape, align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    down = taps.reshape(1, 1, -1).tile(c, 1, 1)
    pad = (len(_SYM6) - 1) // 2
    x = F.conv2d(x, down.unsqueeze(2), groups=c, stride=[1, 2], padding=[0, pad])[:, :, :, pad_hz:-pad_hz]
    x = F.conv2d(x, down.unsqueeze(3), groups=c, stride=[2, 1], padding=[pad, 0])[:, :, pad_hz:-pad_hz, :]
    return x


def augment(x: torch.Tensor, cfg: AugmentConfig, draws: Draws, shard: Shard = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """(augmented x [N, C, H, W], labels [N, AUGMENT_DIM]) with every draw from ``draws`` (this rank's
    rows of the global draw, fastratio.shard), in EDM's order and shapes."""
    n, _, h, w = x.shape
    device = x.device

    def take(draw: torch.Tensor) -> torch.Tensor:  # the batch is the last axis of every draw
        return shard.take(draw.movedim(-1, 0)).movedim(0, -1)

    def rand(*lead: int) -> torch.Tensor:
        return take(draws.rand((*lead[:-1], shard.rows(lead[-1])), device))

    def randn(*lead: int) -> torch.Tensor:
        return take(draws.randn((*lead[:-1], shard.rows(lead[-1])), device))

    zero = torch.zeros(n, device=device)
    labels = [zero] * AUGMENT_DIM
    p = cfg.p
    for slot, (multiplier, dim) in enumerate(((cfg.xflip, 3), (cfg.yflip, 2))):
        if multiplier > 0:
            flip = take(draws.randint(2, (shard.rows(n),), device))
            flip = torch.where(rand(n) < multiplier * p, flip, torch.zeros_like(flip))
            x = torch.where(flip.reshape(n, 1, 1, 1) == 1, x.flip(dim), x)
            labels[slot] = flip.float()

    g_inv = torch.eye(3, device=device).expand(n, 3, 3)
    if cfg.scale > 0:
        ws = randn(n)
        ws = torch.where(rand(n) < cfg.scale * p, ws, zero)
        s = torch.exp2(ws * cfg.scale_std)
        g_inv = g_inv @ _scale(1 / s, 1 / s)
        labels[2] = ws
    if cfg.rotate_frac > 0:
        wr = (rand(n) * 2 - 1) * (math.pi * cfg.rotate_frac_max)
        wr = torch.where(rand(n) < cfg.rotate_frac * p, wr, zero)
        g_inv = g_inv @ _rotate(wr)  # EDM: rotate2d_inv(-w)
        labels[3], labels[4] = wr.cos() - 1, wr.sin()
    if cfg.aniso > 0:
        wa, r = randn(n), (rand(n) * 2 - 1) * math.pi
        wa = torch.where(rand(n) < cfg.aniso * p, wa, zero)
        r = torch.where(rand(n) < cfg.aniso_rotate_prob, r, zero)
        s = torch.exp2(wa * cfg.aniso_std)
        g_inv = g_inv @ _rotate(-r) @ _scale(1 / s, s) @ _rotate(r)
        labels[5], labels[6] = wa * r.cos(), wa * r.sin()
    if cfg.translate_frac > 0:
        wt = randn(2, n)
        wt = torch.where(rand(1, n) < cfg.translate_frac * p, wt, torch.zeros_like(wt))
        g_inv = g_inv @ _translate(-wt[0] * (w * cfg.translate_frac_std), -wt[1] * (h * cfg.translate_frac_std))
        labels[7], labels[8] = wt[0], wt[1]
    if any(m > 0 for m in (cfg.scale, cfg.rotate_frac, cfg.aniso, cfg.translate_frac)):
        x = _warp(x, g_inv.to(x.dtype))
    return x, torch.stack(labels, dim=1)
