"""EDM2 networks against NVlabs/edm2's own code (tests/fixtures/edm2/make_fixtures.py ran it once):
every preset's parameter count and state_dict layout, snapshots and post-hoc EMA pickles written by
EDM2's training loop and reconstruct_phema.py loaded as data and matching EDM2's outputs, and a
training-mode forward (forced weight normalization) with EDM2's uncertainty loss."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from fastratio import objectives
from fastratio.edm_import import load_edm_denoiser
from fastratio.networks.edm2 import Block, Precond

FIX = Path(__file__).resolve().parent / "fixtures" / "edm2"
OUTPUTS = torch.load(FIX / "outputs.pt", weights_only=True)
LAYOUTS = json.loads((FIX / "layouts.json").read_text())["layouts"]
PRESET_CHANNELS = {"xxs": 64, "xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}  # train_edm2.py
PICKLES = sorted(k for k in OUTPUTS if k.endswith(".pkl"))


@pytest.mark.parametrize("preset", sorted(LAYOUTS))
def test_every_edm2_preset_has_edm2_s_parameter_count_and_layout(preset):
    size = preset.split("-")[-1]
    latent = "img512" in preset
    with torch.device("meta"):
        net = Precond(img_resolution=64, img_channels=4 if latent else 3, label_dim=1000, model_channels=PRESET_CHANNELS[size])
    names = [(k, list(v.shape)) for k, v in net.state_dict().items()]
    want = LAYOUTS[preset]
    assert sum(p.numel() for p in net.parameters()) == want["parameters"]
    assert len(names) == want["tensors"] and hashlib.sha256(json.dumps(names).encode()).hexdigest() == want["layout_sha256"]


def test_the_paper_sizes_are_the_img512_presets():
    counts = {p.split("-")[-1]: LAYOUTS[p]["parameters"] for p in LAYOUTS if "img512" in p}
    assert counts["xs"] == 124_713_253 and counts["xxl"] == 1_523_164_773  # EDM2 Table 2: 125M ... 1.5B
    assert sorted(counts.values()) == [counts[s] for s in ("xxs", "xs", "s", "m", "l", "xl", "xxl")]


@pytest.mark.parametrize("name", PICKLES)
def test_edm2_written_pickles_load_as_data_and_match_edm2(name):
    net = load_edm_denoiser(FIX / name)
    assert type(net) is Precond and not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.init_kwargs["precond"] == "EDM2Precond" and all(p.dtype == torch.float32 for p in net.parameters())
    o = OUTPUTS[name]
    d, logvar = net(o["x"], o["sigma"], o["labels"], return_logvar=True)
    torch.testing.assert_close(d, o["D"], rtol=2e-5, atol=2e-5 * o["D"].abs().max().item())
    torch.testing.assert_close(logvar, o["logvar"], rtol=1e-6, atol=1e-6)
    assert net(o["x"], o["sigma"], o["labels"]).shape == o["D"].shape


@pytest.mark.parametrize("family", ["edm2-latent-cond", "edm2-rgb-uncond"])
def test_training_mode_renormalizes_weights_and_the_uncertainty_loss_is_edm2_s(family):
    o = OUTPUTS[f"{family}/train"]
    name = next(k for k in PICKLES if k.startswith(family) and "-0.070" in k)  # the post-hoc EMA pickle
    net = load_edm_denoiser(FIX / name).train().requires_grad_(True)
    for block in net.modules():
        if isinstance(block, Block):
            block.dropout = 0
    p_mean, p_std = (-0.4, 1.0) if "latent" in family else (-0.8, 1.6)
    sigma = (o["rnd_normal"] * p_std + p_mean).exp()
    images, labels = o["images"], o["train_labels"] if o["train_labels"].shape[1] else None
    denoised, logvar = net(images + o["noise"] * sigma, sigma, labels, return_logvar=True)
    weight = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2).flatten()
    loss = objectives.uncertainty_loss(denoised, images, weight, logvar)
    torch.testing.assert_close(loss.detach(), o["loss"].sum(dim=(1, 2, 3)), rtol=2e-5, atol=1e-4)
    state = net.state_dict()
    for key, value in o["weights_after"].items():  # forced weight normalization wrote the same weights
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in net.parameters() if p.requires_grad and p.ndim)
