"""Export a run's one-step generator (its EMA weights) for use without fastratio's trainer:
``python -m fastratio.export CKPT --out DIR [--teacher SD_FOLDER]``. docs/export.md has the loaders.

**Image runs** (pixels or EDM2 latents): ``DIR/model.safetensors`` (the denoiser's state_dict) and
``DIR/config.json`` with what rebuilds it and takes the one step: ``architecture`` (a class of
``fastratio.networks.denoisers.PRECONDS``) and its constructor ``kwargs``, ``sigma_init``,
``resolution``, ``channels``, ``label_dim``, and for a latent run ``latent`` (the VAE and EDM2's
latent scaling that turn outputs into pixels). The network is rebuilt by the sample CLI's own loader
(``fastratio.inference.load_model``), so the export holds exactly what fastratio samples with:

    x = net(sigma_init * z, sigma_init, one_hot_labels)       z ~ N(0, I) [B, channels, resolution, resolution]

x is in [-1, 1] (pixels) or final latents (decoded as ``latent`` says).

**Text-to-image runs**: ``DIR/unet/`` (the generator's EMA weights as a diffusers
``UNet2DConditionModel``: ``config.json`` + safetensors, by diffusers' own ``save_pretrained``) and
``DIR/fastratio.json`` with what one step needs: the timestep t the UNet is called at, the input
scale, the prediction type and abar_t. With the teacher's text encoder and VAE (docs/text2image.md):

    x_t = input_scale * z                        z ~ N(0, I) [B, 4, H/8, W/8]
    out = unet(x_t, t, encoder_hidden_states=text).sample
    x0  = (x_t - sqrt(1 - abar_t) out) / sqrt(abar_t)     (epsilon)
    x0  = sqrt(abar_t) x_t - sqrt(1 - abar_t) out         (v_prediction)
    image = vae.decode(x0 / vae.config.scaling_factor).sample

which is fastratio's g(z, text) = D(sigma_init z; sigma_init, text) (fastratio.networks.sd).

Nothing already at DIR is overwritten: the export is written to a fresh sibling folder and renamed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from . import checkpoint
from .atomic import write_errors_as_os_errors
from .errors import ArgumentParser, UserError, os_error, run_cli
from .inference import load_model
from .networks.from_denoiser import OneStepGenerator
from .networks.sd import generator_from_checkpoint

IMAGE_FORMAT = "fastratio one-step image generator, v1"


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


def image_export(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json's dict, the denoiser's weights) of an image run's stage-2 checkpoint."""
    model, state = load_model(path, torch.device("cpu"))
    if not isinstance(model, OneStepGenerator):
        raise UserError(f"{path}: a teacher (denoiser) checkpoint; export writes one-step generators: give a checkpoint of a "
                        "stage-2 run (diffratio, dijs, dibregman, vsd)")
    kwargs = dict(state["network_kwargs"])
    latent, config = state.get("latent"), state.get("config")
    if latent is not None and not isinstance(latent, dict):
        raise UserError(f"{path}: 'latent' is not a dict")
    info = {
        "format": IMAGE_FORMAT,
        "architecture": kwargs.pop("precond", "EDMPrecond"),
        "kwargs": kwargs,
        "sigma_init": float(model.sigma_init),
        "resolution": kwargs["img_resolution"], "channels": kwargs["img_channels"], "label_dim": kwargs.get("label_dim", 0),
        "output": "final latents (decode with 'latent')" if latent else "pixels in [-1, 1]",
        "latent": latent,
        "method": config.get("method", {}).get("name") if isinstance(config, dict) and isinstance(config.get("method"), dict) else None,
        "step": state.get("step"),
    }
    try:
        json.dumps(info, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}: network_kwargs do not fit in JSON ({err})") from None
    # safetensors takes contiguous tensors that share no storage (clone: a view of a bigger buffer would be refused).
    weights = {k: v.detach().clone().contiguous() for k, v in model.denoiser.state_dict().items()}
    return info, weights


def export(path: Path, out: Path, teacher: str | None = None) -> Path:
    """Write the generator of checkpoint ``path`` into the new folder ``out`` (module docstring)."""
    if out.exists() or out.is_symlink():
        raise UserError(f"--out: {out} exists; choose a new folder (an export never overwrites)")
    if path.suffix == ".pkl":
        raise UserError(f"{path}: an EDM pickle holds a teacher (denoiser); export writes one-step generators: give a "
                        "checkpoint of a stage-2 run")
    state = checkpoint.load_or_fail(path, "checkpoint")
    if "sd" in state:
        model, parts = generator_from_checkpoint(state, str(path), torch.device("cpu"), teacher)
        info = export_info(model, parts)

        def write(tmp: Path) -> None:
            model.denoiser.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            (tmp / "fastratio.json").write_text(json.dumps(info, indent=2) + "\n")
    else:
        if teacher is not None:
            raise UserError(f"--teacher: only for text-to-image checkpoints; {path} is not one")
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise UserError('export: writing model.safetensors needs the safetensors package: pip install -e ".[latent]" '
                            "(or pip install safetensors)") from None
        del state  # load_model reads the file again (it takes a path); keep one copy in memory
        info, weights = image_export(path)

        def write(tmp: Path) -> None:
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(info, indent=2, allow_nan=False) + "\n")

    return _write_folder(out, write)


def _write_folder(out: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a fresh hidden sibling of ``out``, then rename it to ``out``; a failure
    leaves nothing behind. One line naming --out for any failed write."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    except OSError as err:
        raise os_error(f"--out: cannot create {out}", err) from None
    try:
        with write_errors_as_os_errors():  # safetensors reports a full disk as SafetensorError
            write(tmp)
        os.rename(tmp, out)  # fails if out appeared meanwhile (a non-empty folder, or a file)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(f"--out: cannot write {out}", err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fastratio.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, required=True,
                        help="new folder: model.safetensors + config.json (image runs), unet/ + fastratio.json (text-to-image)")
    parser.add_argument("--teacher", help="text-to-image: the Stable Diffusion folder, when not where the run recorded it")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        raise UserError(f"{args.checkpoint}: checkpoint not found")
    print(f"wrote {export(args.checkpoint, args.out, args.teacher)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
