"""Stable Diffusion v1.5 (a diffusers folder) as an EDM-style denoiser, its text encoder and a ratio net.

The teacher's UNet was trained on a discrete VP grid of 1000 steps with the scheduler's
``alphas_cumprod`` abar_t. In EDM's terms (Karras et al. 2022, Table 1 and Sec. 2) step t is the noise
level sigma_t = sqrt((1 - abar_t) / abar_t) (SD1.5: 0.029 at t = 0 to 14.6 at t = 999), and the
scheduler's sample at t is x_t = sqrt(abar_t) (x0 + sigma_t eps) = (x0 + sigma_t eps) / sqrt(1 + sigma_t^2),
which is ``noise.schedule: vp``. ``SDDenoiser`` is D(x; sigma, text) for x = x0 + sigma eps:

    c_in = 1 / sqrt(1 + sigma^2),  out = UNet(c_in x, t(sigma), text)
    epsilon-prediction:  D = x - sigma out
    v-prediction:        D = c_in^2 x - sigma c_in out      (x0 = sqrt(abar) x_t - sqrt(1 - abar) v)

so the step, the objectives, the noise laws, the kernels and the verifier run unchanged in latent
space. Coefficients are computed in float64. **Between grid points** t(sigma) is interpolated linearly
in log sigma between the two neighbouring steps and passed as a fractional timestep (the UNet's
sinusoidal embedding is continuous); at a grid sigma it is exactly that integer t, where D equals the
scheduler's own arithmetic. Sigmas outside the grid are refused by the task's config checks.

Text follows ``StableDiffusionPipeline``: the CLIP tokenizer padded and truncated to 77 tokens, the
text encoder's last hidden state, no attention mask to the UNet.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..hf import check_weights, import_diffusers, load_component, read_config, resolve_folder
from ..noise import expand
from .from_denoiser import OneStepGenerator

PREDICTIONS = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("scaled_linear", "linear")
TRAIN_STEPS = 1000  # SD1.x/2.x's discrete training steps; other grids are refused
MAX_PROMPT_CHARS = 65_536  # CLIP reads 77 tokens; a longer "prompt" is a mistake, not a caption
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# UNet config sizes far above SD1.5/2.x/XL (block channels 1280, 4 blocks, 2048-d text, 128^2 latents).
_UNET_BOUNDS = {"sample_size": 1024, "in_channels": 64, "out_channels": 64, "cross_attention_dim": 8192, "layers_per_block": 16}


def sigma_grid(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """EDM noise levels of the discrete steps, sqrt((1 - abar) / abar), in float64 [T]."""
    abar = alphas_cumprod.to(torch.float64)
    return ((1 - abar) / abar).sqrt()


def read_schedule(folder: Path, key: str) -> tuple[torch.Tensor, str]:
    """(alphas_cumprod float64 [1000], prediction type) from ``scheduler/scheduler_config.json``,
    computed by diffusers' DDPMScheduler from the file's betas; anything else is refused by field."""
    cfg = read_config(folder / "scheduler" / "scheduler_config.json", key)
    where = f"{key}: {folder / 'scheduler' / 'scheduler_config.json'}"
    steps = cfg.get("num_train_timesteps", TRAIN_STEPS)
    if type(steps) is not int or steps != TRAIN_STEPS:
        raise UserError(f"{where} num_train_timesteps={str(steps)[:30]}; fastratio supports SD's {TRAIN_STEPS} discrete training steps")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise UserError(f"{where} prediction_type={str(prediction)[:30]!r} is not one of {', '.join(PREDICTIONS)}")
    schedule = cfg.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise UserError(f"{where} beta_schedule={str(schedule)[:30]!r} is not one of {', '.join(BETA_SCHEDULES)}")
    if cfg.get("trained_betas") is not None:
        raise UserError(f"{where} trained_betas: explicit betas are not supported; give beta_start/beta_end")
    if cfg.get("rescale_betas_zero_snr"):
        raise UserError(f"{where} rescale_betas_zero_snr=true puts t = {TRAIN_STEPS - 1} at infinite noise; not supported")
    start, end = cfg.get("beta_start", 0.0001), cfg.get("beta_end", 0.02)
    if not all(isinstance(b, int | float) and not isinstance(b, bool) and 0 < b < 1 for b in (start, end)) or start >= end:
        raise UserError(f"{where} beta_start={str(start)[:20]}, beta_end={str(end)[:20]}: need 0 < beta_start < beta_end < 1")
    diffusers = import_diffusers(key)
    sched = diffusers.DDPMScheduler(num_train_timesteps=steps, beta_start=start, beta_end=end, beta_schedule=schedule,
                                    prediction_type=prediction)
    return sched.alphas_cumprod.to(torch.float64), prediction


def _timestep(log_sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Fractional step t(sigma) [B] (float64): linear in log sigma between grid points, clamped to the grid."""
    log_sigma = sigma.to(torch.float64).log()
    hi = torch.searchsorted(log_sigmas, log_sigma).clamp(1, log_sigmas.shape[0] - 1)
    frac = ((log_sigma - log_sigmas[hi - 1]) / (log_sigmas[hi] - log_sigmas[hi - 1])).clamp(0, 1)
    return (hi - 1).to(torch.float64) + frac


class SDDenoiser(nn.Module):
    """D(x; sigma, text) of a diffusers ``UNet2DConditionModel`` (module docstring)."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction: str):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction type {prediction!r}")
        self.unet, self.prediction = unet, prediction
        self.register_buffer("log_sigmas", sigma_grid(alphas_cumprod).log(), persistent=False)

    @property
    def sigma_range(self) -> tuple[float, float]:
        return math.exp(float(self.log_sigmas[0])), math.exp(float(self.log_sigmas[-1]))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return _timestep(self.log_sigmas, sigma)

    def nearest_step(self, sigma: float) -> int:
        """The grid step whose sigma is nearest ``sigma`` in log space (the generator's conditioning time)."""
        return int((self.log_sigmas - math.log(sigma)).abs().argmin())

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor | None = None, augment_labels=None) -> torch.Tensor:
        s = sigma.to(torch.float64)
        c_in = (1 + s**2).rsqrt()
        out = self.unet((expand(c_in, x).to(x.dtype) * x), self.timestep(sigma).to(torch.float32),
                        encoder_hidden_states=text, return_dict=False)[0]
        dtype = out.dtype if x.dtype == torch.float64 else torch.float32  # the conversion in full precision
        out, xf = out.to(dtype), x.to(dtype)
        if self.prediction == "epsilon":
            return xf - expand(s.to(dtype), xf) * out
        return expand((c_in**2).to(dtype), xf) * xf - expand((s * c_in).to(dtype), xf) * out


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): D_u + scale (D_c - D_u), the unconditional branch
    on the empty prompt's embedding, both halves in one batched forward. Scale 1 is the conditional
    denoiser itself (no unconditional pass)."""

    def __init__(self, denoiser: nn.Module, empty_text: torch.Tensor, scale: float):
        super().__init__()
        self.denoiser, self.scale = denoiser, float(scale)
        self.register_buffer("empty_text", empty_text, persistent=False)

    def forward(self, x, sigma, text=None, augment_labels=None) -> torch.Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma, text)
        empty = self.empty_text.to(text.dtype).expand(x.shape[0], -1, -1)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([empty, text]))
        uncond, cond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)


def _bottleneck(enc, time_proj: nn.Module, log_sigmas: torch.Tensor, x_t, sigma, text) -> torch.Tensor:
    """The UNet encoder's output (after the mid block) at x_t on the VP schedule, which is exactly the
    UNet's own input at that sigma. ``enc`` holds conv_in, time_embedding, down_blocks, mid_block."""
    t = _timestep(log_sigmas, sigma).to(torch.float32)
    emb = enc.time_embedding(time_proj(t).to(x_t.dtype))
    h = enc.conv_in(x_t)
    for block in enc.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(h, emb, encoder_hidden_states=text)
        else:
            h, _ = block(h, emb)
    return enc.mid_block(h, emb, encoder_hidden_states=text)


class SDRatio(nn.Module):
    """Text-conditioned ratio classifier c(x_t, sigma, text) -> logit [B]: the encoder half of the
    teacher's UNet (conv_in, time embedding, down blocks with their cross-attention, mid block, under
    the UNet's own names, so it starts from the teacher's encoder) and a GroupNorm-SiLU-mean-pool
    linear head, as the image ``RatioUNet``."""

    ENCODER = ("conv_in", "time_embedding", "down_blocks", "mid_block")

    def __init__(self, unet_config: dict, alphas_cumprod: torch.Tensor, checkpointing: bool = False):
        super().__init__()
        unet = import_diffusers("model").UNet2DConditionModel.from_config(unet_config)
        if checkpointing:  # set through the UNet's own switch, before its blocks are taken
            unet.enable_gradient_checkpointing()
        for name in self.ENCODER:
            setattr(self, name, getattr(unet, name))
        self.time_proj = unet.time_proj  # no parameters
        self.register_buffer("log_sigmas", sigma_grid(alphas_cumprod).log(), persistent=False)
        channels = unet_config["block_out_channels"][-1]
        self.head_norm = nn.GroupNorm(unet_config.get("norm_num_groups") or 32, channels, eps=1e-5)
        self.head = nn.Linear(channels, 1)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x_t, sigma, text=None, augment_labels=None) -> torch.Tensor:
        h = _bottleneck(self, self.time_proj, self.log_sigmas, x_t, sigma, text)
        h = F.silu(self.head_norm(h)).mean(dim=(2, 3))
        return self.head(h).squeeze(1).to(torch.float32)

    def load_encoder(self, unet: nn.Module) -> int:
        """Copy the teacher's encoder (every shared name); returns tensors copied."""
        ours = {k: v for k, v in self.state_dict().items() if k.split(".")[0] in self.ENCODER}
        theirs = {k: v for k, v in unet.state_dict().items() if k in ours}
        missing = [k for k in ours if k not in theirs]
        if missing:
            raise ValueError(f"teacher encoder lacks {missing[0]} (and {len(missing) - 1} more)")
        self.load_state_dict(theirs, strict=False)
        return len(theirs)


class SharedEncoderRatio(nn.Module):
    """The Di-Bregman paper's discriminator (App. D, after SiDA): the fake score's own UNet encoder,
    "the mean feature vector used as the predicted discriminator logits": logit = mean of the encoder's
    output over channels and positions. It holds no parameters of its own (the fake score is kept
    out of its module tree, so checkpoints and optimizers see the encoder once): the fake score's
    update trains the encoder with both losses (``TrainStep.shared_update``)."""

    def __init__(self, fake_unet: nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.__dict__["fake_unet"] = fake_unet
        self.register_buffer("log_sigmas", sigma_grid(alphas_cumprod).log(), persistent=False)

    def forward(self, x_t, sigma, text=None, augment_labels=None) -> torch.Tensor:
        unet = self.__dict__["fake_unet"]
        return _bottleneck(unet, unet.time_proj, self.log_sigmas, x_t, sigma, text).float().mean(dim=(1, 2, 3))


class TextEncoder:
    """Prompts -> CLIP hidden states [n, 77, D] (frozen, no grad), as ``StableDiffusionPipeline.encode_prompt``."""

    def __init__(self, tokenizer, model: nn.Module):
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)
        self.max_length = int(tokenizer.model_max_length)
        self.empty = self([""])  # the unconditional branch's embedding, computed once

    def tokens(self, prompts: list[str]) -> torch.Tensor:
        for p in prompts:
            if len(p) > MAX_PROMPT_CHARS:
                raise UserError(f"prompt of {len(p)} characters (at most {MAX_PROMPT_CHARS}; CLIP reads {self.max_length} tokens)")
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model(self.tokens(prompts).to(device), return_dict=False)[0].float()


@dataclass
class SDParts:
    """The components of a Stable Diffusion folder, loaded as data."""

    unet: nn.Module
    vae: nn.Module
    text: TextEncoder
    alphas_cumprod: torch.Tensor  # float64 [1000]
    prediction: str
    folder: Path

    def denoiser(self, unet: nn.Module | None = None) -> SDDenoiser:
        return SDDenoiser(self.unet if unet is None else unet, self.alphas_cumprod, self.prediction)


def _check_unet_config(folder: Path, key: str) -> dict:
    cfg = read_config(folder / "unet" / "config.json", key)
    for name, bound in _UNET_BOUNDS.items():
        value = cfg.get(name)
        if value is not None and (type(value) is not int or not 0 < value <= bound):
            raise UserError(f"{key}: {folder / 'unet' / 'config.json'} {name}={str(value)[:30]} outside [1, {bound}]")
    blocks = cfg.get("block_out_channels")
    if not isinstance(blocks, list) or not 0 < len(blocks) <= 8 or not all(type(b) is int and 0 < b <= 8192 for b in blocks):
        raise UserError(f"{key}: {folder / 'unet' / 'config.json'} block_out_channels={str(blocks)[:40]} is not a short list of sizes")
    if cfg.get("addition_embed_type") or cfg.get("class_embed_type"):
        raise UserError(f"{key}: {folder / 'unet'} has extra conditioning (SDXL-style add/class embeddings); only SD1.x/2.x UNets are supported")
    return cfg


def load_sd(name_or_path: str, device: torch.device, key: str = "teacher.checkpoint") -> SDParts:
    """A Stable-Diffusion-layout folder (or Hugging Face cache entry), every component from
    safetensors and JSON only."""
    diffusers = import_diffusers(key)
    import transformers

    folder = resolve_folder(name_or_path, key)
    missing = [c for c in _COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise UserError(f"{key}: {folder} lacks {', '.join(f'{c}/' for c in missing)}; a Stable Diffusion folder holds "
                        f"{', '.join(f'{c}/' for c in _COMPONENTS)}")
    alphas_cumprod, prediction = read_schedule(folder, key)
    _check_unet_config(folder, key)
    for part in ("unet", "vae", "text_encoder"):
        check_weights(folder / part, f"{key} ({part})")
    read_config(folder / "tokenizer" / "tokenizer_config.json", key)
    unet = load_component(diffusers.UNet2DConditionModel, folder / "unet", f"{key} (unet)")
    vae = load_component(diffusers.AutoencoderKL, folder / "vae", f"{key} (vae)")
    encoder = load_component(transformers.CLIPTextModel, folder / "text_encoder", f"{key} (text_encoder)")
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{key}: cannot load the CLIP tokenizer from {folder / 'tokenizer'} ({str(err).splitlines()[0][:120]})") from None
    if encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise UserError(f"{key}: text_encoder hidden_size {encoder.config.hidden_size} differs from the UNet's "
                        f"cross_attention_dim {unet.config.cross_attention_dim}")
    vae = vae.eval().requires_grad_(False).to(device)
    text = TextEncoder(tokenizer, encoder.to(device))
    return SDParts(unet.to(device), vae, text, alphas_cumprod, prediction, folder)


def vae_factor(vae) -> int:
    """Pixels per latent along a side (SD's VAE: 8)."""
    return 1 << (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """uint8 pixels [B, 3, H, W] of SD latents (already multiplied by the VAE's scaling_factor)."""
    out = [vae.decode(chunk / vae.config.scaling_factor, return_dict=False)[0] for chunk in latents.float().split(batch)]
    return torch.cat(out).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def generator_from_checkpoint(state: dict, where: str, device: torch.device, teacher: str | None = None):
    """(the one-step generator with the checkpoint's EMA weights, in eval mode; the teacher's parts)
    from a text2image run's checkpoint. The teacher folder (text encoder, VAE, schedule, the UNet's
    architecture) is the one the run recorded, or ``teacher`` when it lives elsewhere now."""
    info = state.get("sd")
    if not isinstance(info, dict) or not {"teacher", "sigma_init", "t_init"} <= set(info):
        raise UserError(f"{where}: not a text2image checkpoint (no 'sd' entry with teacher, t_init, sigma_init)")
    shape = info.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(v) is int and 0 < v <= 1024 for v in shape)):
        raise UserError(f"{where}: sd.shape {str(shape)[:40]} is not a latent shape [C, h, w]")
    sigma_init = info["sigma_init"]
    if not isinstance(sigma_init, float) or not 0 < sigma_init < 1e4:
        raise UserError(f"{where}: sd.sigma_init {str(sigma_init)[:30]} is not a noise level")
    parts = load_sd(teacher or str(info["teacher"]), device, key="--teacher" if teacher else f"{where} (sd.teacher)")
    model = OneStepGenerator(parts.denoiser(copy.deepcopy(parts.unet)), sigma_init)
    try:
        model.load_state_dict(state["ema"])
    except (KeyError, RuntimeError) as err:
        raise UserError(f"{where}: the EMA weights do not fit the teacher's UNet ({str(err).splitlines()[0][:160]})") from None
    return model.to(device).eval().requires_grad_(False), parts
