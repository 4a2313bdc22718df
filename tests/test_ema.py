"""EMA: EDM's half-life schedule with ramp-up, computed on the device, and the blend it applies."""

import pytest
import torch
from torch import nn

from fastratio.ema import EMA, ema_beta


@pytest.mark.parametrize(
    "nimg, rampup, halflife_images",
    [(64, 0.05, 3.2), (10_000_000, 0.05, 20_000), (64, 0.0, 20_000), (200_000, 0.05, 10_000)],
)
def test_beta_halves_a_weight_after_the_half_life(nimg, rampup, halflife_images):
    beta = ema_beta(64, torch.tensor(float(nimg), dtype=torch.float64), 20.0, rampup)
    assert beta.dim() == 0
    assert float(beta) == pytest.approx(0.5 ** (64 / halflife_images), rel=1e-12)


def test_update_blends_live_weights_with_a_device_beta():
    live = nn.Linear(3, 2)
    ema = EMA(live)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    beta = torch.tensor(0.75, dtype=torch.float64)
    ema.update(live, beta)
    for key, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, 0.75 * before[key] + 0.25 * live.state_dict()[key])
