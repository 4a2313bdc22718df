"""Export a text-to-image run's one-step generator for use without fastratio:
``python -m fastratio.export CKPT --out DIR [--teacher SD_FOLDER]``.

Writes ``DIR/unet/`` (the generator's EMA weights as a diffusers ``UNet2DConditionModel``:
``config.json`` + safetensors, by diffusers' own ``save_pretrained``) and ``DIR/fastratio.json`` with
what one step needs: the timestep t the UNet is called at, the input scale, the prediction type and
abar_t. With the teacher's text encoder and VAE (docs/text2image.md):

    x_t = input_scale * z                        z ~ N(0, I) [B, 4, H/8, W/8]
    out = unet(x_t, t, encoder_hidden_states=text).sample
    x0  = (x_t - sqrt(1 - abar_t) out) / sqrt(abar_t)     (epsilon)
    x0  = sqrt(abar_t) x_t - sqrt(1 - abar_t) out         (v_prediction)
    image = vae.decode(x0 / vae.config.scaling_factor).sample

which is fastratio's g(z, text) = D(sigma_init z; sigma_init, text) (fastratio.networks.sd).
Nothing already in DIR is overwritten: the export is written to a fresh sibling folder and renamed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import checkpoint
from .atomic import write_errors_as_os_errors
from .errors import ArgumentParser, UserError, os_error, run_cli
from .networks.sd import generator_from_checkpoint


def export_info(model, parts) -> dict:
    """The numbers of one step at the generator's conditioning level (float64)."""
    sigma = float(model.sigma_init)
    t = model.denoiser.nearest_step(sigma)
    abar = float(parts.alphas_cumprod[t])
    return {
        "format": "fastratio one-step text-to-image generator, v1",
        "timestep": t, "sigma": sigma, "alphas_cumprod_t": abar, "input_scale": sigma / math.sqrt(1 + sigma**2),
        "prediction_type": parts.prediction, "latent_channels": int(model.denoiser.unet.config.in_channels),
        "vae_scaling_factor": float(parts.vae.config.scaling_factor), "teacher": str(parts.folder),
    }


def export(path: Path, out: Path, teacher: str | None = None) -> Path:
    if out.exists():
        raise UserError(f"--out: {out} exists; choose a new folder (an export never overwrites)")
    state = checkpoint.load_or_fail(path, "checkpoint")
    model, parts = generator_from_checkpoint(state, str(path), torch.device("cpu"), teacher)
    info = export_info(model, parts)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    except OSError as err:
        raise os_error(f"--out: cannot create {out}", err) from None
    try:
        with write_errors_as_os_errors():  # safetensors reports a full disk as SafetensorError
            model.denoiser.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        (tmp / "fastratio.json").write_text(json.dumps(info, indent=2) + "\n")
        os.rename(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(f"--out: cannot write {out}", err) from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fastratio.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="new folder for unet/ and fastratio.json")
    parser.add_argument("--teacher", help="the Stable Diffusion folder, when not where the run recorded it")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        raise UserError(f"{args.checkpoint}: checkpoint not found")
    print(f"wrote {export(args.checkpoint, args.out, args.teacher)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
