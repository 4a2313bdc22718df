"""Encode WebDataset image-caption shards to latent-caption shards through a Stable Diffusion teacher's VAE.

    python -m fastratio.tools.encode_sd_latents SHARDS OUT_DIR --teacher SD_FOLDER [--resolution 512] [--per-shard 10000]
                                                [--text-embeddings]

SHARDS is what ``data.path`` takes (a folder of .tar, one .tar, or ``shards/{00000..00099}.tar``).
Each image is resized and center-cropped as training does (fastratio.data.captions), encoded by the
teacher's ``vae/`` (safetensors only, never downloaded), and stored as the posterior mean times the
VAE's ``scaling_factor`` (0.18215 for SD1.5: Stable Diffusion's convention, not EDM2's per-channel
scaling), float16 [4, R/8, R/8], as ``KEY.npy`` beside the sample's ``KEY.txt``, in shards
``OUT_DIR/00000.tar``, ... of ``--per-shard`` samples, in the source's order. A training run with
``data.path: OUT_DIR`` then skips the VAE (the mean, not a fresh posterior draw per epoch: the
draw's std at SD's VAE is small beside the latents). With ``--text-embeddings`` each caption's
text-encoder output (the pipeline's convention: CLIP tokens padded and truncated to 77, the last
hidden state) is stored too, float16 [77, D], as ``KEY.emb.npy``; training then reads it instead of
running the text encoder (a caption dropped in training takes the empty prompt's embedding). OUT_DIR
must not exist; it is written as a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.captions import TarShards, decode_image, shard_paths
from ..errors import ArgumentParser, UserError, os_error, run_cli
from ..hf import import_diffusers, load_component, resolve_folder
from ..networks.sd import load_sd


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@torch.no_grad()
def encode_shards(shards: TarShards, vae, out: Path, resolution: int, batch: int, per_shard: int, device: torch.device,
                  progress: bool = False, text=None) -> int:
    """Write the latent shards into ``out`` (an existing empty folder); returns the samples written.
    ``text``: a fastratio.networks.sd.TextEncoder whose embeddings of the captions are stored too."""
    tar = None
    try:
        for start in tqdm(range(0, len(shards), batch), desc="encode", disable=not progress):
            rows = range(start, min(start + batch, len(shards)))
            read = [shards.read(i) for i in rows]
            pixels = torch.stack([torch.from_numpy(decode_image(raw, shards.member(i), resolution))
                                  for i, (raw, _) in zip(rows, read, strict=True)])
            latents = vae.encode(pixels.to(device, torch.float32) / 127.5 - 1).latent_dist.mean * vae.config.scaling_factor
            embeddings = [None] * len(rows) if text is None else text([c for _, c in read]).cpu().numpy().astype(np.float16)
            for i, (_, caption), latent, embedding in zip(rows, read, latents.cpu().numpy().astype(np.float16), embeddings, strict=True):
                if i % per_shard == 0:
                    if tar is not None:
                        tar.close()
                    # One shard stays open across batches; the finally below closes the last.
                    tar = tarfile.open(out / f"{i // per_shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
                key = shards.keys[i].decode()
                _add(tar, f"{key}.npy", _npy(latent))
                _add(tar, f"{key}.txt", caption.encode("utf-8"))
                if embedding is not None:
                    _add(tar, f"{key}.emb.npy", _npy(embedding))
    finally:
        if tar is not None:
            tar.close()
    return len(shards)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fastratio.tools.encode_sd_latents", description=__doc__.splitlines()[0])
    parser.add_argument("shards", help="image-caption shards: a folder of .tar, one .tar, or a brace pattern")
    parser.add_argument("out", type=Path, help="new folder for the latent shards")
    parser.add_argument("--teacher", required=True, help="the Stable Diffusion folder (or Hugging Face cache name) whose vae/ encodes")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=10000, help="samples per output shard (img2dataset: 10,000)")
    parser.add_argument("--max-images", type=int, default=0)
    parser.add_argument("--text-embeddings", action="store_true", help="store each caption's text-encoder output too (KEY.emb.npy)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if min(args.resolution, args.batch, args.per_shard) < 1 or args.max_images < 0 or args.resolution > 4096:
        raise UserError("--resolution (1..4096), --batch and --per-shard must be >= 1, --max-images >= 0")
    if args.out.exists():
        raise UserError(f"out: {args.out} exists; choose a new folder (encoded shards are never replaced)")
    shards = TarShards(shard_paths(args.shards), args.max_images)
    if shards.latent:
        raise UserError(f"shards: {args.shards} holds latents already")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    text = None
    if args.text_embeddings:  # the whole folder, checked as training loads it
        parts = load_sd(args.teacher, device, "--teacher")
        vae, text = parts.vae, parts.text
    else:
        diffusers = import_diffusers("--teacher")
        vae = load_component(diffusers.AutoencoderKL, resolve_folder(args.teacher, "--teacher") / "vae", "--teacher (vae)")
        vae = vae.eval().requires_grad_(False).to(device)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}-", dir=args.out.parent))
    except OSError as err:
        raise os_error(f"out: cannot create {args.out}", err) from None
    try:
        count = encode_shards(shards, vae, tmp, args.resolution, args.batch, args.per_shard, device, not args.no_progress, text)
        os.rename(tmp, args.out)
    except OSError as err:
        raise os_error(f"out: cannot write {args.out}", err) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.out} ({count} latents{' and text embeddings' if text is not None else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
