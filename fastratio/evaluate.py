"""FID / KID / IS / precision-recall of a checkpoint or of images made elsewhere, with torch-fidelity.

    python -m fastratio.evaluate CKPT [--n 50000] [--seeds 3 | --protocol edm] [--best-of 1 2 4 8 16] [--isc]
    python -m fastratio.evaluate --images DIR_OR_NPZ (--fid-ref STATS | --data-kind K --data-path P) [--isc]

A checkpoint: ``--n`` images per draw and per N from its EMA network (one generator step; Heun for a
teacher checkpoint), draw d at seeds d*n ... (d+1)*n - 1, each image drawn from its seed alone as
``fastratio.sample --seeds`` draws it (so a draw equals the folder that command writes for the same
seeds). ``--protocol edm`` is EDM's: three draws (seeds 0-49999, 50000-99999, 100000-149999 for
n = 50000), each reported, and FID as their minimum. ``--best-of`` N > 1 keeps, of N one-step
candidates per image, the one the run's ratio network scores most real (fastratio.verifier): the
FID-vs-N curve (PNG report). ``--images``: a folder of images (searched recursively: EDM's and
``fastratio.sample``'s subfolders, clean-fid's folders) or an ``.npz`` whose ``arr_0`` is uint8
[N, H, W, 3] (the ADM evaluator's samples), scored against the same references.

References: the training set of the checkpoint's config (or ``--data-kind/--data-path``; a run that
streamed its data: a fixed random subset of ``--real-n`` images of it), or ``--fid-ref`` statistics
(FID and IS only). ``--isc`` adds torch-fidelity's Inception Score; ``--resize clean`` feeds the
Inception Clean-FID's resize (fastratio.fid). Offline: ``--inception`` is torch-fidelity's
``feature_extractor_weights_path`` (``python -m fastratio.tools.convert_inception`` makes one, without
the classifier IS needs); without it torch-fidelity downloads its weights. Results are appended as
JSON lines to ``--out``. Grey images are repeated to 3 channels. See docs/evaluation.md.
"""

from __future__ import annotations

import json
import statistics
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .atomic import atomic_write
from .data.formats import DATASET_KINDS, check_npz_headers, load_dataset, load_folder
from .data.stream import StreamSource
from .device import resolve_device
from .errors import ArgumentParser, UserError, run_cli
from .fid import RESIZES, fidelity_metrics, metrics_against_reference, read_reference_stats
from .inception import private_cache_dir
from .inference import draw_seeds, latent_decoder, load_model, load_verifier
from .runinfo import environment
from .runlog import append_line
from .shard import SINGLE
from .verifier import SELECT_RULES

EDM_DRAWS = 3  # EDM's protocol: FID is the minimum over three draws of 50k at disjoint seeds


def _generate(model, seeds: range, batch: int, device, verifier, best_of: int, steps: int, progress: bool,
              to_pixels=None, select: str = "max") -> torch.Tensor:
    """uint8 images of ``seeds``, each from its seed alone (fastratio.inference.draw_seeds)."""
    chunks = []
    for start in tqdm(range(0, len(seeds), batch), desc=f"generate N={best_of} seeds {seeds.start}-{seeds.stop - 1}",
                      disable=not progress, leave=False):
        chunks.append(draw_seeds(model, seeds[start : start + batch], device, None, steps, verifier, best_of, to_pixels=to_pixels, select=select).cpu())
    return torch.cat(chunks)


def read_images(path: Path) -> torch.Tensor:
    """uint8 [N, C, H, W] of ``--images``: a folder (or an EDM dataset zip) of same-size images, read in
    sorted name order from every subfolder, or an ``.npz`` whose ``arr_0`` is uint8 [N, H, W, C]."""
    try:
        if not path.exists():
            raise UserError(f"{path} not found")
        if path.suffix.lower() != ".npz":
            images = load_folder(path, 0).images
            if images.dtype != torch.uint8:
                raise UserError(f"{path} holds .npy arrays, not images")
            return images
        check_npz_headers(path, ("arr_0",))
        try:
            with np.load(path, allow_pickle=False) as f:
                if "arr_0" not in f.files:
                    raise UserError(f"{path} has no arr_0 (the ADM evaluator's layout: uint8 [N, H, W, 3])")
                images = f["arr_0"]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise UserError(f"{path} is not a readable .npz ({type(err).__name__}: {str(err)[:80]})") from None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
            raise UserError(f"{path}: arr_0 is {images.dtype} {images.shape}; expected uint8 [N, H, W, 3] with N > 0")
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    except UserError as err:
        raise UserError(f"--images: {err}") from None


def report_png(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["best_of"] for r in rows})
    mins = [min(r["fid"] for r in rows if r["best_of"] == n) for n in ns]
    means = [statistics.mean(r["fid"] for r in rows if r["best_of"] == n) for n in ns]
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.plot(ns, means, "o-", label="mean over draws")
    ax.plot(ns, mins, "s--", label="min over draws")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("candidates per image N (ratio-net verifier)")
    ax.set_ylabel("FID")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


def _real_images(args, state: dict, to_pixels) -> tuple[torch.Tensor, str, str]:
    """The real images a checkpoint (or ``--images``) is compared with: its run's data (a fixed subset when it streamed)."""
    data_cfg = state.get("config", {}).get("data", {})  # an EDM pickle or --images carries no config
    kind, path = args.data_kind or data_cfg.get("kind"), args.data_path or data_cfg.get("path")
    if not kind or not path:
        where = f"{args.checkpoint}: no run config" if args.checkpoint else "--images: no run"
        raise UserError(f"{where} to take the real images from; give --data-kind and --data-path, or --fid-ref")
    if to_pixels is not None:
        raise UserError(f"{args.checkpoint}: a latent model's data holds no pixels; give --fid-ref (EDM2's reference statistics)")
    if data_cfg.get("source") == "stream" and kind == "folder":  # too large to load whole: a fixed subset, read by workers
        source = StreamSource(path, max_items=data_cfg.get("max_images", 0), global_batch=1, shard=SINGLE, seed=0, device=torch.device("cpu"),
                              conditional=False, workers=data_cfg.get("workers", 4), prefetch=2, timeout_s=600, skip_corrupt=False)
        return source.reference(args.real_n or max(args.n, 50000))[0], kind, path
    return load_dataset(kind, path, data_cfg.get("split", "train"), data_cfg.get("max_images", 0)).images, kind, path


class _Scorer:
    """Metrics of uint8 images against one reference: real images (their features cached for the
    process) or statistics; the row fields that say what was measured and how."""

    def __init__(self, args, state: dict, to_pixels, device: torch.device):
        self.args, self.device, self.cache = args, device, private_cache_dir()
        self.reference = read_reference_stats(args.fid_ref) if args.fid_ref else None
        self.real, self.against = None, {"real": f"statistics:{args.fid_ref}"}
        if self.reference is None:
            self.real, kind, path = _real_images(args, state, to_pixels)
            self.against = {"real": f"{kind}:{path}", "real_images": int(self.real.shape[0])}

    def __call__(self, fake: torch.Tensor) -> dict:
        args = self.args
        extractor = {"feature_extractor": args.feature_extractor, "weights": args.inception, "batch": args.batch,
                     "device": self.device, "resize": args.resize}
        if self.reference is None:
            metrics = fidelity_metrics(fake, self.real, prc=args.prc, isc=args.isc, cache_dir=self.cache, real_name="real", **extractor)
        else:
            metrics = metrics_against_reference(fake, self.reference, isc=args.isc, **extractor)
        return {**self.against, "feature_extractor": args.feature_extractor, "resize": args.resize, **metrics}


def _line(metrics: dict) -> str:
    return ", ".join(f"{name} {metrics[key]:{spec}}" for key, name, spec in
                     (("fid", "FID", ".3f"), ("kid", "KID", ".5f"), ("is", "IS", ".3f")) if key in metrics)


def _score_images(args, device: torch.device) -> int:
    images = read_images(args.images)
    score = _Scorer(args, {}, None, device)
    out = args.out or args.images.parent / "metrics-eval.jsonl"
    row = {**environment(device), "images": str(args.images), "n": int(images.shape[0]), **score(images)}
    append_line(out, json.dumps(row), "--out")
    print(f"{args.images} ({images.shape[0]} images): {_line(row)}")
    print(f"appended 1 row to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fastratio.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, nargs="?")
    parser.add_argument("--images", type=Path, help="score these images instead of a checkpoint's: a folder (searched recursively) "
                                                    "or an .npz with arr_0 uint8 [N, H, W, 3] (the ADM evaluator's samples)")
    parser.add_argument("--n", type=int, default=50000, help="generated images per draw and N")
    parser.add_argument("--seeds", type=int, help="draws (draw d: seeds d*n ... (d+1)*n - 1); FID per draw, min and mean (default 1)")
    parser.add_argument("--protocol", choices=("edm",), help=f"edm: {EDM_DRAWS} draws (seeds 0-49999, 50000-99999, 100000-149999 "
                                                             "for --n 50000), each reported, FID their minimum")
    parser.add_argument("--best-of", type=int, nargs="+", default=[1], help="N values for the FID-vs-N curve")
    parser.add_argument("--select", choices=SELECT_RULES, default="max",
                        help="--best-of: keep the most real candidate, or resample in proportion to exp(realness) (docs/verifier.md)")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--steps", type=int, default=18, help="Heun steps for teacher checkpoints")
    parser.add_argument("--data-kind", choices=DATASET_KINDS, help="override the checkpoint config's data.kind")
    parser.add_argument("--data-path", help="override the checkpoint config's data.path")
    parser.add_argument("--fid-ref", help="FID (and IS) against these reference statistics (EDM2's img512.pkl, EDM's fid-refs .npz, "
                                          "clean-fid's stats .npz) instead of real images: the paper's ImageNet-512 protocol")
    parser.add_argument("--vae", help="AutoencoderKL that decodes a latent model's samples (default: the one the run recorded)")
    parser.add_argument("--real-n", type=int, default=0,
                        help="a run that streamed its data: compare with this fixed random subset of it (default max(--n, 50000)); "
                             "other runs compare with the whole set")
    parser.add_argument("--inception", help="torch-fidelity Inception weights (.pth) for offline use")
    parser.add_argument("--feature-extractor", default="inception-v3-compat", help="a torch-fidelity feature extractor name")
    parser.add_argument("--isc", action="store_true", help="also the Inception Score of the generated images (torch-fidelity's)")
    parser.add_argument("--resize", choices=RESIZES, default="tensorflow",
                        help="tensorflow: torch-fidelity's TF1 bilinear resize inside the Inception (EDM, ADM); "
                             "clean: Clean-FID's PIL bicubic resize in float")
    parser.add_argument("--prc", action="store_true", help="also precision/recall (on the same features; real images only)")
    parser.add_argument("--out", type=Path, help="JSON-lines file to append to (default: next to the checkpoint or --images)")
    parser.add_argument("--report", type=Path, help="FID-vs-N PNG (default next to --out when several N)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.images is None):
        raise UserError("python -m fastratio.evaluate: give a checkpoint or --images DIR_OR_NPZ, not both")
    if args.real_n < 0:
        raise UserError(f"--real-n: must be >= 0 (0: the default subset), got {args.real_n}")
    if args.images is not None:
        if args.protocol or args.seeds:
            raise UserError("--protocol/--seeds: they draw from a checkpoint; with --images, score each draw's folder")
        if args.batch < 1:
            raise UserError(f"--batch: must be >= 1, got {args.batch}")
        return _score_images(args, resolve_device(args.device, "--device"))
    if args.protocol == "edm" and args.seeds not in (None, EDM_DRAWS):
        raise UserError(f"--protocol edm: {EDM_DRAWS} draws; leave out --seeds {args.seeds}")
    draws = EDM_DRAWS if args.protocol == "edm" else args.seeds or 1
    if args.n <= 1 or draws < 1 or min(args.best_of) < 1 or args.batch < 1 or args.steps < 1:
        raise UserError(f"--n must be > 1, --seeds, --best-of, --batch and --steps >= 1 (got --n {args.n}, --seeds {draws}, "
                        f"--best-of {min(args.best_of)}, --batch {args.batch}, --steps {args.steps})")
    device = resolve_device(args.device, "--device")
    model, state = load_model(args.checkpoint, device)
    verifier = load_verifier(state, args.checkpoint, device) if max(args.best_of) > 1 else None
    to_pixels = latent_decoder(state, args.vae, args.checkpoint, device)
    score = _Scorer(args, state, to_pixels, device)
    out = args.out or args.checkpoint.with_name("metrics-eval.jsonl")
    env = environment(device)
    rows = []
    for best_of in args.best_of:
        for draw in range(draws):
            seeds = range(draw * args.n, (draw + 1) * args.n)
            fake = _generate(model, seeds, args.batch, device, verifier, best_of, args.steps, not args.no_progress, to_pixels,
                             args.select)
            row = {**env, "checkpoint": str(args.checkpoint), "step": state.get("step"), "n": args.n, "seed": draw,
                   "seeds": f"{seeds.start}-{seeds.stop - 1}", "best_of": best_of, "select": args.select if best_of > 1 else None,
                   "protocol": args.protocol, **score(fake)}
            rows.append(row)
            append_line(out, json.dumps(row), "--out")
            print(f"N={best_of} seeds {row['seeds']}: {_line(row)}")
        fids = [r["fid"] for r in rows if r["best_of"] == best_of]
        name = "EDM protocol, " if args.protocol == "edm" else ""
        print(f"N={best_of}: {name}FID min {min(fids):.3f}, mean {statistics.mean(fids):.3f} over {len(fids)} draw(s) of {args.n}")
    if len(args.best_of) > 1:
        report = args.report or out.with_suffix(".png")
        report_png(rows, report)
        print(f"FID vs N: {report}")
    print(f"appended {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
