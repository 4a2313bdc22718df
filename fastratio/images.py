"""Image tensors <-> files: [-1, 1] float batches to uint8 and PNG grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [B, C, H, W] -> uint8 (EDM's convention: (x + 1) * 127.5, rounded, clipped)."""
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def grid(images: torch.Tensor, cols: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 [B, C, H, W] -> one [rows*(H+pad), cols*(W+pad), C] array (C 1 or 3)."""
    b, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    canvas = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    arr = images.cpu().numpy().transpose(0, 2, 3, 1)
    for i in range(b):
        r, col = divmod(i, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = arr[i]
    return canvas


def save_grid(x: torch.Tensor, path: str | Path, cols: int | None = None, scale: int = 1) -> Path:
    """Write a [-1, 1] float batch (or uint8 images) as a PNG grid (optionally enlarged ``scale`` times)."""
    from PIL import Image

    canvas = grid(x if x.dtype == torch.uint8 else to_uint8(x), cols)
    img = Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return atomic_write(Path(path), lambda f: img.save(f, format="PNG"))
