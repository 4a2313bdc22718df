"""Encode an image dataset to EDM2's latent dataset with the Stable Diffusion VAE.

    python -m fastratio.tools.encode_latents IMAGES OUT.zip [--vae stabilityai/sd-vae-ft-mse] [--batch 8]

IMAGES is an image folder or a dataset_tool zip at the training resolution (EDM2 makes ImageNet's with
``dataset_tool.py convert --resolution=512x512 --transform=center-crop-dhariwal``). OUT.zip is what
EDM2's ``dataset_tool.py encode`` writes: per image the VAE posterior mean and std (float32
[8, H/8, W/8]) as ``00000/img-mean-std-00000000.npy``, and ``dataset.json`` carrying the labels
(fastratio.latents, fastratio.data.write; tests/test_latents.py compares with EDM2's own output).
The VAE comes from a local folder or the Hugging Face cache, safetensors only; nothing is
downloaded. An existing OUT is never replaced (the zip is written to a temporary file and renamed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..data.formats import Archive
from ..data.write import write_dataset_zip
from ..errors import ArgumentParser, UserError, os_error, run_cli
from ..latents import DEFAULT_VAE, encode_pixels, load_vae


def encoded(archive: Archive, vae, device: torch.device, batch: int, progress: bool):
    """Raw latents of every member, in order, as numpy arrays (one batch of pixels in memory at a time)."""
    first = archive.decode(0)
    if first.dtype.name != "uint8" or first.shape[0] != 3:
        raise UserError(f"{archive.member(0)}: the VAE encodes RGB images, got {first.dtype} {first.shape}")
    if first.shape[1] % 8 or first.shape[2] % 8:
        raise UserError(f"{archive.member(0)}: {first.shape[1]}x{first.shape[2]} is not a multiple of the VAE's factor 8")
    for start in tqdm(range(0, len(archive), batch), desc="encode", disable=not progress):
        pixels = []
        for i in range(start, min(start + batch, len(archive))):
            arr = archive.decode(i)
            if arr.shape != first.shape or arr.dtype != first.dtype:
                raise UserError(f"{archive.member(i)}: {arr.dtype} {arr.shape} differs from {first.dtype} {first.shape} of the first image")
            pixels.append(torch.from_numpy(arr.copy()))
        yield from encode_pixels(vae, torch.stack(pixels).to(device), batch).cpu().numpy()


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fastratio.tools.encode_latents", description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path, help="image folder or dataset_tool zip")
    parser.add_argument("out", type=Path, help="latent dataset zip to write")
    parser.add_argument("--vae", default=DEFAULT_VAE, help="AutoencoderKL folder, or a name in the Hugging Face cache")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-images", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.max_images < 0:
        raise UserError(f"--batch must be >= 1 and --max-images >= 0 (got {args.batch}, {args.max_images})")
    if args.out.exists():
        raise UserError(f"out: {args.out} exists; choose another name (an encoded dataset is never replaced)")
    if not args.images.exists():
        raise UserError(f"images: {args.images} not found")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    archive = Archive(args.images, args.max_images)
    vae = load_vae(args.vae, device)
    try:
        write_dataset_zip(args.out, encoded(archive, vae, device, args.batch, not args.no_progress), archive.labels)
    except OSError as err:
        raise os_error(f"out: cannot write {args.out}", err) from None
    print(f"wrote {args.out} ({len(archive)} latents)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
