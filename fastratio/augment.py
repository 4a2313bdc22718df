"""Non-leaky augmentation (EDM Appendix B.5): augment, and tell the network what was done.

Each sample is flipped horizontally and/or translated by whole pixels (mirrored at the border) with
probability ``p``; the transformation is returned as a label vector that every network trained on
augmented inputs takes as conditioning. At sampling and generator-update time the label is zero
(no augmentation), so the networks model the un-augmented distribution and nothing leaks.
The label layout is EDM's AugmentPipe for its CIFAR-10 setting: slot 0 xflip, slots 7-8 translation
(as a fraction of the maximum); the other slots (yflip, scale, rotation, anisotropy) stay 0.
Both operations are gathers, so gradients flow through them to the input.
"""

from __future__ import annotations

import torch

from .config import AUGMENT_DIM, AugmentConfig
from .draws import Draws
from .shard import SINGLE, Shard


def _mirror(index: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect out-of-range pixel indices back into [0, size) (period 2 size - 2, no edge repeat)."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * size - 2
    index = index % period
    return torch.where(index >= size, period - index, index)


def augment(x: torch.Tensor, cfg: AugmentConfig, draws: Draws, shard: Shard = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """(augmented x [N, C, H, W], labels [N, AUGMENT_DIM]) with every draw from ``draws`` (this rank's
    rows of the global draw, fastratio.shard)."""
    n, _, h, w = x.shape
    device = x.device

    def rand(*lead: int) -> torch.Tensor:
        draw = draws.rand((*lead[:-1], shard.rows(lead[-1])), device)
        return shard.take(draw.movedim(-1, 0)).movedim(0, -1)

    labels = torch.zeros(n, AUGMENT_DIM, device=device)
    cols = torch.arange(w, device=device).expand(n, w)
    rows = torch.arange(h, device=device).expand(n, h)
    # The output is translate(flip(x)) as in EDM: pixel j reads flip index of the translated index.
    if cfg.translate > 0:
        on = rand(n) < cfg.p
        frac = (rand(2, n) * 2 - 1) * on
        tx = torch.round(frac[0] * w * cfg.translate).long()
        ty = torch.round(frac[1] * h * cfg.translate).long()
        cols = _mirror(cols - tx[:, None], w)
        rows = _mirror(rows - ty[:, None], h)
        labels[:, 7] = tx / (w * cfg.translate)
        labels[:, 8] = ty / (h * cfg.translate)
    if cfg.xflip:
        flip = (rand(n) < cfg.p) & (rand(n) < 0.5)
        cols = torch.where(flip[:, None], w - 1 - cols, cols)
        labels[:, 0] = flip.float()
    c = x.shape[1]
    x = torch.gather(x, 3, cols[:, None, None, :].expand(n, c, h, w))
    x = torch.gather(x, 2, rows[:, None, :, None].expand(n, c, h, w))
    return x, labels
