"""Sample grid from a checkpoint: ``python -m fastratio.sample CKPT [--n 64] [--out grid.png]``.

Uses the checkpoint's EMA weights: one generator step for a stage-2 run, EDM's Heun sampler for a
teacher run (``--steps``). Image runs only (toy runs write their own scatter plots).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import checkpoint
from .errors import UserError, run_cli
from .images import save_grid
from .networks.image import OneStepGenerator
from .networks.unet import EDMPrecond
from .sampler import heun_sample
from .train import resolve_device


def load_model(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """(EMA model in eval mode, checkpoint's config dict) of an image run's checkpoint."""
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = checkpoint.load(path)
    except Exception as err:  # noqa: BLE001 - corrupt or foreign file
        raise UserError(f"{path}: cannot read checkpoint ({type(err).__name__})") from None
    if "network_kwargs" not in state:
        raise UserError(f"{path}: not an image-run checkpoint (no network_kwargs)")
    denoiser = EDMPrecond(**state["network_kwargs"])
    model = denoiser if "sigma_init" not in state else OneStepGenerator(denoiser, state["sigma_init"])
    try:
        model.load_state_dict(state["ema"])
    except RuntimeError as err:
        raise UserError(f"{path}: EMA weights do not fit network_kwargs ({str(err).splitlines()[0]})") from None
    return model.to(device).eval(), state["config"]


@torch.no_grad()
def sample(model: torch.nn.Module, n: int, seed: int, device: torch.device, class_index: int | None, steps: int) -> torch.Tensor:
    denoiser = model.denoiser if isinstance(model, OneStepGenerator) else model
    shape = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
    rng = torch.Generator(device).manual_seed(seed)
    z = torch.randn((n, *shape), generator=rng, device=device)
    labels = None
    if denoiser.label_dim:
        k = denoiser.label_dim
        if class_index is not None and not 0 <= class_index < k:
            raise UserError(f"--class: {class_index} outside [0, {k})")
        idx = torch.full((n,), class_index, device=device) if class_index is not None else torch.randint(k, (n,), generator=rng, device=device)
        labels = torch.nn.functional.one_hot(idx.long(), k).float()
    if isinstance(model, OneStepGenerator):
        return model(z, labels).clamp(-1, 1)
    return heun_sample(model, z, labels, steps).clamp(-1, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastratio.sample", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--n", type=int, default=64, help="images in the grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class", dest="class_index", type=int, help="class to draw (conditional runs; default random)")
    parser.add_argument("--steps", type=int, default=18, help="Heun steps for teacher checkpoints")
    parser.add_argument("--out", type=Path, help="PNG path (default: next to the checkpoint)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.n <= 0:
        raise UserError(f"--n: must be > 0, got {args.n}")
    device = resolve_device(args.device)
    model, _ = load_model(args.checkpoint, device)
    out = args.out or args.checkpoint.with_name(args.checkpoint.stem + "-samples.png")
    save_grid(sample(model, args.n, args.seed, device, args.class_index, args.steps), out, scale=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
