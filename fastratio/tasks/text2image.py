"""Text-to-image task: one-step generators distilled from (or trained beside) Stable Diffusion v1.5.

The teacher is a diffusers folder (``teacher.checkpoint``; fastratio.networks.sd), read as an EDM
denoiser on the VP grid, so the step, objectives and kernels run unchanged on 4-channel latents with
CLIP text embeddings [B, 77, D] in the conditioning slot where image runs pass one-hot classes.

  generator   g(z, text) = D(sigma_init z; sigma_init, text): the teacher's UNet applied once at the grid
              step nearest model.sigma_init (t = 999 for sigma_init >= 14.6: DMD2's choice, whose
              generator also starts from the teacher's weights), text-conditioned
  teacher     the frozen UNet with classifier-free guidance at method.cfg_scale on the data side
              (vsd, dibregman; DMD2 and FastGen use 1.75 for SD1.5)
  fake_score  a full trainable copy of the UNet, unguided (vsd, dibregman)
  ratio       the UNet's encoder half with its cross-attention and a logit head, started from the
              teacher's encoder (diffratio, dibregman); with model.shared_encoder (dibregman) the fake
              score's own encoder, its mean feature the logit, as the Di-Bregman paper (App. D)

Data (fastratio.data.captions): ``data.path`` holds image-caption pairs in WebDataset shards (pixels,
encoded here by the teacher's VAE, or latents precomputed with it, and optionally the captions' text
embeddings precomputed with its text encoder), which the ratio net needs as its real side;
``data.prompts`` a prompt file for the generator (without it the generator is prompted with the
pairs' captions: with latents and embeddings precomputed, no VAE or text encoder runs per step). Host
work per step (``advance``): read the batch, encode what is not precomputed, copy into fixed device
buffers the step (or its CUDA graph) reads.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from ..config import Config
from ..data.captions import CaptionSource
from ..errors import UserError
from ..images import save_grid
from ..networks.from_denoiser import DenoiserScore, OneStepGenerator
from ..networks.sd import (
    GuidedDenoiser,
    SDParts,
    SDRatio,
    SharedEncoderRatio,
    decode_latents,
    load_sd,
    sigma_grid,
    vae_factor,
)
from ..noise import sd_sigmas
from ..shard import SINGLE, Shard
from ..step import Networks, needs_ratio, needs_scores

_EVAL_SEED = 12345
_GRID = 16  # images in a sample grid
_LATENT_SEED = 7_919  # the VAE posterior draws of pixel pairs: a stream of their own, from (run seed, position)


def build_networks(cfg: Config, sd: SDParts, sigma_init: float, device: torch.device) -> Networks:
    """The method's networks from the teacher's parts (module docstring); the step cost model builds
    them from SD1.5-size parts under FakeTensorMode."""
    method = cfg.method.name
    sd.unet.requires_grad_(False).eval()
    gen_unet = copy.deepcopy(sd.unet).requires_grad_(True).train()
    trainable = [gen_unet]
    nets = Networks(generator=OneStepGenerator(sd.denoiser(gen_unet), sigma_init))
    if needs_scores(method):
        nets.teacher = DenoiserScore(GuidedDenoiser(sd.denoiser(), sd.text.empty, cfg.method.cfg_scale), "vp")
        fake_unet = copy.deepcopy(sd.unet).requires_grad_(True).train()
        trainable.append(fake_unet)
        nets.fake_score = DenoiserScore(sd.denoiser(fake_unet), "vp")
    if needs_ratio(method) and cfg.model.shared_encoder:  # the paper's discriminator: the fake score's encoder
        nets.ratio = SharedEncoderRatio(fake_unet, sd.alphas_cumprod).to(device)
    elif needs_ratio(method):
        # Checkpointed with the others: unchecked, the classifier's pass over real and generated
        # samples at once sets DiffRatio's peak (bench/step_cost.py, SD1.5 rows).
        nets.ratio = SDRatio(dict(sd.unet.config), sd.alphas_cumprod, cfg.model.checkpointing).to(device)
        if cfg.model.ratio_from_teacher:
            nets.ratio.load_encoder(sd.unet)
    if cfg.model.checkpointing:  # DMD2 checkpoints its generator and fake score likewise
        for unet in trainable:
            unet.enable_gradient_checkpointing()
    return nets


class TextToImageTask:
    def __init__(self, cfg: Config, device: torch.device, shard: Shard = SINGLE):
        self.cfg, self.device, self.shard = cfg, device, shard
        self.sd: SDParts = load_sd(cfg.teacher.checkpoint, device)
        teacher = self.sd.denoiser()
        lo, hi = teacher.sigma_range
        self._check_sigmas(lo, hi)
        self.t_init = teacher.nearest_step(cfg.model.sigma_init)
        self.sigma_init = math.exp(float(teacher.log_sigmas[self.t_init]))
        unet, vae = self.sd.unet, self.sd.vae
        side = cfg.data.resolution // vae_factor(vae)
        self.shape = (unet.config.in_channels, side, side)
        d, method = cfg.data, cfg.method.name
        if needs_ratio(method) and not d.path:
            raise UserError(f"data.path: method.name={method} trains a ratio net on real image-caption pairs; give WebDataset shards")
        if not d.path and not d.prompts:
            raise UserError("data.prompts: the generator needs prompts; give a prompt file (.txt or .jsonl) or caption shards in data.path")
        common = {"global_batch": cfg.optim.batch_size, "shard": shard, "resolution": d.resolution, "caption_dropout": d.caption_dropout,
                  "workers": d.workers, "prefetch": d.prefetch, "timeout_s": d.timeout_s, "skip_corrupt": d.skip_corrupt}
        self.pairs = CaptionSource(d.path, kind="pairs", seed=cfg.run.seed, max_items=d.max_images, **common) if d.path else None
        # Its own order and dropout stream: the pairs' positions must not decide the prompts' drops.
        self.prompts = CaptionSource(d.prompts, kind="prompts", seed=cfg.run.seed + 1, **common) if d.prompts else None
        if self.pairs is not None and self.pairs.latent and tuple(self.pairs.shape) != self.shape:
            raise UserError(f"data.path: latents are {tuple(self.pairs.shape)}, the teacher's UNet at data.resolution "
                            f"{d.resolution} takes {self.shape}")
        local = cfg.optim.batch_size // shard.world
        width = self.sd.text.empty.shape[1:]
        if self.pairs is not None and self.pairs.text_shape is not None and tuple(self.pairs.text_shape) != tuple(width):
            raise UserError(f"data.path: text embeddings are {tuple(self.pairs.text_shape)}, this teacher's text encoder gives "
                            f"{tuple(width)}; encode them with this teacher")
        self.x_real = torch.zeros((local, *self.shape), device=device)
        self.text_real = torch.zeros((local, *width), device=device)
        self.text_fake = torch.zeros((local, *width), device=device)
        self._position = 0  # global samples read (names the VAE draws of pixel pairs)

    def _check_sigmas(self, lo: float, hi: float) -> None:
        n, m = self.cfg.noise, self.cfg.model
        # Relative slack: the grid's ends written to a config with 3-4 digits.
        if n.sigma_dist in ("loguniform", "uniform") and not (lo * 0.999 <= n.sigma_min and n.sigma_max <= hi * 1.001):
            raise UserError(f"noise.sigma_min/noise.sigma_max: [{n.sigma_min}, {n.sigma_max}] leaves the teacher's grid "
                            f"[{lo:.4g}, {hi:.4g}] (t = 0..999); DMD2 and SiD-LSG draw t in [20, 980]")
        if n.sigma_dist == "fixed" and not lo * 0.999 <= n.sigma_fixed <= hi * 1.001:
            raise UserError(f"noise.sigma_fixed: {n.sigma_fixed} leaves the teacher's grid [{lo:.4g}, {hi:.4g}]")
        if n.sigma_dist == "sd_steps":
            ours, theirs = sd_sigmas().double(), sigma_grid(self.sd.alphas_cumprod).float().double()
            if not torch.allclose(ours, theirs, rtol=1e-6, atol=0):
                raise UserError("noise.sigma_dist: 'sd_steps' is SD1.x/2.x's grid (scaled_linear 0.00085-0.012); this teacher's "
                                "scheduler differs: use loguniform with noise.sigma_min/max inside its grid")
        if m.sigma_init < lo * 0.999:  # above the grid is its last step (t = 999)
            raise UserError(f"model.sigma_init: {m.sigma_init} is below the teacher's grid [{lo:.4g}, {hi:.4g}]")

    # -- networks --------------------------------------------------------------------------------
    def build_networks(self) -> Networks:
        return build_networks(self.cfg, self.sd, self.sigma_init, self.device)

    def checkpoint_extras(self) -> dict:
        """How ``fastratio.sample`` and the export rebuild the generator without the data: the teacher
        folder (text encoder, VAE, schedule) and the generator's conditioning step."""
        return {"sd": {"teacher": self.cfg.teacher.checkpoint, "t_init": self.t_init, "sigma_init": self.sigma_init,
                       "prediction": self.sd.prediction, "shape": list(self.shape)}}

    # -- data ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor, draw: bool = True) -> torch.Tensor:
        """SD latents of uint8 pixels (scaled to [-1, 1]): a posterior draw (or its mean) times the VAE's
        scaling_factor (0.18215 for SD1.5), the draw's noise taken from the global batch's stream."""
        vae = self.sd.vae
        dist = vae.encode(pixels.to(self.device, torch.float32) / 127.5 - 1).latent_dist
        if not draw:
            return dist.mean * vae.config.scaling_factor
        g = torch.Generator(self.device).manual_seed(self.cfg.run.seed * 1_000_003 + _LATENT_SEED + self._position)
        eps = self.shard.take(torch.randn((self.cfg.optim.batch_size, *dist.mean.shape[1:]), generator=g, device=self.device))
        return (dist.mean + dist.std * eps) * vae.config.scaling_factor

    def _text(self, captions: list[str], stored: torch.Tensor | None) -> torch.Tensor:
        """The captions' embeddings: precomputed ones where the shards hold them (an empty caption, as
        caption dropout leaves it, takes the empty prompt's), else the text encoder's."""
        if stored is None:
            return self.sd.text(captions)
        empty = torch.tensor([c == "" for c in captions], device=self.device)[:, None, None]
        return torch.where(empty, self.sd.text.empty, stored.to(self.device, torch.float32))

    def advance(self) -> None:
        captions = None
        if self.pairs is not None:
            data, captions, stored = self.pairs.advance()
            latents = data.to(self.device, torch.float32) if self.pairs.latent else self._encode_pixels(data)
            self.x_real.copy_(latents)
            self.text_real.copy_(self._text(captions, stored))
        if self.prompts is not None:
            _, prompts, _ = self.prompts.advance()
            self.text_fake.copy_(self.sd.text(prompts))
        else:
            self.text_fake.copy_(self.text_real)
        self._position += self.cfg.optim.batch_size

    def sample_real(self, n: int, rng: torch.Generator, shard: Shard = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_real, self.text_real

    def sample_latent(self, n: int, rng: torch.Generator, shard: Shard = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global latent draw, and this rank's prompts' embeddings."""
        return shard.take(torch.randn((n, *self.shape), generator=rng, device=self.device)), self.text_fake

    def data_state(self) -> dict:
        state = {"position": self._position}
        if self.pairs is not None:
            state["pairs"] = self.pairs.state()
        if self.prompts is not None:
            state["prompts"] = self.prompts.state()
        return state

    def load_data_state(self, state: dict, source: str) -> None:
        position = state.get("position") if isinstance(state, dict) else None
        if type(position) is not int or position < 0:
            raise UserError(f"{source}: data.position {str(position)[:30]} is not a non-negative integer")
        for name in ("pairs", "prompts"):
            src = getattr(self, name)
            if src is not None:
                if name not in state:
                    raise UserError(f"{source}: the checkpoint has no {name} position (written with other data.path/data.prompts)")
                src.load_state(state[name], source)
        self._position = position

    # -- evaluation ------------------------------------------------------------------------------
    def _eval_prompts(self, n: int) -> list[str]:
        source = self.prompts or self.pairs
        return source.reference(n)[1]

    @torch.no_grad()
    def samples(self, model: torch.nn.Module, prompts: list[str], seed: int = _EVAL_SEED) -> torch.Tensor:
        """One-step latents for the prompts from fixed noise (seed)."""
        was_training = model.training
        model.eval()
        z = torch.randn((len(prompts), *self.shape), generator=torch.Generator().manual_seed(seed)).to(self.device)
        out = model(z, self.sd.text(prompts)).float()
        model.train(was_training)
        return out

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Per-channel latent mean/std gaps between one-step samples and the real latents (pairs), or
        the samples' own statistics without pairs."""
        n = min(self.cfg.data.eval_samples, 64)
        fake = self.samples(model, self._eval_prompts(n))
        metrics = {"latent_mean": float(fake.mean()), "latent_std": float(fake.std())}
        if self.pairs is not None:
            data, _, _ = self.pairs.reference(n)
            real = data.to(self.device).float() if self.pairs.latent else self._encode_pixels(data, draw=False)
            metrics["latent_mean_gap"] = float((fake.mean(dim=(0, 2, 3)) - real.mean(dim=(0, 2, 3))).abs().mean())
            metrics["latent_std_gap"] = float((fake.std(dim=(0, 2, 3)) - real.std(dim=(0, 2, 3))).abs().mean())
        return metrics

    def plot(self, model: torch.nn.Module, path: Path) -> None:
        images = decode_latents(self.sd.vae, self.samples(model, self._eval_prompts(_GRID)))
        save_grid(images, path, scale=max(1, 64 // images.shape[-1]))
