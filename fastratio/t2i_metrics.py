"""Zero-shot text-to-image metrics of a text2image checkpoint: COCO-style FID and CLIP score.

    python -m fastratio.t2i_metrics CKPT --captions FILE [--n 30000] [--reference DIR|STATS] [--inception W.pth]
        [--clip-weights open_clip_model.safetensors [--clip-model ViT-g-14]] [--save-images DIR] [--out F.jsonl]

The protocol of GigaGAN's and DMD2's COCO-2014 evaluation (mingukkang/GigaGAN evaluation/data_util.py,
tianweiy/DMD2 main/coco_eval/coco_evaluator.py): one image per caption (the first ``--n`` of a .txt or
.jsonl file, image i from noise seed ``--seed`` + i, so it does not depend on ``--batch``), decoded
through the teacher's VAE, then **center-cropped to a square of the shorter side** (torchvision's
``center_crop`` offsets, int(round((side - crop) / 2))) and **resized to 256 x 256 with PIL's
``Image.LANCZOS``** (DMD2: ``image_pil.resize((256, 256), Image.LANCZOS)``; GigaGAN:
``transforms.Resize(256, InterpolationMode.LANCZOS)`` on a PIL image, the same PIL call). Real
images get the same crop and resize (read with PIL, bounded by MAX_IMAGE_PIXELS, converted to RGB).

FID uses torch-fidelity's Inception (``--inception`` weights for offline use; fastratio.evaluate):
generated features are taken batch by batch, the reference is a folder of real images (COCO val2014;
``--save-ref-stats`` keeps its statistics as an .npz for later runs) or precomputed statistics (EDM's
fid-refs .npz or EDM2's pickle). The peers measure with clean-fid, whose 299 x 299 resize differs from
torch-fidelity's, so numbers are close but not identical; ``--save-images`` writes the 256 x 256
PNGs (``000000.png`` ... by caption index; an existing file is left as it is) for clean-fid or
any other outside evaluator.

CLIP score with open_clip (``--clip-model``, default ViT-g-14 as DMD2 and SiD-LSG report with the
laion2b_s12b_b42k weights) from a local weights file only (``--clip-weights``: safetensors, or a
.bin/.pt/.pth state dict read with ``torch.load(weights_only=True)``); nothing is downloaded. Each
256 x 256 image goes through open_clip's own preprocessing for the model (resize of the shorter side
to its image size, center crop, its mean/std; ``--clip-pretrained`` names the published weights
whose preprocessing and QuickGELU setting are taken from open_clip's built-in table), the caption
through its tokenizer (``--clip-prefix`` is prepended: DMD2 prepends "A photo depicts "). Reported:

    clip_score  = mean_i 100 * max(cos(E_image_i, E_text_i), 0)   (CLIPScore, Hessel et al. 2021, w = 100;
                                                                   torchmetrics' documented formula)
    clip_cosine = mean_i cos(E_image_i, E_text_i)                  (what DMD2 and SiD-LSG report, e.g. 0.32)

One JSON line is printed and appended to ``--out``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint
from .atomic import atomic_write
from .data.formats import IMAGE_SUFFIXES, MAX_MEMBER_BYTES, open_image
from .device import resolve_device
from .errors import ArgumentParser, UserError, os_error, run_cli
from .fid import feature_function, fid_of_features, read_reference_stats
from .inference import one_step, read_prompts
from .networks.sd import decode_latents, generator_from_checkpoint
from .runinfo import environment
from .runlog import append_line

RESOLUTION = 256  # the COCO-2014 zero-shot protocol's evaluation size
RESIZE = "center crop to the shorter side, PIL LANCZOS resize"  # recorded with every result
CLIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# -- images ---------------------------------------------------------------------------------------
def center_crop_resize(image, size: int = RESOLUTION):
    """A PIL image center-cropped to a square of its shorter side (offsets as torchvision's
    ``center_crop``: int(round((side - crop) / 2))) and resized to size x size with ``Image.LANCZOS``."""
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    left, top = round((w - side) / 2), round((h - side) / 2)  # Python rounds half to even, as torchvision does
    square = image.crop((left, top, left + side, top + side))
    return square if side == size else square.resize((size, size), Image.LANCZOS)


def _to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def read_image(path: Path, size: int = RESOLUTION):
    """A real image file as an RGB PIL image, cropped and resized as the generated ones (UserError naming it)."""
    if path.stat().st_size > MAX_MEMBER_BYTES:
        raise UserError(f"{path}: {path.stat().st_size} bytes is not an image")
    with open_image(path.read_bytes(), str(path)) as img:
        return center_crop_resize(img.convert("RGB"), size)


class ImageFolder(torch.utils.data.Dataset):
    """The images under a folder (recursively, by suffix, sorted) as uint8 [3, size, size], read when asked."""

    def __init__(self, folder: Path, size: int = RESOLUTION, what: str = "--reference"):
        if not folder.is_dir():
            raise UserError(f"{what}: {folder} is not a folder")
        self.files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise UserError(f"{what}: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _to_tensor(read_image(self.files[i], self.size))


def image_name(i: int, n: int) -> str:
    return f"{i:0{max(6, len(str(n - 1)))}d}.png"


def save_images(images: list, start: int, n: int, folder: Path) -> int:
    """Write images[k] as folder/<start + k>.png unless that file exists; returns how many were written."""
    written = 0
    for k, image in enumerate(images):
        path = folder / image_name(start + k, n)
        if path.exists():
            continue
        try:
            atomic_write(path, lambda f, image=image: image.save(f, format="PNG"))
        except OSError as err:
            raise os_error(f"--save-images: cannot write {path}", err) from None
        written += 1
    return written


# -- CLIP -----------------------------------------------------------------------------------------
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, as data only: safetensors, or torch.load(weights_only=True)."""
    if not path.is_file():
        raise UserError(f"--clip-weights: {path} not found (a local open_clip state dict: .safetensors, or .bin/.pt/.pth; nothing is downloaded)")
    if path.suffix not in CLIP_SUFFIXES:
        raise UserError(f"--clip-weights: {path} is not one of {', '.join(CLIP_SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever safetensors or the weights-only unpickler refuse
        raise UserError(f"--clip-weights: {path} is not a weights file readable as data "
                        f"({type(err).__name__}: {str(err).strip().splitlines()[0][:120] if str(err).strip() else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # open_clip's training checkpoints
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"--clip-weights: {path} is not a dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


class ClipScorer:
    """An open_clip model from a built-in config and a local weights file; ``cosines(images, captions)``."""

    def __init__(self, name: str, weights: Path, device: torch.device, pretrained: str | None = None, prefix: str = ""):
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        config = open_clip.get_model_config(name) if ":" not in name else None
        if config is None:
            raise UserError(f"--clip-model: {name!r} is not a built-in open_clip config (e.g. ViT-g-14, ViT-L-14); "
                            "hf-hub: and local-dir: names are not read")
        if any(k in config.get("text_cfg", {}) for k in ("hf_model_name", "hf_tokenizer_name")):
            raise UserError(f"--clip-model: {name} has a Hugging Face text tower or tokenizer, which would be fetched; "
                            "choose a model with open_clip's own text tower (e.g. ViT-g-14)")
        tag = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
        if pretrained and not tag:
            known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise UserError(f"--clip-pretrained: {pretrained!r} is not a published tag of {name} (known: {known}); '' for open_clip's defaults")
        state = _read_state_dict(weights)  # before building the model: a bad file fails fast
        model = open_clip.create_model(name, pretrained=None, pretrained_image=False, pretrained_text=False,
                                       force_quick_gelu=bool(tag.get("quick_gelu", False)), force_preprocess_cfg=tag)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise UserError(f"--clip-weights: {weights} does not fit {name} ({' '.join(str(err).split())[:200]})") from None
        self.model = model.to(device).eval().requires_grad_(False)
        self.preprocess = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device, self.prefix = device, prefix

    @torch.no_grad()
    def cosines(self, images: list, captions: list[str]) -> torch.Tensor:
        """cos(E_image, E_text) [n] (float32, cpu) of PIL images and their captions."""
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        tokens = self.tokenizer([self.prefix + c for c in captions]).to(self.device)
        image = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (image * text).sum(-1).cpu()


def clip_scores(cos: torch.Tensor) -> dict[str, float]:
    return {"clip_score": float(100 * cos.double().clamp(min=0).mean()), "clip_cosine": float(cos.double().mean())}


# -- the run --------------------------------------------------------------------------------------
def _reference(args, features) -> tuple[dict[str, np.ndarray] | None, dict]:
    if args.reference is None:
        return None, {}
    if args.reference.is_dir():
        folder = ImageFolder(args.reference)
        from torch_fidelity.metric_fid import fid_features_to_statistics

        stats = {k: np.asarray(v, dtype=np.float64) for k, v in fid_features_to_statistics(features(folder)).items()}
        if args.save_ref_stats:
            atomic_write(args.save_ref_stats, lambda f: np.savez(f, mu=stats["mu"], sigma=stats["sigma"]))
        return stats, {"reference": f"folder:{args.reference}", "reference_images": len(folder)}
    return read_reference_stats(args.reference, "--reference"), {"reference": f"statistics:{args.reference}"}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fastratio.t2i_metrics", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--captions", type=Path, required=True, help="a .txt or .jsonl of captions, one image each")
    parser.add_argument("--n", type=int, default=30000, help="the first N captions (COCO-2014 protocol: 30000)")
    parser.add_argument("--seed", type=int, default=0, help="image i is drawn from noise seed SEED + i")
    parser.add_argument("--batch", type=int, default=16, help="captions generated (and scored) at once")
    parser.add_argument("--reference", type=Path, help="FID against a folder of real images or statistics (.npz mu/sigma, EDM2 .pkl)")
    parser.add_argument("--save-ref-stats", type=Path, help="write a reference folder's statistics to this .npz (for --reference later)")
    parser.add_argument("--inception", help="torch-fidelity Inception weights (.pth) for offline use")
    parser.add_argument("--feature-extractor", default="inception-v3-compat", help="a torch-fidelity feature extractor name")
    parser.add_argument("--clip-weights", type=Path, help="CLIP score with this local open_clip state dict (.safetensors, .bin/.pt/.pth)")
    parser.add_argument("--clip-model", default="ViT-g-14", help="open_clip built-in model config of --clip-weights")
    parser.add_argument("--clip-pretrained", default="laion2b_s12b_b42k",
                        help="the published weights --clip-weights holds, for open_clip's preprocessing table ('' for its defaults)")
    parser.add_argument("--clip-prefix", default="", help="text prepended to every caption for CLIP (DMD2: 'A photo depicts ')")
    parser.add_argument("--save-images", type=Path, help="write the 256x256 PNGs here (existing files are kept)")
    parser.add_argument("--teacher", help="the Stable Diffusion folder, when not where the run recorded it")
    parser.add_argument("--out", type=Path, help="JSON-lines file to append to (default: next to the checkpoint)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch < 1:
        raise UserError(f"--n and --batch must be >= 1 (got --n {args.n}, --batch {args.batch})")
    if args.reference is None and args.clip_weights is None and args.save_images is None:
        raise UserError("nothing to do: give --reference (FID), --clip-weights (CLIP score) and/or --save-images")
    if args.save_ref_stats and (args.reference is None or not args.reference.is_dir()):
        raise UserError("--save-ref-stats: needs --reference to be a folder of images")
    if args.reference is not None and not args.reference.exists():
        raise UserError(f"--reference: {args.reference} not found (a folder of real images, or an .npz/.pkl of statistics)")
    if not args.captions.is_file():
        raise UserError(f"--captions: {args.captions} not found (a .txt, one caption a line, or a .jsonl with 'caption' fields)")
    captions = read_prompts(args.captions, args.n)
    if not captions:
        raise UserError(f"--captions: {args.captions} holds no captions")
    if not args.checkpoint.is_file():
        raise UserError(f"{args.checkpoint}: checkpoint not found")
    device = resolve_device(args.device)
    state = checkpoint.load_or_fail(args.checkpoint, "checkpoint")
    model, parts = generator_from_checkpoint(state, str(args.checkpoint), device, args.teacher)
    clip = ClipScorer(args.clip_model, args.clip_weights, device, args.clip_pretrained or None, args.clip_prefix) if args.clip_weights else None
    features = None
    if args.reference is not None:
        features = feature_function(feature_extractor=args.feature_extractor, weights=args.inception, device=device)
    reference, against = _reference(args, features)  # a bad reference image fails before generating
    shape = (model.denoiser.unet.config.in_channels, *[int(s) for s in state["sd"]["shape"][1:]])
    n = len(captions)
    feats, cos, written = [], [], 0
    for start in tqdm(range(0, n, args.batch), desc="generate", disable=args.no_progress, leave=False):
        chunk = captions[start : start + args.batch]
        pixels = decode_latents(parts.vae, one_step(model, parts, chunk, args.seed + start, shape, device, batch=args.batch)).cpu()
        images = [center_crop_resize(_to_pil(x)) for x in pixels]
        if args.save_images is not None:
            written += save_images(images, start, n, args.save_images)
        if features is not None:
            feats.append(features(torch.stack([_to_tensor(im) for im in images])))
        if clip is not None:
            cos.append(clip.cosines(images, chunk))
    row = {**environment(device), "checkpoint": str(args.checkpoint), "step": state.get("step"), "captions": str(args.captions),
           "n": n, "seed": args.seed, "resolution": RESOLUTION, "resize": RESIZE}
    if reference is not None:
        row.update(against, feature_extractor=args.feature_extractor,
                   fid=fid_of_features(torch.cat(feats), reference, args.feature_extractor, "--reference"))
    if clip is not None:
        row.update(clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, clip_prefix=args.clip_prefix, **clip_scores(torch.cat(cos)))
    if args.save_images is not None:
        row.update(images=str(args.save_images), images_written=written)
    out = args.out or args.checkpoint.with_name("metrics-t2i.jsonl")
    append_line(out, json.dumps(row), "--out")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
