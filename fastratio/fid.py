"""FID, KID, precision/recall and the Inception Score through torch-fidelity, FID reference statistics,
and Clean-FID's resize. Shared by the evaluate CLIs and the image task's in-loop evaluation; it imports
neither side.

Two preprocessings, both feeding torch-fidelity's Inception (``inception-v3-compat``, the 2015-12-05 TF
graph that EDM, ADM and StyleGAN measure with):
  ``tensorflow``  torch-fidelity's own: uint8 images resized to 299x299 inside the network by TF1's
                  bilinear resize (Clean-FID calls this mode legacy_tensorflow).
  ``clean``       Clean-FID's: each channel resized by PIL's bicubic filter in float, not quantized
                  (``clean_resize``), then the same network from its first convolution on.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import safe_pickle
from .data.formats import check_npz_headers
from .errors import UserError
from .inception import INCEPTION, checked_weights, default_weights

RESIZES = ("tensorflow", "clean")
CLEAN_INCEPTION = f"{INCEPTION}-clean-resize"  # the torch-fidelity name of the Inception behind clean_resize
MAX_FEATURE_DIM = 8192  # feature width of reference statistics (Inception 2048, DINOv2-L 1024): sigma is 512 MB at the limit


class _Images(torch.utils.data.Dataset):
    """uint8 [N, C, H, W] as torch-fidelity's input: 3 x H x W uint8 items (grey repeated to 3 channels)."""

    def __init__(self, images: torch.Tensor):
        self.images = images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].contiguous()


def clean_resize(images: torch.Tensor, size: int = 299) -> torch.Tensor:
    """Clean-FID's resize (``cleanfid.resize.make_resizer("PIL", False, "bicubic", (size, size))``):
    every channel of every image resized as a 32-bit float PIL image with the bicubic filter, clipped
    to [0, 255], not quantized. uint8 [N, 3, H, W] -> float32 [N, 3, size, size] in [0, 255]."""
    from PIL import Image

    pixels = images.cpu().numpy()
    out = np.empty((*pixels.shape[:2], size, size), dtype=np.float32)
    for i, image in enumerate(pixels):
        for c, channel in enumerate(image):
            resized = Image.fromarray(channel.astype(np.float32)).resize((size, size), resample=Image.BICUBIC)  # mode F
            out[i, c] = np.asarray(resized).clip(0, 255)
    return torch.from_numpy(out)


def _register_clean_inception() -> None:
    """torch-fidelity's Inception with ``clean_resize`` in front, registered as CLEAN_INCEPTION, so
    every torch-fidelity metric (and its feature cache, keyed by the name) works on it unchanged."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if CLEAN_INCEPTION in FEATURE_EXTRACTORS_REGISTRY:
        return

    class CleanInception(FeatureExtractorInceptionV3):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list, **kwargs)
            self._resized: torch.Tensor | None = None
            # torch-fidelity's forward takes uint8 only, resizes it bilinearly and hands (x - 128) / 128 to
            # its first convolution; this hook hands that convolution the float clean resize, normalised the
            # same way (Clean-FID's InceptionV3W: x - 128, then / 128).
            self.Conv2d_1a_3x3.register_forward_pre_hook(lambda _module, args: ((self._resized.to(args[0]) - 128) / 128,))

        def forward(self, x: torch.Tensor):
            self._resized = clean_resize(x, self.INPUT_IMAGE_SIZE)
            try:
                return super().forward(torch.zeros((x.shape[0], 3, self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE),
                                                   dtype=torch.uint8, device=x.device))
            finally:
                self._resized = None

    torch_fidelity.register_feature_extractor(CLEAN_INCEPTION, CleanInception)


def _extractor(feature_extractor: str, weights: str | None, resize: str, isc: bool = False) -> dict:
    """torch-fidelity's feature_extractor (the clean-resize Inception for ``resize="clean"``) and weights
    arguments: never an unchecked file (fastratio.inception)."""
    if resize not in RESIZES:
        raise UserError(f"--resize: {resize!r}, expected one of {', '.join(RESIZES)}")
    if resize == "clean" and feature_extractor != INCEPTION:
        raise UserError(f"--resize clean: Clean-FID's resize feeds {INCEPTION} at 299x299, not {feature_extractor}")
    if weights and feature_extractor != INCEPTION:
        raise UserError(f"--inception: weights are for {INCEPTION}, the feature extractor is {feature_extractor}")
    if feature_extractor != INCEPTION:
        return {"feature_extractor": feature_extractor}
    path = checked_weights(weights) if weights else default_weights()
    if isc and not torch.load(path, map_location="cpu", weights_only=True, mmap=True)["fc.weight"].any():
        raise UserError(f"--isc: {weights or path} holds no classifier (fc is zero, as python -m fastratio.tools.convert_inception "
                        "writes it); the Inception Score needs torch-fidelity's own weights (weights-inception-2015-12-05-6726825d.pth)")
    if resize == "clean":
        _register_clean_inception()
    return {"feature_extractor": CLEAN_INCEPTION if resize == "clean" else INCEPTION, "feature_extractor_weights_path": path}


def inception_score(logits: torch.Tensor) -> dict[str, float]:
    """{is, is_std} of [N, 1008] logits: torch-fidelity's Inception Score with its defaults (10 splits,
    the samples shuffled by its fixed seed), so it equals ``torch_fidelity.calculate_metrics(isc=True)``."""
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(logits, DEFAULTS["isc_splits"], DEFAULTS["samples_shuffle"], DEFAULTS["rng_seed"])
    return {"is": float(out[KEY_METRIC_ISC_MEAN]), "is_std": float(out[KEY_METRIC_ISC_STD])}


def fidelity_metrics(fake: torch.Tensor, real: torch.Tensor, *, feature_extractor: str = INCEPTION,
                     weights: str | None = None, batch: int = 200, device: torch.device | None = None,
                     prc: bool = False, isc: bool = False, resize: str = "tensorflow", cache_dir: str | None = None,
                     real_name: str | None = None) -> dict[str, float]:
    """FID, KID (precision/recall with ``prc``, the fake set's Inception Score with ``isc``) of uint8
    [N, C, H, W] images through torch-fidelity. ``real_name`` caches the real set's features under
    ``cache_dir`` for repeated calls: a folder only this process writes (fastratio.inception.private_cache_dir),
    since torch-fidelity reads its cache back as a pickle. ``weights`` is checked as data and copied
    before torch-fidelity sees it."""
    import torch_fidelity

    n = min(fake.shape[0], real.shape[0])
    kwargs = {
        "input1": _Images(fake.cpu()), "input2": _Images(real.cpu()), "fid": True, "kid": True, "prc": prc, "isc": isc,
        "batch_size": batch, "kid_subset_size": min(1000, n), "verbose": False,
        "cuda": device is not None and device.type == "cuda", "save_cpu_ram": True,
        **_extractor(feature_extractor, weights, resize, isc),
    }
    if real_name and cache_dir:
        kwargs.update(cache=True, cache_root=cache_dir, input2_cache_name=real_name)  # the name is joined with the extractor's
    else:
        kwargs["cache"] = False
    metrics = torch_fidelity.calculate_metrics(**kwargs)
    out = {"fid": metrics["frechet_inception_distance"], "kid": metrics["kernel_inception_distance_mean"],
           "kid_std": metrics["kernel_inception_distance_std"]}
    if prc:
        out.update(precision=metrics["precision"], recall=metrics["recall"])
    if isc:
        out.update({"is": metrics["inception_score_mean"], "is_std": metrics["inception_score_std"]})
    return out


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
        sigma = stats["sigma"]
        if isinstance(sigma, np.ndarray) and sigma.shape != (dim, dim):
            raise ValueError(f"mu ({dim},) and sigma {sigma.shape} do not match")
        mu, sigma = _float_array(mu, (dim,)), _float_array(sigma, (dim, dim))
    except (safe_pickle.UnsafePickleError, safe_pickle.MalformedPickleError) as err:
        raise UserError(f"{what}: {path} is not reference statistics readable as data ({str(err)[:160]})") from None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"{what}: {path} is not reference statistics ({type(err).__name__}: {str(err)[:120]})") from None
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{what}: {path} holds non-finite values in mu or sigma")
    return {"mu": mu, "sigma": sigma}


def metric_features(metrics: tuple[str, ...] = ("fid",), *, feature_extractor: str = INCEPTION, weights: str | None = None,
                    batch: int = 200, device: torch.device | None = None,
                    resize: str = "tensorflow") -> Callable[..., dict[str, torch.Tensor]]:
    """``features(images) -> {metric: [N, D] float64}``, the layer each of torch-fidelity's ``metrics``
    reads (fid: the pool features; isc: the logits), all from one pass of its extractor, built once
    for every call; ``images`` is uint8 [N, C, H, W] or a Dataset of uint8 [3, H, W] items (read
    lazily, batch by batch)."""
    from torch_fidelity.utils import (
        create_feature_extractor,
        get_featuresdict_from_dataset,
        resolve_feature_layer_for_metric,
    )

    cuda = device is not None and device.type == "cuda"
    kwargs = {**dict.fromkeys(metrics, True), "batch_size": batch, "verbose": False, "cuda": cuda, "save_cpu_ram": True,
              "cache": False, **_extractor(feature_extractor, weights, resize, "isc" in metrics)}
    layers = {metric: resolve_feature_layer_for_metric(metric, **kwargs) for metric in metrics}
    extractor = create_feature_extractor(kwargs["feature_extractor"], list(dict.fromkeys(layers.values())), **kwargs)

    def features(images) -> dict[str, torch.Tensor]:
        data = images if isinstance(images, torch.utils.data.Dataset) else _Images(images.cpu())
        found = get_featuresdict_from_dataset(data, extractor, batch, cuda, True, False)
        return {metric: found[layer].double() for metric, layer in layers.items()}

    return features


def feature_function(**extractor) -> Callable[..., torch.Tensor]:
    """``features(images) -> [N, D]`` float64, the FID layer (``metric_features`` with fid alone)."""
    features = metric_features(("fid",), **extractor)
    return lambda images: features(images)["fid"]


def image_features(images: torch.Tensor, **extractor) -> torch.Tensor:
    """[N, D] float64 features (the FID layer) of uint8 images [N, C, H, W] through torch-fidelity's extractor."""
    return feature_function(**extractor)(images)


def fid_of_features(features: torch.Tensor, reference: dict[str, np.ndarray], feature_extractor: str, what: str = "--fid-ref") -> float:
    """FID of [N, D] features against statistics {mu, sigma}: mean, covariance with N - 1 and the
    distance by torch-fidelity's own functions (as EDM2 computes them)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    stats = fid_features_to_statistics(features)
    if stats["mu"].shape != reference["mu"].shape:
        raise UserError(f"{what}: the statistics are {reference['mu'].shape[0]}-dimensional, {feature_extractor} gives {stats['mu'].shape[0]}")
    ours = {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float64)}
    return float(fid_statistics_to_metric(ours, reference, False)["frechet_inception_distance"])


def metrics_against_reference(fake: torch.Tensor, reference: dict[str, np.ndarray], *, isc: bool = False,
                              feature_extractor: str = INCEPTION, **extractor) -> dict[str, float]:
    """{fid} (and {is, is_std} with ``isc``, from the same pass) of uint8 images [N, C, H, W] against
    precomputed statistics (the paper's and EDM2's ImageNet-512 protocol: 50k samples vs the training
    set's statistics). The statistics and the distance are computed as EDM2 does (mean, covariance
    with N - 1, trace of the matrix square root)."""
    features = metric_features(("fid", "isc") if isc else ("fid",), feature_extractor=feature_extractor, **extractor)(fake)
    out = {"fid": fid_of_features(features["fid"], reference, feature_extractor)}
    return {**out, **inception_score(features["isc"])} if isc else out


def fid_against_reference(fake: torch.Tensor, reference: dict[str, np.ndarray], **extractor) -> float:
    """FID of uint8 images [N, C, H, W] against precomputed statistics (``metrics_against_reference``)."""
    return metrics_against_reference(fake, reference, **extractor)["fid"]
