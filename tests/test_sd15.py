"""Stable Diffusion v1.5 as a teacher: loading a diffusers folder as data, the EDM-form denoiser against
diffusers' own scheduler arithmetic, guidance, text, the ratio net (fixtures: tests/fixtures/sd15)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastratio.errors import UserError
from fastratio.networks.sd import GuidedDenoiser, SDDenoiser, SDRatio, load_sd, sigma_grid

FIXTURES = Path(__file__).parent / "fixtures" / "sd15"
TINY = FIXTURES / "tiny-sd15"
REF = torch.load(FIXTURES / "outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def sd():
    return load_sd(str(TINY), torch.device("cpu"))


class _FixedOutput(torch.nn.Module):
    """A UNet stand-in returning fixed model outputs: isolates the wrapper's arithmetic."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t, encoder_hidden_states=None, return_dict=False):
        self.seen = (x, t)
        return (self.out,)


def test_schedule_is_the_scheduler_own(sd):
    sched = REF["scheduler"]
    assert torch.equal(sd.alphas_cumprod, sched["alphas_cumprod"])
    grid = sigma_grid(sd.alphas_cumprod)
    # DATA.md's SD1.5 facts: t = 0 -> 0.029, 20 -> 0.138, 625 -> 2.50, 999 -> 14.61.
    for t, sigma in ((0, 0.0292), (20, 0.1380), (625, 2.5017), (999, 14.6146)):
        assert grid[t].item() == pytest.approx(sigma, abs=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_denoiser_equals_diffusers_arithmetic(sd, prediction):
    """At a grid sigma the wrapper's input is add_noise's x_t and D is DDPMScheduler.step's x0 (float64)."""
    sched = REF["scheduler"]
    stub = _FixedOutput(sched["model_output"])
    den = SDDenoiser(stub, sd.alphas_cumprod, prediction)
    sigma = sigma_grid(sd.alphas_cumprod)[sched["t"]]
    x = sched[prediction]["x_t"] * (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1)  # EDM form x0 + sigma eps
    assert torch.allclose(x, sched["x0"] + sigma.reshape(-1, 1, 1, 1) * sched["eps"], atol=1e-12)
    d = den(x, sigma)
    assert (d - sched[prediction]["pred_x0"]).abs().max() < 1e-6
    assert (stub.seen[0] - sched[prediction]["x_t"]).abs().max() < 1e-6
    assert torch.equal(stub.seen[1], sched["t"].float())


def test_timestep_between_grid_points(sd):
    den = sd.denoiser()
    grid = sigma_grid(sd.alphas_cumprod)
    mid = (grid[100].log() * 0.75 + grid[101].log() * 0.25).exp()
    t = den.timestep(torch.stack([grid[100], mid, grid[101], grid[0] / 2, grid[999] * 2]))
    assert t.tolist() == pytest.approx([100, 100.25, 101, 0, 999], abs=1e-9)
    assert den.nearest_step(14.6) == 999 and den.nearest_step(2.5) == 625 and den.nearest_step(100.0) == 999


def test_guidance(sd):
    den = sd.denoiser()
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([0.5, 5.0])
    text = sd.text(["a cat", "a dog"])
    cond = den(x, sigma, text)
    assert torch.equal(GuidedDenoiser(den, sd.text.empty, 1.0)(x, sigma, text), cond)
    uncond = den(x, sigma, sd.text.empty.expand(2, -1, -1))
    guided = GuidedDenoiser(den, sd.text.empty, 1.75)(x, sigma, text)
    assert torch.allclose(guided, uncond + 1.75 * (cond - uncond), atol=1e-5)


def test_text_follows_the_pipeline(sd):
    """The tokenizer reproduces OpenAI CLIP's ids (open_clip's tokenizer, which pads with 0 where SD's
    pads with <|endoftext|>), and the embedding is the encoder's last hidden state, unmasked."""
    ids = sd.text.tokens(REF["prompts"])
    ref = REF["open_clip_ids"]
    assert ids.shape == (len(REF["prompts"]), 77)
    for row, ref_row in zip(ids, ref, strict=True):
        end = int((ref_row == 49407).nonzero()[0]) + 1
        assert torch.equal(row[:end], ref_row[:end]) and (row[end:] == 49407).all()
    with torch.no_grad():
        direct = sd.text.model(ids).last_hidden_state
    assert torch.equal(sd.text(REF["prompts"]), direct)
    assert torch.equal(sd.text.empty, sd.text([""]))
    with pytest.raises(UserError, match="prompt of 1000000 characters"):
        sd.text(["x" * 10**6])


def test_ratio_net_starts_from_the_teacher_encoder(sd):
    ratio = SDRatio(dict(sd.unet.config), sd.alphas_cumprod)
    copied = ratio.load_encoder(sd.unet)
    assert copied == sum(len(getattr(ratio, n).state_dict()) for n in SDRatio.ENCODER)
    for name in ("conv_in.weight", "mid_block.attentions.0.proj_in.weight"):
        assert torch.equal(ratio.state_dict()[name], sd.unet.state_dict()[name])
    x, sigma = torch.randn(3, 4, 16, 16), torch.tensor([0.1, 1.0, 10.0])
    text = sd.text(["a", "b", "c"])
    logit = ratio(x, sigma, text)
    assert logit.shape == (3,) and torch.isfinite(logit).all()
    logit.sum().backward()
    assert ratio.head.weight.grad is not None and ratio.conv_in.weight.grad is not None


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "sd"
    shutil.copytree(TINY, folder)
    return folder


def _edit(folder: Path, part: str, file: str, **changes) -> None:
    path = folder / part / file
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(("changes", "message"), [
    ({"num_train_timesteps": 0}, "num_train_timesteps=0"),
    ({"num_train_timesteps": 10**9}, "num_train_timesteps=1000000000"),
    ({"prediction_type": "sample"}, "prediction_type='sample'"),
    ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule='squaredcos_cap_v2'"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
])
def test_scheduler_refused_by_field(tmp_path, changes, message):
    folder = _copy(tmp_path)
    _edit(folder, "scheduler", "scheduler_config.json", **changes)
    with pytest.raises(UserError, match=message):
        load_sd(str(folder), torch.device("cpu"))


def test_v_prediction_folder_loads(tmp_path):
    folder = _copy(tmp_path)
    _edit(folder, "scheduler", "scheduler_config.json", prediction_type="v_prediction")
    assert load_sd(str(folder), torch.device("cpu")).prediction == "v_prediction"


def test_pickled_weights_refused_unread(tmp_path):
    """A diffusion_pytorch_model.bin where safetensors should be: refused by name, never unpickled."""
    folder = _copy(tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "ran"
    # A pickle that would create `marker` if it were ever unpickled.
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(payload)
    with pytest.raises(UserError, match=r"diffusion_pytorch_model\.bin is a pickle"):
        load_sd(str(folder), torch.device("cpu"))
    assert not marker.exists()


@pytest.mark.parametrize(("part", "file", "changes", "message"), [
    ("unet", "config.json", {"block_out_channels": [10**6]}, "block_out_channels"),
    ("unet", "config.json", {"sample_size": 10**7}, "sample_size"),
    ("tokenizer", "tokenizer_config.json", {"auto_map": {"AutoTokenizer": "x.Tok"}}, "custom code"),
])
def test_bad_configs_refused(tmp_path, part, file, changes, message):
    folder = _copy(tmp_path)
    _edit(folder, part, file, **changes)
    with pytest.raises(UserError, match=message):
        load_sd(str(folder), torch.device("cpu"))


def test_missing_component_and_name(tmp_path):
    folder = _copy(tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(UserError, match="lacks vae/"):
        load_sd(str(folder), torch.device("cpu"))
    with pytest.raises(UserError, match="neither a folder nor in the Hugging Face cache"):
        load_sd("nobody/no-such-model", torch.device("cpu"))


def test_shared_encoder_ratio_reads_the_fake_score_encoder(sd):
    """The paper's discriminator: no parameters of its own (checkpoints and optimizers see the encoder
    once), logit = mean of the fake UNet's encoder output, gradients reaching the fake UNet."""
    import copy

    from fastratio.networks.sd import SharedEncoderRatio

    fake = copy.deepcopy(sd.unet).requires_grad_(True)
    ratio = SharedEncoderRatio(fake, sd.alphas_cumprod)
    assert not list(ratio.parameters()) and not ratio.state_dict()
    x, sigma, text = torch.randn(2, 4, 16, 16), torch.tensor([0.2, 7.0]), sd.text(["a", "b"])
    logit = ratio(x, sigma, text)
    # The same bottleneck through the UNet's own modules, hooked at its mid block.
    seen = {}
    hook = fake.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
    fake(x, sd.denoiser().timestep(sigma).float(), encoder_hidden_states=text)
    hook.remove()
    torch.testing.assert_close(logit, seen["mid"].float().mean(dim=(1, 2, 3)))
    logit.sum().backward()
    assert fake.conv_in.weight.grad is not None and fake.conv_out.weight.grad is None


def test_sd_steps_law_draws_dmd2s_integer_steps():
    """noise.sigma_dist sd_steps: t uniform on the integers [t_min, t_max] of SD's grid, which equals the
    fixture scheduler's (diffusers') grid."""
    from fastratio.config import NoiseConfig
    from fastratio.draws import Draws
    from fastratio.noise import sample_sigma, sd_sigmas

    grid = sd_sigmas()
    assert torch.equal(grid, sigma_grid(REF["scheduler"]["alphas_cumprod"]).float())
    cfg = NoiseConfig(sigma_dist="sd_steps", t_min=20, t_max=23)
    sigma = sample_sigma(cfg, 40_000, Draws(torch.Generator().manual_seed(0)), torch.device("cpu"))
    t = torch.searchsorted(grid, sigma)
    assert torch.equal(grid[t], sigma) and set(t.tolist()) == {20, 21, 22, 23}
    counts = torch.bincount(t - 20).float() / len(t)
    assert (counts - 0.25).abs().max() < 0.01


def test_ratio_net_checkpointing_keeps_values_and_gradients(sd):
    torch.manual_seed(0)
    plain = SDRatio(dict(sd.unet.config), sd.alphas_cumprod)
    checked = SDRatio(dict(sd.unet.config), sd.alphas_cumprod, checkpointing=True)
    checked.load_state_dict(plain.state_dict())
    assert any(getattr(m, "gradient_checkpointing", False) for m in checked.modules())
    plain.train(), checked.train()
    x, sigma, text = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 3.0]), sd.text(["a", "b"])
    outs = []
    for net in (plain, checked):
        logit = net(x, sigma, text)
        logit.sum().backward()
        outs.append((logit.detach(), net.conv_in.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
