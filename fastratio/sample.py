"""Sample grid from a checkpoint: ``python -m fastratio.sample CKPT [--n 64] [--out grid.png]``;
text-to-image runs: ``python -m fastratio.sample CKPT --prompt "..." | --prompts FILE``.

Uses the checkpoint's EMA weights: one generator step for a stage-2 run, EDM's Heun sampler for a
teacher run (``--steps``). ``--best-of N`` draws N one-step candidates per image in one batched pass
and keeps the one the run's ratio network (its EMA) scores as most real (fastratio.verifier).
Image and text-to-image runs (toy runs write their own scatter plots). A text-to-image grid holds
``--n`` images of one ``--prompt`` (seeds seed, seed + 1, ...) or the first ``--n`` prompts of a
file, decoded through the teacher's VAE.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint
from .data.captions import PromptFile
from .edm_import import load_edm_denoiser
from .errors import ArgumentParser, UserError, run_cli
from .images import save_grid
from .latents import LatentScaling, decode, load_vae
from .networks.denoisers import build_denoiser
from .networks.from_denoiser import OneStepGenerator
from .networks.image import RatioUNet
from .networks.sd import decode_latents, generator_from_checkpoint
from .networks.unet import Precond
from .sampler import heun_sample
from .train import resolve_device
from .verifier import DEFAULT_SIGMAS, best_of_n, realness


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


def latent_sampler(denoiser: Precond, device: torch.device, class_index: int | None):
    """sample_latent(k, rng) -> (z, one-hot labels or None) for the denoiser's image shape."""
    shape = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
    k_classes = denoiser.label_dim
    if k_classes and class_index is not None and not 0 <= class_index < k_classes:
        raise UserError(f"--class: {class_index} outside [0, {k_classes})")

    def sample_latent(n: int, rng: torch.Generator):
        z = torch.randn((n, *shape), generator=rng, device=device)
        if not k_classes:
            return z, None
        idx = torch.full((n,), class_index, device=device) if class_index is not None else torch.randint(k_classes, (n,), generator=rng, device=device)
        return z, torch.nn.functional.one_hot(idx.long(), k_classes).float()

    return sample_latent


@torch.no_grad()
def sample(model, n: int, seed: int, device: torch.device, class_index: int | None, steps: int,
           verifier: RatioUNet | None = None, best_of: int = 1, sigmas=DEFAULT_SIGMAS, pixels: bool = True) -> torch.Tensor:
    """n samples: Heun for a teacher, one step for a generator, best of ``best_of`` with a verifier.
    Pixels are clamped to [-1, 1]; latents (``pixels=False``) are returned as the network made them."""
    out = _sample(model, n, seed, device, class_index, steps, verifier, best_of, sigmas)
    return out.clamp(-1, 1) if pixels else out


def _sample(model, n, seed, device, class_index, steps, verifier, best_of, sigmas) -> torch.Tensor:
    denoiser = model.denoiser if isinstance(model, OneStepGenerator) else model
    sample_latent = latent_sampler(denoiser, device, class_index)
    rng = torch.Generator(device).manual_seed(seed)
    if not isinstance(model, OneStepGenerator):
        z, labels = sample_latent(n, rng)
        # EDM's generate.py: the schedule stays inside the noise levels the network supports.
        bounds = {"sigma_min": max(0.002, float(model.sigma_min)), "sigma_max": min(80.0, float(model.sigma_max))}
        return heun_sample(model, z, labels, steps, **bounds)
    if best_of == 1:
        z, labels = sample_latent(n, rng)
        return model(z, labels)

    def score(x, labels):
        return realness(verifier, x, sigmas, labels, verifier.schedule)

    x, _, _ = best_of_n(model, sample_latent, score, n, best_of, rng)
    return x


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fastratio.sample", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--n", type=int, default=64, help="images in the grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class", dest="class_index", type=int, help="class to draw (conditional runs; default random)")
    parser.add_argument("--steps", type=int, default=18, help="Heun steps for teacher checkpoints")
    parser.add_argument("--out", type=Path, help="PNG path (default: next to the checkpoint)")
    parser.add_argument("--best-of", type=int, default=1, metavar="N", help="keep the most real of N candidates per image (ratio-net verifier)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS), help="verifier noise levels")
    parser.add_argument("--vae", help="AutoencoderKL that decodes a latent model's samples (default: the one the run recorded)")
    parser.add_argument("--prompt", help="text-to-image: the prompt of every image in the grid")
    parser.add_argument("--prompts", type=Path, help="text-to-image: a .txt or .jsonl of prompts, one image each")
    parser.add_argument("--teacher", help="text-to-image: the Stable Diffusion folder, when not where the run recorded it")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.n <= 0:
        raise UserError(f"--n: must be > 0, got {args.n}")
    if args.steps < 1:
        raise UserError(f"--steps: must be >= 1, got {args.steps}")
    if args.best_of < 1:
        raise UserError(f"--best-of: must be >= 1, got {args.best_of}")
    device = resolve_device(args.device)
    if args.prompt is not None or args.prompts is not None:
        return _text_to_image(args, device)
    model, state = load_model(args.checkpoint, device)
    verifier = load_verifier(state, args.checkpoint, device) if args.best_of > 1 else None
    if verifier is not None and not isinstance(model, OneStepGenerator):
        raise UserError(f"{args.checkpoint}: --best-of applies to one-step generators, this is a teacher checkpoint")
    out = args.out or args.checkpoint.with_name(args.checkpoint.stem + "-samples.png")
    to_pixels = latent_decoder(state, args.vae, args.checkpoint, device)
    images = sample(model, args.n, args.seed, device, args.class_index, args.steps, verifier, args.best_of, tuple(args.sigmas),
                    pixels=to_pixels is None)
    save_grid(images if to_pixels is None else to_pixels(images), out, scale=2)
    print(f"wrote {out}")
    return 0


def read_prompts(path: Path, n: int) -> list[str]:
    """The first n prompts of a .txt or .jsonl file (fewer if it holds fewer), read as training reads them."""
    if not path.is_file():
        raise UserError(f"--prompts: {path} not found")
    prompts = PromptFile(path, max_items=n)
    return prompts.read(range(len(prompts)))


def _text_to_image(args, device: torch.device) -> int:
    if args.prompt is not None and args.prompts is not None:
        raise UserError("--prompt/--prompts: give one of them")
    if args.best_of > 1:
        raise UserError("--best-of: not for text-to-image generators yet")
    prompts = [args.prompt] * args.n if args.prompt is not None else read_prompts(args.prompts, args.n)
    if not args.checkpoint.is_file():
        raise UserError(f"{args.checkpoint}: checkpoint not found")
    state = checkpoint.load_or_fail(args.checkpoint, "checkpoint")
    model, parts = generator_from_checkpoint(state, str(args.checkpoint), device, args.teacher)
    latents = one_step(model, parts, prompts, args.seed, tuple(state["sd"]["shape"]), device)
    out = args.out or args.checkpoint.with_name(args.checkpoint.stem + "-samples.png")
    save_grid(decode_latents(parts.vae, latents), out)
    print(f"wrote {out}")
    return 0


@torch.no_grad()
def one_step(model, parts, prompts: list[str], seed: int, shape: tuple[int, ...], device: torch.device, batch: int = 16) -> torch.Tensor:
    """Latents of g(z_i, prompt_i), z_i drawn from seed + i alone: image i is the same whatever the batch."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + start + i)) for i in range(len(chunk))])
        out.append(model(z.to(device), parts.text(chunk)).float())
    return torch.cat(out)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
