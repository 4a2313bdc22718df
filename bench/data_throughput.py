"""Streaming data rate: images/s per loader worker for EDM-layout PNG zips and EDM2-layout latent zips,
and how many workers a GPU's step rate needs.

    python bench/data_throughput.py                     # 64x64 PNG and 8x64x64 latent zips, workers 0 1 2
    python bench/data_throughput.py --workers 0 1 2 4 8 --images 20000

Synthetic sets are written in the dataset_tool layout (fastratio.data.write, byte-identical to EDM's
tool on its fixture): 64x64 RGB PNGs stored uncompressed as EDM writes them (random pixels: an
uncompressed PNG decodes at the same speed whatever it shows) and EDM2's latent members, float32
[8, 64, 64] .npy (the VAE posterior mean and std of a 512x512 image). Each configuration runs the
trainer's own StreamSource (order, workers, collation, copy into the step's buffers) for --batches
global batches after two warm-up batches. workers=0 decodes in the training process: the per-core
decode rate. The rate a GPU needs comes from the step cost model's H100 estimate for the ImageNet-64
config (bench/results/step_cost_imagenet64_bf16.json: an estimate, not a measurement) and from EDM's
reported ImageNet-64 teacher run (2500 Mimg in ~13 days on 32 A100s). Writes JSON with machine and commit.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastratio.data.stream import StreamSource
from fastratio.data.write import write_dataset_zip
from fastratio.runinfo import environment, write_result
from fastratio.shard import SINGLE

ROOT = Path(__file__).resolve().parents[1]
COST = ROOT / "bench" / "results" / "step_cost_imagenet64_bf16.json"
EDM_TEACHER_IMG_PER_S_PER_A100 = 2500e6 / (13 * 86400) / 32  # EDM README: imagenet-64x64-cond-adm


def _write_sets(root: Path, images: int, latents: int) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    return {
        "png 3x64x64": write_dataset_zip(root / "png.zip", (rng.integers(0, 256, (3, 64, 64), dtype=np.uint8) for _ in range(images)),
                                         [i % 1000 for i in range(images)]),
        "npy 8x64x64 float32": write_dataset_zip(root / "latents.zip", (rng.standard_normal((8, 64, 64), dtype=np.float32) for _ in range(latents)),
                                                 [i % 1000 for i in range(latents)]),
    }


def measure(path: Path, workers: int, batch: int, batches: int, prefetch: int) -> dict:
    source = StreamSource(str(path), max_items=0, global_batch=batch, shard=SINGLE, seed=0, device=torch.device("cpu"),
                          conditional=True, workers=workers, prefetch=prefetch, timeout_s=600, skip_corrupt=False)
    for _ in range(2):  # worker start-up and the first prefetch
        source.advance()
    t0 = time.perf_counter()
    for _ in range(batches):
        source.advance()
    seconds = time.perf_counter() - t0
    rate = batch * batches / seconds
    return {"set": None, "members": len(source), "workers": workers, "batch": batch, "batches": batches,
            "images_per_s": rate, "images_per_s_per_worker": rate / max(workers, 1)}


def _needs(rows: list[dict]) -> list[dict]:
    """Workers per GPU for the ImageNet-64 rates, from the best measured per-worker PNG rate."""
    per_worker = max(r["images_per_s_per_worker"] for r in rows if r["set"].startswith("png") and r["workers"] > 0)
    targets = []
    if COST.is_file():
        cost = next(r for r in json.loads(COST.read_text()) if r["method"] == "diffratio")
        for mode in ("graph", "eager"):
            rate = cost["batch"] / (cost[f"est_ms_{mode}_h100"] / 1e3)
            targets.append({"what": f"ImageNet-64 DiJS stage 2, batch {cost['batch']}/GPU, H100 {mode} step (cost-model estimate "
                                    f"{cost[f'est_ms_{mode}_h100']:.0f} ms)", "images_per_s_per_gpu": rate})
    targets.append({"what": "ImageNet-64 EDM ADM teacher, as EDM reports it on A100s (measured by EDM)",
                    "images_per_s_per_gpu": EDM_TEACHER_IMG_PER_S_PER_A100})
    for t in targets:
        t["workers_per_gpu"] = math.ceil(t["images_per_s_per_gpu"] / per_worker)
        t["png_images_per_s_per_worker_here"] = per_worker
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000, help="PNG members in the synthetic image zip")
    parser.add_argument("--latents", type=int, default=1000, help="members in the synthetic latent zip")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: print only)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sets = _write_sets(Path(tmp), args.images, args.latents)
        rows = []
        for name, path in sets.items():
            for workers in args.workers:
                row = {**measure(path, workers, args.batch, args.batches, args.prefetch), "set": name}
                rows.append(row)
                print(f"{name:22s} workers={workers}: {row['images_per_s']:8.0f} images/s, {row['images_per_s_per_worker']:7.0f} per worker", flush=True)
    targets = _needs(rows)
    for t in targets:
        print(f"{t['what']}: {t['images_per_s_per_gpu']:.0f} images/s per GPU -> {t['workers_per_gpu']} worker(s) per GPU at this CPU's rate")
    result = {"environment": environment(torch.device("cpu")), "cpu_cores": len(__import__("os").sched_getaffinity(0)),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows, "needs": targets,
              "args": {k: str(v) for k, v in vars(args).items()}}
    if args.out:
        write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
