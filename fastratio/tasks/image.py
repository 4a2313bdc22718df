"""Image task: EDM networks on a real dataset, held on the training device or streamed from disk.

Stage 1 (``method.name: teacher``) trains an EDM denoiser (``nets.teacher``); its checkpoints carry
the network's constructor kwargs so stage 2 can rebuild it. Stage 2 reads ``teacher.checkpoint`` (a
stage-1 ``ckpt-*.pt``, EMA weights, or an official EDM ``*.pkl``) and builds:
  generator   g(z, c) = D(sigma_init z; sigma_init, c) initialised from the teacher (dropout off)
  ratio       the encoder half of the configured UNet with a logit head, optionally started from
              the teacher's encoder (diffratio, dibregman); with model.shared_encoder (dibregman) the
              fake score's own encoder, its mean bottleneck feature the logit (the Di-Bregman paper)
  teacher / fake_score   the frozen teacher and a trainable copy, as scores (vsd, dibregman)
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .. import checkpoint
from ..config import Config
from ..data.formats import load_dataset
from ..data.memory import MemorySource
from ..data.stream import StreamSource
from ..edm_import import load_edm_denoiser
from ..errors import UserError
from ..images import save_grid, to_uint8
from ..latents import LatentScaling, decode, load_vae
from ..networks.denoisers import build_denoiser
from ..networks.edm2 import Block as EDM2Block
from ..networks.from_denoiser import DenoiserScore, OneStepGenerator
from ..networks.image import RatioUNet, SharedEncoderRatio
from ..networks.unet import Precond, UNetBlock
from ..shard import SINGLE, Shard
from ..step import Networks, needs_ratio, needs_scores

_EVAL_SEED = 12345  # evaluation and sample grids draw their own fixed stream
_GRID = 64  # images in a sample grid
_MODEL_TYPES = {"ddpmpp": "SongUNet", "adm": "DhariwalUNet"}


def network_kwargs(cfg: Config, shape: tuple[int, int, int], label_dim: int) -> dict:
    """Denoiser constructor kwargs (EDM's or EDM2's names) for the configured architecture and data shape."""
    channels, height, width = shape
    if height != width:
        raise UserError(f"data.path: images are {height}x{width}; the UNets need square images")
    levels = len(cfg.model.channel_mult)
    if height % (1 << (levels - 1)):
        raise UserError(f"model.channel_mult: {levels} resolutions halve {height}x{height} to a non-integer size")
    if cfg.model.arch == "edm2":  # train_edm2.py's Precond kwargs; the rest are EDM2's defaults
        return {
            "precond": "EDM2Precond", "img_resolution": height, "img_channels": channels, "label_dim": label_dim,
            "sigma_data": cfg.model.sigma_data, "use_fp16": False, "model_channels": cfg.model.channels,
            "channel_mult": list(cfg.model.channel_mult), "num_blocks": cfg.model.num_blocks,
            "attn_resolutions": list(cfg.model.attn_resolutions), "dropout": cfg.model.dropout,
        }
    return {
        "img_resolution": height, "img_channels": channels, "label_dim": label_dim, "sigma_data": cfg.model.sigma_data,
        "model_type": _MODEL_TYPES[cfg.model.arch], "model_channels": cfg.model.channels,
        "channel_mult": list(cfg.model.channel_mult), "num_blocks": cfg.model.num_blocks,
        "attn_resolutions": list(cfg.model.attn_resolutions), "dropout": cfg.model.dropout, "augment_dim": cfg.model.augment_dim,
    }


# Denoiser kwargs that are not the UNet's: the ratio net takes the teacher's architecture without them.
_PRECOND_KWARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "sigma_data",
                   "precond", "beta_d", "beta_min", "M", "epsilon_t", "logvar_channels")


def load_teacher(path: str, device: torch.device) -> Precond:
    """The teacher denoiser from a stage-1 checkpoint (EMA weights) or an EDM pickle."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"teacher.checkpoint: {path} not found (train one with method.name=teacher, or give an EDM .pkl)")
    if file.suffix == ".pkl":
        return _on(load_edm_denoiser(file), device)
    state = checkpoint.load_or_fail(file, "teacher.checkpoint")
    if state.get("config", {}).get("method", {}).get("name") != "teacher" or "network_kwargs" not in state:
        raise UserError(f"teacher.checkpoint: {path} is not from a teacher run (method.name=teacher)")
    try:
        net = build_denoiser(state["network_kwargs"])
        net.load_state_dict(state["ema"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"teacher.checkpoint: {path} weights do not fit its own network_kwargs ({str(err).splitlines()[0]})") from None
    net.init_kwargs = state["network_kwargs"]
    return _on(net, device)


def _on(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module.to(device)`` unless it is there already. A no-op move still swaps every parameter,
    which fails for fake tensors (the step cost model builds the networks under FakeTensorMode)."""
    if all(t.device == device for t in (*module.parameters(), *module.buffers())):
        return module
    return module.to(device)


def _without_dropout(module: torch.nn.Module) -> torch.nn.Module:
    for block in module.modules():
        if isinstance(block, UNetBlock | EDM2Block):
            block.dropout = 0.0
    return module


class ImageTask:
    def __init__(self, cfg: Config, device: torch.device, shard: Shard = SINGLE):
        self.cfg, self.device = cfg, device
        d = cfg.data
        if d.source == "stream":
            self.source = StreamSource(d.path, max_items=d.max_images, global_batch=cfg.optim.batch_size, shard=shard, seed=cfg.run.seed,
                                       device=device, conditional=d.conditional, workers=d.workers, prefetch=d.prefetch,
                                       timeout_s=d.timeout_s, skip_corrupt=d.skip_corrupt)
        else:
            data = load_dataset(d.kind, d.path, d.split, d.max_images, d.memory_budget_gb)
            self.source = MemorySource(data, device, d.conditional)
        self.num_classes = self.source.num_classes
        # An EDM2 latent set: raw VAE posteriors (mean and std) the step turns into final latents.
        self.latent = self.source.images.dtype.is_floating_point
        self.shape = self.source.shape
        self.vae = None
        if self.latent:
            self.shape = self._latent_shape(d.path)
            self.scaling = LatentScaling(device=device)
            if cfg.eval.fid_samples and not cfg.eval.fid_ref:
                raise UserError("eval.fid_ref: a latent set holds no pixels to compare with; give reference statistics "
                                "(EDM2's img512.pkl) for in-loop FID, or set eval.fid_samples=0")
            if cfg.run.plot_every or cfg.eval.fid_samples:  # loaded now: a missing VAE stops the run before it starts
                if not d.vae:
                    raise UserError("data.vae: a latent run decodes its samples for grids and FID; give the AutoencoderKL "
                                    "(e.g. stabilityai/sd-vae-ft-mse) or set run.plot_every=0 and eval.fid_samples=0")
                self.vae = load_vae(d.vae, device)
        self.kwargs = network_kwargs(cfg, self.shape, self.num_classes)
        self._fid_cache: str | None = None
        self._reference: torch.Tensor | None = None
        self._fid_ref = None  # read once, now: a bad file stops the run before it starts
        if cfg.eval.fid_samples and cfg.eval.inception:  # checked now, not at the first evaluation hours later
            from ..inception import checked_weights

            checked_weights(cfg.eval.inception, "eval.inception")
        if cfg.eval.fid_samples and cfg.eval.fid_ref:
            from ..fid import read_reference_stats

            self._fid_ref = read_reference_stats(cfg.eval.fid_ref, "eval.fid_ref")

    def _latent_shape(self, path: str) -> tuple[int, int, int]:
        channels, height, width = self.source.shape
        if channels % 2:
            raise UserError(f"data.path: {path} holds float arrays of {channels} channels; EDM2 latents store mean and std (an even count)")
        if self.cfg.augment.p > 0:
            raise UserError("augment.p: latent sets are not augmented (EDM2 trains without); set augment.p=0")
        return channels // 2, height, width

    # -- networks --------------------------------------------------------------------------------
    def build_networks(self) -> Networks:
        cfg, method = self.cfg, self.cfg.method.name
        if method == "teacher":
            return Networks(teacher=_on(build_denoiser(self.kwargs), self.device))
        teacher = load_teacher(cfg.teacher.checkpoint, self.device).requires_grad_(False).eval()
        t_kwargs = teacher.init_kwargs
        if (t_kwargs["img_channels"], t_kwargs["img_resolution"], t_kwargs.get("label_dim", 0)) != (
            self.shape[0], self.shape[1], self.num_classes
        ):
            raise UserError(
                f"teacher.checkpoint: teacher is for {t_kwargs['img_channels']}x{t_kwargs['img_resolution']}^2 images with "
                f"{t_kwargs.get('label_dim', 0)} classes, data are {self.shape[0]}x{self.shape[1]}^2 with {self.num_classes}"
            )
        if t_kwargs.get("precond") == "EDM2Precond" and cfg.augment.p > 0:
            raise UserError("augment.p: EDM2 networks take no augmentation labels; set augment.p=0 and model.augment_dim=0")
        self.generator_kwargs = teacher.init_kwargs
        generator = copy.deepcopy(teacher) if cfg.model.generator_from_teacher else _on(build_denoiser(teacher.init_kwargs), self.device)
        generator = _without_dropout(generator).requires_grad_(True).train()
        nets = Networks(generator=OneStepGenerator(generator, cfg.model.sigma_init, cfg.model.checkpointing))
        if needs_ratio(method) and not cfg.model.shared_encoder:
            # The encoder half of the teacher's own UNet (DDPM++, NCSN++ or ADM, as the teacher was built),
            # so it can start from the teacher's encoder. No dropout: the generator update differentiates
            # it and wants no extra noise.
            ratio_kwargs = {k: v for k, v in t_kwargs.items() if k not in _PRECOND_KWARGS}
            if t_kwargs.get("precond") == "EDM2Precond":
                ratio_kwargs["model_type"] = "EDM2UNet"
            self.ratio_kwargs = dict(
                img_resolution=self.shape[1], img_channels=self.shape[0], label_dim=self.num_classes,
                sigma_data=cfg.model.sigma_data, schedule=cfg.noise.schedule, **ratio_kwargs,
            )
            nets.ratio = _on(_without_dropout(RatioUNet(**self.ratio_kwargs)), self.device)
            if cfg.model.ratio_from_teacher:
                nets.ratio.load_encoder(teacher)
        if needs_scores(method):
            nets.teacher = DenoiserScore(teacher, cfg.noise.schedule)
            nets.fake_score = DenoiserScore(copy.deepcopy(teacher).requires_grad_(True).train(), cfg.noise.schedule)
        if cfg.model.shared_encoder:  # the Di-Bregman paper's discriminator: the fake score's encoder
            if t_kwargs.get("precond") == "EDM2Precond":
                raise UserError("model.shared_encoder: reads EDM's UNet encoders (DDPM++, NCSN++, ADM), not EDM2's")
            nets.ratio = SharedEncoderRatio(nets.fake_score.denoiser, cfg.noise.schedule)
        return nets

    def checkpoint_extras(self) -> dict:
        """Saved with every checkpoint: how to rebuild the trained (EMA) network without the config's
        data, for stage 2 and ``fastratio.sample``: the denoiser's kwargs (and sigma_init for a
        generator), and for a latent run the VAE and the latent scaling that turn samples into pixels."""
        latent = {"latent": {"vae": self.cfg.data.vae, **self.scaling.state()}} if self.latent else {}
        if self.cfg.method.name == "teacher":
            return {"network_kwargs": self.kwargs, **latent}
        extras = {"network_kwargs": self.generator_kwargs, "sigma_init": self.cfg.model.sigma_init, **latent}
        if needs_ratio(self.cfg.method.name) and not self.cfg.model.shared_encoder:
            extras["ratio_kwargs"] = self.ratio_kwargs  # the verifier rebuilds the ratio net from these
        return extras

    # -- data ------------------------------------------------------------------------------------
    def _one_hot(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        # A comparison, not F.one_hot: no range check that could read the labels back to the host
        # inside a captured step.
        return None if labels is None else (labels[:, None] == torch.arange(self.num_classes, device=labels.device)).float()

    def sample_real(self, n: int, rng: torch.Generator, shard: Shard = SINGLE) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = self.source.draw(n, rng, shard)
        if not self.latent:
            return images.float() / 127.5 - 1, self._one_hot(labels)
        # EDM2: a fresh posterior draw mean + std * eps per step, eps drawn for the global batch (fastratio.shard).
        eps = shard.take(torch.randn((n, *self.shape), generator=rng, device=self.device))
        return self.scaling.to_final(images, eps), self._one_hot(labels)

    def advance(self) -> None:
        self.source.advance()

    def data_state(self) -> dict:
        return self.source.state()

    def load_data_state(self, state: dict, source: str) -> None:
        self.source.load_state(state, source)

    def sample_latent(self, n: int, rng: torch.Generator, shard: Shard = SINGLE) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = shard.take(torch.randn((n, *self.shape), generator=rng, device=self.device))
        if not self.num_classes:
            return z, None
        return z, self._one_hot(shard.take(torch.randint(self.num_classes, (n,), generator=rng, device=self.device)))

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def samples(self, model: torch.nn.Module, n: int, seed: int = _EVAL_SEED) -> torch.Tensor:
        """n samples from fixed latents: one generator step, or the teacher's Heun sampler
        (fastratio.sample.sample, as the CLI draws them from a checkpoint). Images in [-1, 1], or
        final latents for a latent run."""
        from ..inference import sample

        was_training = model.training
        model.eval()
        out = sample(model, n, seed, self.device, None, self.cfg.teacher.sample_steps, pixels=not self.latent)
        model.train(was_training)
        return out

    def pixels(self, model: torch.nn.Module, n: int, seed: int = _EVAL_SEED) -> torch.Tensor:
        """uint8 images of ``samples`` (decoded through the VAE for a latent run)."""
        x = self.samples(model, n, seed)
        return decode(self.vae, x, self.scaling) if self.latent else to_uint8(x)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Per-channel mean/std gaps to the data (pixels in [0, 1] units, or final latents), and FID/KID
        (torch-fidelity) when eval.fid_samples > 0: against the training set, or against eval.fid_ref."""
        n = min(self.cfg.data.eval_samples, 256)
        if self.latent:
            raw = self._real_reference()[: n * 4].to(self.device)
            eps = torch.randn(raw.shape[0], *self.shape, generator=torch.Generator().manual_seed(_EVAL_SEED)).to(self.device)
            fake, real, unit, name = self.samples(model, n).float(), self.scaling.to_final(raw, eps), 1.0, "latent"
        else:
            fake, real, unit, name = to_uint8(self.samples(model, n)).float(), self._real_reference()[: n * 4].float(), 255.0, "pixel"
        mean_gap = (fake.mean(dim=(0, 2, 3)) - real.mean(dim=(0, 2, 3))).abs().mean() / unit
        std_gap = (fake.std(dim=(0, 2, 3)) - real.std(dim=(0, 2, 3))).abs().mean() / unit
        metrics = {f"{name}_mean_gap": float(mean_gap), f"{name}_std_gap": float(std_gap)}
        ev = self.cfg.eval
        if ev.fid_samples:
            from ..fid import fid_against_reference, fidelity_metrics
            from ..inception import private_cache_dir

            fake = torch.cat([self.pixels(model, min(256, ev.fid_samples - i), seed=_EVAL_SEED + i) for i in range(0, ev.fid_samples, 256)])
            if ev.fid_ref:
                metrics["fid"] = fid_against_reference(fake, self._fid_ref, feature_extractor=ev.feature_extractor,
                                                       weights=ev.inception or None, device=self.device)
                return metrics
            # The real set's features are computed once per process and cached in a private folder, never
            # in the run folder: torch-fidelity reads its cache back as a pickle.
            if self._fid_cache is None:
                self._fid_cache = private_cache_dir()
            real = self._real_reference()
            metrics.update(fidelity_metrics(
                fake, real, feature_extractor=ev.feature_extractor, weights=ev.inception or None,
                device=self.device, cache_dir=self._fid_cache, real_name=f"real-{ev.feature_extractor}-{real.shape[0]}",
            ))
        return metrics

    def _real_reference(self) -> torch.Tensor:
        """What evaluation compares with: the whole set in memory; when streaming, a fixed random
        subset of max(eval.fid_samples, 1024) members, read once."""
        if self._reference is None:
            count = len(self.source) if isinstance(self.source, MemorySource) else max(self.cfg.eval.fid_samples, 1024)
            self._reference = self.source.reference(count)[0]
        return self._reference

    def plot(self, model: torch.nn.Module, path: Path) -> None:
        images = self.pixels(model, _GRID)
        save_grid(images, path, scale=max(1, 64 // images.shape[-1]))
