"""FID / KID / precision-recall of a checkpoint with torch-fidelity, and FID against best-of-N.

    python -m fastratio.evaluate CKPT [--n 50000] [--seeds 3] [--best-of 1 2 4 8 16] [--inception W.pth]

Generates ``--n`` images from the checkpoint's EMA network (one generator step; Heun for a teacher
checkpoint) per seed and per N, and compares them with the training set of the checkpoint's config
(or ``--data-kind/--data-path``); a run that streamed its data is compared with a fixed random
subset of ``--real-n`` images of it (default max(--n, 50000)), read by loader workers. FID is reported
per seed, and as EDM does, its minimum and mean over seeds. ``--best-of`` N > 1 keeps, of N one-step candidates per image, the one the run's ratio
network scores most real (fastratio.verifier), so one run gives the FID-vs-N curve (PNG report).
Offline: ``--inception`` is torch-fidelity's ``feature_extractor_weights_path`` (make one with
``python -m fastratio.tools.convert_inception``); without it torch-fidelity downloads its weights.
Results are appended as JSON lines to ``--out``. Grey images are repeated to 3 channels.
"""

from __future__ import annotations

import json
import statistics
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import safe_pickle
from .atomic import atomic_write
from .data.formats import DATASET_KINDS, check_npz_headers, load_dataset
from .data.stream import StreamSource
from .errors import ArgumentParser, UserError, run_cli
from .images import to_uint8
from .inception import INCEPTION, checked_weights, default_weights, private_cache_dir
from .runinfo import environment
from .runlog import append_line
from .sample import latent_decoder, load_model, load_verifier, sample
from .shard import SINGLE
from .train import resolve_device


class _Images(torch.utils.data.Dataset):
    """uint8 [N, C, H, W] as torch-fidelity's input: 3 x H x W uint8 items."""

    def __init__(self, images: torch.Tensor):
        self.images = images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].contiguous()


def _extractor_weights(feature_extractor: str, weights: str | None) -> dict:
    """torch-fidelity's weights argument: never an unchecked file (fastratio.inception)."""
    if weights and feature_extractor != INCEPTION:
        raise UserError(f"--inception: weights are for {INCEPTION}, the feature extractor is {feature_extractor}")
    if feature_extractor != INCEPTION:
        return {}
    return {"feature_extractor_weights_path": checked_weights(weights) if weights else default_weights()}


def fidelity_metrics(fake: torch.Tensor, real: torch.Tensor, *, feature_extractor: str = "inception-v3-compat",
                     weights: str | None = None, batch: int = 200, device: torch.device | None = None,
                     prc: bool = False, cache_dir: str | None = None, real_name: str | None = None) -> dict[str, float]:
    """FID, KID (and precision/recall) of uint8 [N, C, H, W] images through torch-fidelity.
    ``real_name`` caches the real set's features under ``cache_dir`` for repeated calls: a folder only
    this process writes (fastratio.inception.private_cache_dir), since torch-fidelity reads its cache
    back as a pickle. ``weights`` is checked as data and copied before torch-fidelity sees it."""
    import torch_fidelity

    n = min(fake.shape[0], real.shape[0])
    kwargs = {
        "input1": _Images(fake.cpu()), "input2": _Images(real.cpu()), "fid": True, "kid": True, "prc": prc,
        "feature_extractor": feature_extractor, "batch_size": batch, "kid_subset_size": min(1000, n), "verbose": False,
        "cuda": device is not None and device.type == "cuda", "save_cpu_ram": True,
    }
    kwargs.update(_extractor_weights(feature_extractor, weights))
    if real_name and cache_dir:
        kwargs.update(cache=True, cache_root=cache_dir, input2_cache_name=real_name)
    else:
        kwargs["cache"] = False
    metrics = torch_fidelity.calculate_metrics(**kwargs)
    out = {"fid": metrics["frechet_inception_distance"], "kid": metrics["kernel_inception_distance_mean"],
           "kid_std": metrics["kernel_inception_distance_std"]}
    if prc:
        out.update(precision=metrics["precision"], recall=metrics["recall"])
    return out


MAX_FEATURE_DIM = 8192  # feature width of reference statistics (Inception 2048, DINOv2-L 1024): sigma is 512 MB at the limit


def _float_array(value, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` (an array, or nested lists as a pickle may hold them) as float64 of exactly ``shape``,
    checked level by level before anything is allocated: a pickle's list can hold 2**18 memo references
    to one row, which ``np.asarray`` would expand into gigabytes."""
    if isinstance(value, np.ndarray):
        if value.shape != shape:
            raise ValueError(f"an array of shape {value.shape} where {shape} is expected")
        return value.astype(np.float64)
    if not isinstance(value, list | tuple) or len(value) != shape[0]:
        raise ValueError(f"a {type(value).__name__} of {len(value) if isinstance(value, list | tuple) else 'no'} items "
                         f"where {shape[0]} are expected")
    if len(shape) == 1:
        return np.fromiter((float(v) for v in value), dtype=np.float64, count=shape[0])  # float() refuses a nested list
    out = np.empty(shape, dtype=np.float64)
    for i, row in enumerate(value):
        out[i] = _float_array(row, shape[1:])
    return out


def read_reference_stats(path: str | Path, what: str = "--fid-ref") -> dict[str, np.ndarray]:
    """FID reference statistics {mu [D], sigma [D, D]} (float64) from EDM2's ``calculate_metrics.py ref``
    pickle (``{"fid": {"mu", "sigma"}, ...}``, read by fastratio.safe_pickle: plain arrays only) or
    EDM's ``fid-refs/*.npz`` (``np.load(allow_pickle=False)``, each header checked against its stored
    bytes first). D is bounded by MAX_FEATURE_DIM and sigma's shape checked before it is allocated."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: {path} not found (EDM2's reference statistics, e.g. img512.pkl, or EDM's fid-refs .npz)")
    try:
        if path.suffix == ".npz":
            check_npz_headers(path, ("mu", "sigma"), max_bytes=8 * MAX_FEATURE_DIM**2)
            with np.load(path, allow_pickle=False) as f:
                stats = {"mu": f["mu"], "sigma": f["sigma"]}
        else:
            with path.open("rb") as f:
                data = safe_pickle.load(f, safe_pickle.NUMPY_HANDLERS, str(path))
            stats = data["fid"] if isinstance(data, dict) and isinstance(data.get("fid"), dict) else None
            if stats is None:
                raise ValueError("no 'fid' statistics inside")
        mu = stats["mu"]
        dim = mu.shape[0] if isinstance(mu, np.ndarray) and mu.ndim == 1 else len(mu) if isinstance(mu, list | tuple) else -1
        if not 0 < dim <= MAX_FEATURE_DIM:
            raise ValueError(f"mu is not a vector of 1 to {MAX_FEATURE_DIM} features")
        mu, sigma = _float_array(mu, (dim,)), _float_array(stats["sigma"], (dim, dim))
    except (safe_pickle.UnsafePickleError, safe_pickle.MalformedPickleError) as err:
        raise UserError(f"{what}: {path} is not reference statistics readable as data ({str(err)[:160]})") from None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"{what}: {path} is not reference statistics ({type(err).__name__}: {str(err)[:120]})") from None
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{what}: {path} holds non-finite values in mu or sigma")
    return {"mu": mu, "sigma": sigma}


def feature_function(*, feature_extractor: str = "inception-v3-compat", weights: str | None = None, batch: int = 200,
                     device: torch.device | None = None):
    """``features(images) -> [N, D]`` float64 (the FID layer) through torch-fidelity's extractor, built
    once for every call; ``images`` is uint8 [N, C, H, W] or a Dataset of uint8 [3, H, W] items (read
    lazily, batch by batch)."""
    from torch_fidelity.utils import (
        create_feature_extractor,
        get_featuresdict_from_dataset,
        resolve_feature_layer_for_metric,
    )

    cuda = device is not None and device.type == "cuda"
    kwargs = {"fid": True, "feature_extractor": feature_extractor, "batch_size": batch, "verbose": False, "cuda": cuda,
              "save_cpu_ram": True, "cache": False, **_extractor_weights(feature_extractor, weights)}
    layer = resolve_feature_layer_for_metric("fid", **kwargs)
    extractor = create_feature_extractor(feature_extractor, [layer], **kwargs)

    def features(images) -> torch.Tensor:
        data = images if isinstance(images, torch.utils.data.Dataset) else _Images(images.cpu())
        return get_featuresdict_from_dataset(data, extractor, batch, cuda, True, False)[layer].double()

    return features


def image_features(images: torch.Tensor, *, feature_extractor: str = "inception-v3-compat", weights: str | None = None,
                   batch: int = 200, device: torch.device | None = None) -> torch.Tensor:
    """[N, D] float64 features (the FID layer) of uint8 images [N, C, H, W] through torch-fidelity's extractor."""
    return feature_function(feature_extractor=feature_extractor, weights=weights, batch=batch, device=device)(images)


def fid_of_features(features: torch.Tensor, reference: dict[str, np.ndarray], feature_extractor: str, what: str = "--fid-ref") -> float:
    """FID of [N, D] features against statistics {mu, sigma}: mean, covariance with N - 1 and the
    distance by torch-fidelity's own functions (as EDM2 computes them)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    stats = fid_features_to_statistics(features)
    if stats["mu"].shape != reference["mu"].shape:
        raise UserError(f"{what}: the statistics are {reference['mu'].shape[0]}-dimensional, {feature_extractor} gives {stats['mu'].shape[0]}")
    ours = {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float64)}
    return float(fid_statistics_to_metric(ours, reference, False)["frechet_inception_distance"])


def fid_against_reference(fake: torch.Tensor, reference: dict[str, np.ndarray], *, feature_extractor: str = "inception-v3-compat",
                          weights: str | None = None, batch: int = 200, device: torch.device | None = None) -> float:
    """FID of uint8 images [N, C, H, W] against precomputed statistics (the paper's and EDM2's
    ImageNet-512 protocol: 50k samples vs the training set's statistics). Features come from
    torch-fidelity's extractor; the statistics and the distance are computed as EDM2 does (mean,
    covariance with N - 1, trace of the matrix square root)."""
    features = image_features(fake, feature_extractor=feature_extractor, weights=weights, batch=batch, device=device)
    return fid_of_features(features, reference, feature_extractor)


def _generate(model, n: int, batch: int, seed: int, device, verifier, best_of: int, steps: int, progress: bool,
              to_pixels=None) -> torch.Tensor:
    chunks = []
    for i, start in enumerate(tqdm(range(0, n, batch), desc=f"generate N={best_of} seed={seed}", disable=not progress, leave=False)):
        k = min(batch, n - start)
        x = sample(model, k, seed * 1_000_003 + i, device, None, steps, verifier, best_of, pixels=to_pixels is None)
        chunks.append((to_uint8(x) if to_pixels is None else to_pixels(x)).cpu())
    return torch.cat(chunks)


def report_png(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["best_of"] for r in rows})
    mins = [min(r["fid"] for r in rows if r["best_of"] == n) for n in ns]
    means = [statistics.mean(r["fid"] for r in rows if r["best_of"] == n) for n in ns]
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.plot(ns, means, "o-", label="mean over seeds")
    ax.plot(ns, mins, "s--", label="min over seeds")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("candidates per image N (ratio-net verifier)")
    ax.set_ylabel("FID")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


def _real_images(args, state: dict, to_pixels) -> tuple[torch.Tensor, str, str]:
    """The real images a checkpoint is compared with: its run's data (a fixed subset when it streamed)."""
    data_cfg = state.get("config", {}).get("data", {})  # an EDM pickle carries no config
    kind, path = args.data_kind or data_cfg.get("kind"), args.data_path or data_cfg.get("path")
    if not kind or not path:
        raise UserError(f"{args.checkpoint}: no run config to take the real images from; give --data-kind and --data-path, or --fid-ref")
    if to_pixels is not None:
        raise UserError(f"{args.checkpoint}: a latent model's data holds no pixels; give --fid-ref (EDM2's reference statistics)")
    if data_cfg.get("source") == "stream" and kind == "folder":  # too large to load whole: a fixed subset, read by workers
        source = StreamSource(path, max_items=data_cfg.get("max_images", 0), global_batch=1, shard=SINGLE, seed=0, device=torch.device("cpu"),
                              conditional=False, workers=data_cfg.get("workers", 4), prefetch=2, timeout_s=600, skip_corrupt=False)
        return source.reference(args.real_n or max(args.n, 50000))[0], kind, path
    return load_dataset(kind, path, data_cfg.get("split", "train"), data_cfg.get("max_images", 0)).images, kind, path


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fastratio.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--n", type=int, default=50000, help="generated images per seed and N")
    parser.add_argument("--seeds", type=int, default=1, help="report FID per seed, and min/mean over seeds (EDM: 3)")
    parser.add_argument("--best-of", type=int, nargs="+", default=[1], help="N values for the FID-vs-N curve")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--steps", type=int, default=18, help="Heun steps for teacher checkpoints")
    parser.add_argument("--data-kind", choices=DATASET_KINDS, help="override the checkpoint config's data.kind")
    parser.add_argument("--data-path", help="override the checkpoint config's data.path")
    parser.add_argument("--fid-ref", help="FID (only) against these reference statistics (EDM2's img512.pkl, EDM's fid-refs .npz) "
                                          "instead of real images: the paper's ImageNet-512 protocol")
    parser.add_argument("--vae", help="AutoencoderKL that decodes a latent model's samples (default: the one the run recorded)")
    parser.add_argument("--real-n", type=int, default=0,
                        help="a run that streamed its data: compare with this fixed random subset of it (default max(--n, 50000)); "
                             "other runs compare with the whole set")
    parser.add_argument("--inception", help="torch-fidelity Inception weights (.pth) for offline use")
    parser.add_argument("--feature-extractor", default="inception-v3-compat", help="a torch-fidelity feature extractor name")
    parser.add_argument("--prc", action="store_true", help="also precision/recall (on the same features)")
    parser.add_argument("--out", type=Path, help="JSON-lines file to append to (default: next to the checkpoint)")
    parser.add_argument("--report", type=Path, help="FID-vs-N PNG (default next to --out when several N)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if args.real_n < 0:
        raise UserError(f"--real-n: must be >= 0 (0: the default subset), got {args.real_n}")
    if args.n <= 1 or args.seeds < 1 or min(args.best_of) < 1 or args.batch < 1 or args.steps < 1:
        raise UserError(f"--n must be > 1, --seeds, --best-of, --batch and --steps >= 1 (got --n {args.n}, --seeds {args.seeds}, "
                        f"--best-of {min(args.best_of)}, --batch {args.batch}, --steps {args.steps})")
    device = resolve_device(args.device)
    model, state = load_model(args.checkpoint, device)
    verifier = load_verifier(state, args.checkpoint, device) if max(args.best_of) > 1 else None
    to_pixels = latent_decoder(state, args.vae, args.checkpoint, device)
    reference = read_reference_stats(args.fid_ref) if args.fid_ref else None
    real, kind, path = None, None, None
    if reference is None:
        real, kind, path = _real_images(args, state, to_pixels)
    out = args.out or args.checkpoint.with_name("metrics-eval.jsonl")
    env = environment(device)
    rows = []
    cache = private_cache_dir()
    for best_of in args.best_of:
        for seed in range(args.seeds):
            fake = _generate(model, args.n, args.batch, seed, device, verifier, best_of, args.steps, not args.no_progress, to_pixels)
            if reference is None:
                metrics = fidelity_metrics(fake, real, feature_extractor=args.feature_extractor, weights=args.inception,
                                           batch=args.batch, device=device, prc=args.prc, cache_dir=cache, real_name="real")
                against = {"real": f"{kind}:{path}", "real_images": int(real.shape[0])}
            else:
                metrics = {"fid": fid_against_reference(fake, reference, feature_extractor=args.feature_extractor,
                                                        weights=args.inception, batch=args.batch, device=device)}
                against = {"real": f"statistics:{args.fid_ref}"}
            row = {**env, "checkpoint": str(args.checkpoint), "step": state.get("step"), "n": args.n, "seed": seed,
                   "best_of": best_of, **against, "feature_extractor": args.feature_extractor, **metrics}
            rows.append(row)
            append_line(out, json.dumps(row), "--out")
            print(f"N={best_of} seed={seed}: FID {metrics['fid']:.3f}" + (f", KID {metrics['kid']:.5f}" if "kid" in metrics else ""))
        fids = [r["fid"] for r in rows if r["best_of"] == best_of]
        print(f"N={best_of}: FID min {min(fids):.3f}, mean {statistics.mean(fids):.3f} over {len(fids)} seed(s)")
    if len(args.best_of) > 1:
        report = args.report or out.with_suffix(".png")
        report_png(rows, report)
        print(f"FID vs N: {report}")
    print(f"appended {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
