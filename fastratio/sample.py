"""Samples from a checkpoint: a grid, or one PNG per seed for an outside evaluator.

    python -m fastratio.sample CKPT [--n 64] [--out grid.png]                 # one grid
    python -m fastratio.sample CKPT --seeds 0-49999 --outdir DIR [--npz F]   # one PNG per seed
    torchrun --nproc_per_node=K -m fastratio.sample CKPT --seeds 0-49999 --outdir DIR
    python -m fastratio.sample CKPT --prompt "..." | --prompts FILE          # text-to-image

Uses the checkpoint's EMA weights: one generator step for a stage-2 run, EDM's Heun sampler for a
teacher run (``--steps``). ``--best-of N`` draws N one-step candidates per image and keeps the one the
run's ratio network (its EMA) scores as most real (fastratio.verifier). Toy runs write their own plots.

``--seeds`` works as EDM's generate.py: seeds and inclusive ranges (``0-3,10``); seed k's noise and
class label come from ``torch.Generator().manual_seed(k)`` alone (``--class`` fixes the class), so its
image is the same whatever the batch or the number of ranks; written to ``DIR/{k - k % 1000:06d}/{k:06d}.png``
(latent runs decoded through their VAE). ``torchrun`` splits the seeds over ranks; files already there
are skipped, so a stopped run restarts where it was. ``--npz`` then also writes every seed's image in
the ADM evaluator's layout: ``arr_0`` uint8 [N, H, W, 3] in seed order, and ``arr_1`` the int64 class
labels for a class-conditional model. Text-to-image checkpoints take ``--seeds`` with ``--prompts``
(seed k gets prompt k mod the file's count) or one ``--prompt``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, distributed
from .atomic import atomic_write
from .data.captions import PromptFile
from .device import resolve_device
from .errors import ArgumentParser, UserError, os_error, run_cli
from .images import save_grid
from .inference import (
    class_count,
    denoiser_of,
    draw_seeds,
    latent_decoder,
    load_model,
    load_verifier,
    one_step,
    read_prompts,
    sample,
    seed_labels,
)
from .networks.from_denoiser import OneStepGenerator
from .networks.sd import decode_latents, generator_from_checkpoint
from .verifier import DEFAULT_SIGMAS, SELECT_RULES

MAX_SEED = 2**32 - 1  # EDM's seeds are 32-bit (it seeds each generator with seed % 2**32)
MAX_SEEDS = 10_000_000  # one --seeds list (EDM's protocol draws 150,000)


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """EDM's generate.py seed list: comma-separated seeds and inclusive ranges ``a-b`` (``0-49999``,
    ``0-3,10``), in the order given, repeats dropped."""
    seeds, count = [], 0
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UserError(f"{flag}: {part.strip()!r} is not a seed or a range a-b (e.g. 0-49999 or 0-3,10)")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise UserError(f"{flag}: the range {low}-{high} is empty (the smaller seed comes first)")
        if high > MAX_SEED:
            raise UserError(f"{flag}: seed {high} is above {MAX_SEED} (seeds are 32-bit, as in EDM)")
        count += high - low + 1
        if count > MAX_SEEDS:
            raise UserError(f"{flag}: more than {MAX_SEEDS:,} seeds")
        seeds.extend(range(low, high + 1))
    return list(dict.fromkeys(seeds))


def seed_path(outdir: Path, seed: int) -> Path:
    """EDM's layout: a folder per 1000 seeds."""
    return outdir / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"


def write_png(image: torch.Tensor, path: Path) -> None:
    """uint8 [C, H, W] (C 1 or 3) as a PNG, written to a temporary file and renamed (a stopped run leaves no half file)."""
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    try:
        atomic_write(path, lambda f: picture.save(f, format="PNG"))
    except OSError as err:
        raise os_error(f"--outdir: cannot write {path}", err) from None


def write_seeds(draw: Callable[[list[int]], torch.Tensor], seeds: Sequence[int], outdir: Path, batch: int,
                ctx: distributed.Context) -> tuple[int, int]:
    """(written, skipped) by this rank: its share ``seeds[rank::world]`` of the seeds whose PNG is not
    there yet, drawn ``batch`` at a time by ``draw(seeds) -> uint8 [B, C, H, W]``."""
    mine = list(seeds[ctx.rank :: ctx.world])
    todo = [s for s in mine if not seed_path(outdir, s).is_file()]
    for start in tqdm(range(0, len(todo), batch), desc=f"seeds (rank {ctx.rank})", disable=not ctx.is_main, leave=False):
        chunk = todo[start : start + batch]
        for seed, image in zip(chunk, draw(chunk).cpu()):
            write_png(image, seed_path(outdir, seed))
    return len(todo), len(mine) - len(todo)


def write_npz(path: Path, outdir: Path, seeds: Sequence[int], labels: list[int] | None) -> None:
    """The seeds' PNGs as the ADM evaluator reads samples: arr_0 uint8 [N, H, W, 3] (grey repeated to 3
    channels), arr_1 int64 [N] class labels for a conditional model."""
    from PIL import Image

    images = []
    try:
        for seed in seeds:
            with Image.open(seed_path(outdir, seed)) as picture:
                images.append(np.asarray(picture.convert("RGB")))
        arrays = {"arr_0": np.stack(images)}
    except (OSError, ValueError) as err:  # a file that is not a PNG of this model: --outdir is shared with another run
        raise UserError(f"--npz: cannot stack the PNGs of {outdir} ({type(err).__name__}: {str(err)[:120]})") from None
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except OSError as err:
        raise os_error(f"--npz: cannot write {path}", err) from None


def _image_drawer(args, device: torch.device):
    """(draw(seeds) -> uint8 images, labels(seeds) -> class labels or None) of an image-run checkpoint."""
    model, state = load_model(args.checkpoint, device)
    verifier = _verifier(args, model, state, device)
    to_pixels = latent_decoder(state, args.vae, args.checkpoint, device)
    class_count(denoiser_of(model), args.class_index)  # --class checked before anything is drawn

    def draw(seeds: list[int]) -> torch.Tensor:
        return draw_seeds(model, seeds, device, args.class_index, args.steps, verifier, args.best_of, tuple(args.sigmas), to_pixels,
                          args.select)

    return draw, lambda seeds: seed_labels(seeds, denoiser_of(model), args.class_index)


def _text_drawer(args, device: torch.device):
    """(draw, labels) of a text-to-image checkpoint: seed k's prompt is --prompt, or prompt k mod the count of --prompts."""
    if args.best_of > 1:
        raise UserError("--best-of: not for text-to-image generators yet")
    model, parts, shape = _text_model(args, device)
    if args.prompts is not None and not args.prompts.is_file():
        raise UserError(f"--prompts: {args.prompts} not found")
    prompts = PromptFile(args.prompts) if args.prompts is not None else None

    def draw(seeds: list[int]) -> torch.Tensor:
        chosen = [args.prompt] * len(seeds) if prompts is None else prompts.read([s % len(prompts) for s in seeds])
        return decode_latents(parts.vae, one_step(model, parts, chosen, seeds, shape, device, batch=len(seeds)))

    return draw, lambda seeds: None


def _verifier(args, model, state: dict, device: torch.device):
    verifier = load_verifier(state, args.checkpoint, device) if args.best_of > 1 else None
    if verifier is not None and not isinstance(model, OneStepGenerator):
        raise UserError(f"{args.checkpoint}: --best-of applies to one-step generators, this is a teacher checkpoint")
    return verifier


def _text_model(args, device: torch.device):
    if not args.checkpoint.is_file():
        raise UserError(f"{args.checkpoint}: checkpoint not found")
    state = checkpoint.load_or_fail(args.checkpoint, "checkpoint")
    model, parts = generator_from_checkpoint(state, str(args.checkpoint), device, args.teacher)
    return model, parts, tuple(state["sd"]["shape"])


def _seeds_main(args, text: bool) -> int:
    seeds = parse_seeds(args.seeds)
    if args.outdir is None:
        raise UserError("--seeds: give --outdir, the folder of the PNGs")
    if args.batch < 1:
        raise UserError(f"--batch: must be >= 1, got {args.batch}")
    ctx = distributed.setup(args.device, lambda name: resolve_device(name, "--device"))
    try:
        draw, labels = (_text_drawer if text else _image_drawer)(args, ctx.device)
        written, skipped = write_seeds(draw, seeds, args.outdir, args.batch, ctx)
        print(f"rank {ctx.rank}: wrote {written} images to {args.outdir}" + (f", {skipped} were there already" if skipped else ""))
        distributed.barrier(ctx)
        if args.npz is not None and ctx.is_main:
            write_npz(args.npz, args.outdir, seeds, labels(seeds))
            print(f"wrote {args.npz} ({len(seeds)} images)")
    finally:
        distributed.teardown(ctx)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fastratio.sample", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--n", type=int, default=64, help="images in the grid")
    parser.add_argument("--seed", type=int, default=0, help="the grid's noise stream")
    parser.add_argument("--seeds", help="one PNG per seed in --outdir: seeds and ranges, e.g. 0-49999 or 0-3,10 (EDM's syntax)")
    parser.add_argument("--outdir", type=Path, help="--seeds: the folder of PNGs (existing ones are skipped)")
    parser.add_argument("--npz", type=Path, help="--seeds: also write the images as the ADM evaluator's .npz (arr_0, arr_1 labels)")
    parser.add_argument("--batch", type=int, default=64, help="--seeds: images drawn at once per rank")
    parser.add_argument("--class", dest="class_index", type=int, help="class to draw (conditional runs; default random)")
    parser.add_argument("--steps", type=int, default=18, help="Heun steps for teacher checkpoints")
    parser.add_argument("--out", type=Path, help="grid PNG path (default: next to the checkpoint)")
    parser.add_argument("--best-of", type=int, default=1, metavar="N", help="keep the most real of N candidates per image (ratio-net verifier)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS), help="verifier noise levels")
    parser.add_argument("--select", choices=SELECT_RULES, default="max",
                        help="--best-of: keep the most real candidate, or resample in proportion to exp(realness) (docs/verifier.md)")
    parser.add_argument("--vae", help="AutoencoderKL that decodes a latent model's samples (default: the one the run recorded)")
    parser.add_argument("--prompt", help="text-to-image: the prompt of every image")
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
    text = args.prompt is not None or args.prompts is not None
    if args.prompt is not None and args.prompts is not None:
        raise UserError("--prompt/--prompts: give one of them")
    if args.seeds is not None:
        return _seeds_main(args, text)
    if args.outdir is not None or args.npz is not None:
        raise UserError("--outdir/--npz: they write one image per seed; give --seeds too")
    device = resolve_device(args.device, "--device")
    if text:
        return _text_to_image(args, device)
    model, state = load_model(args.checkpoint, device)
    verifier = _verifier(args, model, state, device)
    out = args.out or args.checkpoint.with_name(args.checkpoint.stem + "-samples.png")
    to_pixels = latent_decoder(state, args.vae, args.checkpoint, device)
    images = sample(model, args.n, args.seed, device, args.class_index, args.steps, verifier, args.best_of, tuple(args.sigmas),
                    pixels=to_pixels is None, select=args.select)
    save_grid(images if to_pixels is None else to_pixels(images), out, scale=2)
    print(f"wrote {out}")
    return 0


def _text_to_image(args, device: torch.device) -> int:
    if args.best_of > 1:
        raise UserError("--best-of: not for text-to-image generators yet")
    prompts = [args.prompt] * args.n if args.prompt is not None else read_prompts(args.prompts, args.n)
    model, parts, shape = _text_model(args, device)
    latents = one_step(model, parts, prompts, args.seed, shape, device)
    out = args.out or args.checkpoint.with_name(args.checkpoint.stem + "-samples.png")
    save_grid(decode_latents(parts.vae, latents), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
