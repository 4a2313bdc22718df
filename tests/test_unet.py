"""EDM-compatible networks: exact parameter layout and counts of every released EDM network, image roles.

tests/fixtures/edm/layouts.json was written by NVlabs/edm's own networks.py (make_fixtures.py there):
state_dict names/shapes, in order, and parameter counts of the full-size network of every released
checkpoint. Forward equality with EDM's modules is tested on EDM-written pickles in test_edm_import.py.
"""

import json
from pathlib import Path

import pytest
import torch

from fastratio.networks.denoisers import build_denoiser
from fastratio.networks.from_denoiser import DenoiserScore, OneStepGenerator
from fastratio.networks.image import RatioUNet
from fastratio.networks.unet import EDMPrecond

LAYOUTS = json.loads((Path(__file__).parent / "fixtures" / "edm" / "layouts.json").read_text())["layouts"]


def _randomize(net: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in sorted(net.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=g) * 0.2)


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_state_dict_layout_and_parameter_count_equal_edm(name):
    ref = LAYOUTS[name]
    kwargs = dict(ref["kwargs"], **({"precond": ref["precond"]} if ref["precond"] != "EDMPrecond" else {}))
    with torch.device("meta"):  # the 296M-parameter ADM costs no memory or init time on meta
        net = build_denoiser(kwargs)
    layout = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(layout) == list(ref["state"])  # same names in the same order
    assert layout == ref["state"]
    assert _count(net) == ref["parameters"]


def test_reference_counts_are_the_papers():
    """EDM reports DDPM++ CIFAR-10 at 55.7M, NCSN++ at 56.4M and ADM ImageNet-64 at 296M parameters."""
    assert LAYOUTS["edm-cifar10-32x32-uncond-vp"]["parameters"] == 55_733_891
    assert LAYOUTS["edm-cifar10-32x32-uncond-ve"]["parameters"] == 56_397_827
    assert LAYOUTS["edm-imagenet-64x64-cond-adm"]["parameters"] == 295_899_267


TINY = {"model_type": "SongUNet", "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}


def test_ratio_net_is_the_encoder_half_and_loads_the_teacher_encoder():
    cifar = dict(LAYOUTS["edm-cifar10-32x32-uncond-vp"]["kwargs"])
    res, channels = cifar.pop("img_resolution"), cifar.pop("img_channels")
    cifar.pop("label_dim")
    with torch.device("meta"):
        ratio, full = RatioUNet(res, channels, **cifar), EDMPrecond(res, channels, **cifar)
    assert 0.30 < _count(ratio) / _count(full) < 0.40  # 19.6M of 55.7M for DDPM++ CIFAR-10

    teacher = EDMPrecond(16, 3, label_dim=3, **TINY)
    ratio = RatioUNet(16, 3, label_dim=3, **TINY)
    copied = ratio.load_encoder(teacher)
    shared = {k: v for k, v in ratio.model.state_dict().items()}
    assert copied == len(shared)
    for k, v in shared.items():
        assert torch.equal(v, teacher.model.state_dict()[k]), k
    logit = ratio(torch.randn(5, 3, 16, 16), torch.rand(5) + 0.1, torch.eye(3)[[0, 1, 2, 0, 1]])
    assert logit.shape == (5,) and logit.dtype == torch.float32


def test_ratio_net_refuses_a_different_teacher():
    ratio = RatioUNet(16, 3, **TINY)
    other = EDMPrecond(16, 3, **{**TINY, "model_channels": 32})
    with pytest.raises(RuntimeError, match="size mismatch"):
        ratio.load_encoder(other)


@pytest.mark.parametrize("schedule", ["ve", "vp"])
def test_denoiser_score_is_tweedie(schedule):
    """A denoiser that returns the clean image exactly gives the conditional score -eps/std."""

    class Oracle(torch.nn.Module):
        def forward(self, x, sigma, class_labels=None, augment_labels=None):
            return x0

    x0 = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64)
    eps = torch.randn_like(x0)
    from fastratio.noise import add_noise, noise_coefficients

    x_t = add_noise(x0, sigma, eps, schedule)
    # With D(x_t / alpha) = x0 exactly, (alpha x0 - x_t) / std^2 = -eps / std.
    _, std = noise_coefficients(sigma, schedule)
    got = DenoiserScore(Oracle(), schedule)(x_t, sigma)
    torch.testing.assert_close(got, -eps / std.reshape(-1, 1, 1, 1))


def test_one_step_generator_is_the_denoiser_at_sigma_init():
    net = EDMPrecond(16, 3, **TINY).eval()
    _randomize(net)
    z = torch.randn(2, 3, 16, 16)
    got = OneStepGenerator(net, 2.5)(z)
    torch.testing.assert_close(got, net(2.5 * z, torch.full((2,), 2.5)))


@pytest.mark.parametrize("name", ["edm-cifar10-32x32-uncond-vp", "edm-cifar10-32x32-cond-ve", "edm-imagenet-64x64-cond-adm"])
def test_attention_inputs_meet_the_fused_sdpa_kernels_conditions(name, monkeypatch):
    """torch's flash / memory-efficient kernels (sdp_utils) need 4-D [B, heads, L, D] inputs with a unit
    last stride and a head dim that is a multiple of 8, at most 256: checked on the configs' shapes."""
    from fastratio.networks import unet

    seen = []
    real = unet.F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q, k, v))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(unet.F, "scaled_dot_product_attention", spy)
    ref = LAYOUTS[name]
    kwargs = dict(ref["kwargs"], **({"precond": ref["precond"]} if ref["precond"] != "EDMPrecond" else {}))
    with torch.device("meta"):
        net = build_denoiser(kwargs)
        res, labels = kwargs["img_resolution"], kwargs["label_dim"]
        net(torch.randn(2, 3, res, res), torch.ones(2), torch.zeros(2, labels) if labels else None, torch.zeros(2, 9) if kwargs.get("augment_dim") else None)
    assert seen
    for q, k, v in seen:
        for t in (q, k, v):
            assert t.dim() == 4 and t.stride(-1) == 1 and t.shape[-1] % 8 == 0 and t.shape[-1] <= 256, (tuple(t.shape), t.stride())
