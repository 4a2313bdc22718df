"""Drawing images from a trained model: loading a checkpoint's EMA network, its noise (a fixed stream
or one generator per seed, as EDM's generate.py), one generator step, EDM's Heun sampler for a
teacher, best-of-N with the ratio network, and decoding latents. Shared by the sample and evaluate
CLIs and the image task's in-loop evaluation; it imports neither side."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import checkpoint
from .data.captions import PromptFile
from .edm_import import load_edm_denoiser
from .errors import UserError
from .images import to_uint8
from .latents import LatentScaling, decode, load_vae
from .networks.denoisers import build_denoiser
from .networks.from_denoiser import OneStepGenerator
from .networks.image import RatioUNet
from .networks.unet import Precond
from .sampler import heun_sample
from .verifier import DEFAULT_SIGMAS, best_of_n, realness, selection_gumbel


def load_model(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """(EMA model in eval mode, the checkpoint) of an image run's checkpoint; an EDM pickle (``.pkl``)
    gives its denoiser (read as data by fastratio.edm_import) and an empty checkpoint."""
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    if path.suffix == ".pkl":
        return load_edm_denoiser(path).to(device), {}
    state = checkpoint.load_or_fail(path, "checkpoint")
    if "sd" in state:
        raise UserError(f"{path}: a text-to-image generator; give --prompt or --prompts")
    if "network_kwargs" not in state:
        raise UserError(f"{path}: not an image-run checkpoint (no network_kwargs)")
    try:
        denoiser = build_denoiser(state["network_kwargs"])
        model = denoiser if "sigma_init" not in state else OneStepGenerator(denoiser, state["sigma_init"])
        model.load_state_dict(state["ema"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: cannot rebuild the network from network_kwargs and ema ({str(err).splitlines()[0][:160]})") from None
    return model.to(device).eval(), state


def load_verifier(state: dict, path: Path, device: torch.device) -> RatioUNet:
    """The ratio network's EMA from a stage-2 DiffRatio/Di-Bregman checkpoint."""
    if "ratio_kwargs" not in state or "ratio_ema" not in state:
        raise UserError(f"{path}: --best-of needs a checkpoint of a run with a ratio network (diffratio, or dibregman "
                        "without model.shared_encoder)")
    try:
        ratio = RatioUNet(**state["ratio_kwargs"])
        ratio.load_state_dict(state["ratio_ema"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: ratio_ema does not fit ratio_kwargs ({str(err).splitlines()[0][:160]})") from None
    return ratio.to(device).eval()


def latent_decoder(state: dict, vae: str | None, path: Path, device: torch.device):
    """``final latents -> uint8 pixels`` for a latent run's checkpoint (or any checkpoint given
    ``--vae``, with EDM2's scaling); None for a pixel model."""
    latent = state.get("latent")
    if latent is None and not vae:
        return None
    if latent is not None and not isinstance(latent, dict):
        raise UserError(f"{path}: 'latent' is not a dict")
    scaling = LatentScaling(**{k: v for k, v in (latent or {}).items() if k != "vae"})
    name = vae or (latent or {}).get("vae")
    if not name:
        raise UserError(f"{path}: a latent model; give --vae (the AutoencoderKL its run trained with)")
    decoder = load_vae(name, device)
    return lambda x: decode(decoder, x, scaling)


def class_count(denoiser: Precond, class_index: int | None) -> int:
    """The denoiser's class count, with ``--class`` checked against it."""
    k_classes = denoiser.label_dim
    if class_index is not None and not 0 <= class_index < max(k_classes, 1):
        raise UserError(f"--class: {class_index} outside [0, {k_classes})" if k_classes else "--class: the model is unconditional")
    return k_classes


def denoiser_of(model) -> Precond:
    """The EDM denoiser of a teacher or inside a one-step generator."""
    return model.denoiser if isinstance(model, OneStepGenerator) else model


def _shape(denoiser: Precond) -> tuple[int, int, int]:
    return denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution


def latent_sampler(denoiser: Precond, device: torch.device, class_index: int | None):
    """sample_latent(k, rng) -> (z, one-hot labels or None) for the denoiser's image shape: one stream."""
    shape, k_classes = _shape(denoiser), class_count(denoiser, class_index)

    def sample_latent(n: int, rng: torch.Generator):
        z = torch.randn((n, *shape), generator=rng, device=device)
        if not k_classes:
            return z, None
        idx = torch.full((n,), class_index, device=device) if class_index is not None else torch.randint(k_classes, (n,), generator=rng, device=device)
        return z, torch.nn.functional.one_hot(idx.long(), k_classes).float()

    return sample_latent


def seed_draw(seed: int, shape: Sequence[int], label_dim: int, candidates: int = 1) -> tuple[torch.Tensor, int | None]:
    """(noise [candidates, *shape], class index or None) of one seed, as EDM's generate.py draws them:
    from ``torch.Generator().manual_seed(seed)`` alone, the noise first, then the class. A CPU
    generator per seed: the noise depends on the seed only, not on the batch, the rank or the device."""
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn((candidates, *shape), generator=rng)
    return z, int(torch.randint(label_dim, (), generator=rng)) if label_dim else None


def seed_labels(seeds: Sequence[int], denoiser: Precond, class_index: int | None) -> list[int] | None:
    """The class index each seed draws (``class_index`` for all when given); None for an unconditional model."""
    k_classes = class_count(denoiser, class_index)
    if not k_classes:
        return None
    return [class_index if class_index is not None else seed_draw(s, _shape(denoiser), k_classes)[1] for s in seeds]


def seed_sampler(denoiser: Precond, seeds: Sequence[int], device: torch.device, class_index: int | None):
    """sample_latent(k, rng) -> (z, one-hot labels or None) for k = len(seeds) x candidates rows: each
    seed's candidates are consecutive rows (fastratio.verifier.best_of_n's layout); ``rng`` is unused."""
    shape, k_classes = _shape(denoiser), class_count(denoiser, class_index)

    def sample_latent(k: int, rng=None):
        candidates = k // len(seeds)
        draws = [seed_draw(s, shape, k_classes, candidates) for s in seeds]
        z = torch.cat([d[0] for d in draws]).to(device)
        if not k_classes:
            return z, None
        idx = torch.tensor([class_index if class_index is not None else d[1] for d in draws], device=device)
        return z, torch.nn.functional.one_hot(idx.repeat_interleave(candidates), k_classes).float()

    return sample_latent


def generate(model, sample_latent: Callable, n: int, rng: torch.Generator | None, steps: int = 18,
             verifier: RatioUNet | None = None, best_of: int = 1, sigmas=DEFAULT_SIGMAS,
             gumbel: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> torch.Tensor:
    """n samples of the noise ``sample_latent`` draws: Heun for a teacher, one step for a generator,
    best of ``best_of`` with a verifier (resampled with ``gumbel``: fastratio.verifier). Unclamped, as
    the network made them."""
    if not isinstance(model, OneStepGenerator):
        z, labels = sample_latent(n, rng)
        # EDM's generate.py: the schedule stays inside the noise levels the network supports.
        bounds = {"sigma_min": max(0.002, float(model.sigma_min)), "sigma_max": min(80.0, float(model.sigma_max))}
        return heun_sample(model, z, labels, steps, **bounds)
    if best_of == 1:
        z, labels = sample_latent(n, rng)
        return model(z, labels)

    def score(x, labels, row_keys=None):
        return realness(verifier, x, sigmas, labels, verifier.schedule, keys=row_keys)

    x, _, _ = best_of_n(model, sample_latent, score, n, best_of, rng, gumbel=gumbel, keys=keys)
    return x


@torch.no_grad()
def sample(model, n: int, seed: int, device: torch.device, class_index: int | None, steps: int,
           verifier: RatioUNet | None = None, best_of: int = 1, sigmas=DEFAULT_SIGMAS, pixels: bool = True,
           select: str = "max") -> torch.Tensor:
    """n samples of one noise stream seeded by ``seed`` (grids, in-loop evaluation). Pixels are clamped
    to [-1, 1]; latents (``pixels=False``) are returned as the network made them."""
    sample_latent = latent_sampler(denoiser_of(model), device, class_index)
    gumbel = selection_gumbel([seed], n * best_of) if select == "resample" else None
    out = generate(model, sample_latent, n, torch.Generator(device).manual_seed(seed), steps, verifier, best_of, sigmas, gumbel)
    return out.clamp(-1, 1) if pixels else out


@torch.no_grad()
def draw_seeds(model, seeds: Sequence[int], device: torch.device, class_index: int | None = None, steps: int = 18,
               verifier: RatioUNet | None = None, best_of: int = 1, sigmas=DEFAULT_SIGMAS, to_pixels=None,
               select: str = "max") -> torch.Tensor:
    """uint8 images [len(seeds), C, H, W], image i drawn from seeds[i] alone (``seed_draw``; best-of-N's
    scoring noise keyed by (seed, candidate), and with ``select="resample"`` its selection noise too),
    so the same whatever the batch it is drawn in; ``to_pixels`` decodes a latent model's output."""
    sample_latent = seed_sampler(denoiser_of(model), seeds, device, class_index)
    gumbel = selection_gumbel(seeds, best_of) if select == "resample" else None
    keys = torch.tensor([s * best_of + j for s in seeds for j in range(best_of)], dtype=torch.int64) if best_of > 1 else None
    x = generate(model, sample_latent, len(seeds), None, steps, verifier, best_of, sigmas, gumbel, keys)
    return to_uint8(x) if to_pixels is None else to_pixels(x)


def read_prompts(path: Path, n: int) -> list[str]:
    """The first n prompts of a .txt or .jsonl file (fewer if it holds fewer), read as training reads them."""
    if not path.is_file():
        raise UserError(f"--prompts: {path} not found")
    prompts = PromptFile(path, max_items=n)
    return prompts.read(range(len(prompts)))


@torch.no_grad()
def one_step(model, parts, prompts: list[str], seed: int | Sequence[int], shape: tuple[int, ...], device: torch.device,
             batch: int = 16) -> torch.Tensor:
    """Latents of g(z_i, prompt_i), z_i drawn from its seed alone (seed + i for an int ``seed``, else
    seed[i]): image i is the same whatever the batch."""
    seeds = range(seed, seed + len(prompts)) if isinstance(seed, int) else seed
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds[start : start + len(chunk)]])
        out.append(model(z.to(device), parts.text(chunk)).float())
    return torch.cat(out)
