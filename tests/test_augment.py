"""Non-leaky augmentation: exact flips/translations, labels that describe them, gradients pass."""

import torch

from fastratio.augment import augment
from fastratio.config import AugmentConfig
from fastratio.draws import Draws


def _x(n=6, c=2, h=5, w=7):
    return torch.arange(n * c * h * w, dtype=torch.float64).reshape(n, c, h, w)


def test_off_is_identity_with_zero_labels():
    x = _x()
    out, labels = augment(x, AugmentConfig(p=0.0), Draws(torch.Generator().manual_seed(0)))
    assert torch.equal(out, x) and labels.shape == (6, 9) and not labels.any()


def test_flips_and_translations_match_their_labels():
    x = _x(n=64)
    out, labels = augment(x, AugmentConfig(p=1.0, xflip=True, translate=0.3), Draws(torch.Generator().manual_seed(1)))
    w, h = x.shape[3], x.shape[2]
    assert labels[:, 0].sum() > 10 and labels[:, 0].sum() < 54  # about half flipped at p = 1
    assert labels[:, 1:7].abs().sum() == 0
    for i in range(64):
        ref = x[i].flip(-1) if labels[i, 0] else x[i]
        tx = round(float(labels[i, 7]) * w * 0.3)
        ty = round(float(labels[i, 8]) * h * 0.3)
        # Pixel (r, c) of the output reads (r - ty, c - tx) of the input, mirrored at the border.
        for r in range(h):
            for c in range(w):
                rr, cc = r - ty, c - tx
                rr = -rr if rr < 0 else (2 * (h - 1) - rr if rr >= h else rr)
                cc = -cc if cc < 0 else (2 * (w - 1) - cc if cc >= w else cc)
                assert torch.equal(out[i, :, r, c], ref[:, rr, cc]), (i, r, c)


def test_gradients_flow_through_augmentation():
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    cfg = AugmentConfig(p=1.0)
    out, _ = augment(x, cfg, Draws(torch.Generator().manual_seed(2)))
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
