"""The toy default (configs/toy2d.yaml) on every mixture of the family, by DiJS and by VSD.

    python bench/toy_family.py [--mixtures ring8 spiral6 ...] [--methods dijs vsd] [--seeds 0]
                               [--jobs 2] [--set KEY=VALUE ...] [--out bench/results/toy_family_cpu.json]

Each cell is the main job, ``python -m fastratio.train configs/toy2d.yaml``, unchanged but for
the mixture, the method, the seed and any ``--set``, run in its own process with one thread
(``--jobs`` at a time). Rows hold the final evaluation (modes covered, mass total variation against
an exact sample's, energy distance against an exact sample's, high-quality share), the verdict of
``toy.criterion_failures`` and the wall time, with versions and commit, and every evaluation of the
run (``evaluations``: how much the result moves between evaluations, not only where it ended). Runs are written under
``--work`` (default: a temporary directory) and kept there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

from fastratio import toy
from fastratio.runinfo import environment, write_result
from fastratio.runlog import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"dijs": ["method.name=diffratio", "method.objective=dijs"], "vsd": ["method.name=vsd"]}


def evaluations(records: list[dict]) -> list[dict]:
    """Each evaluation of a run's metrics.jsonl: step, modes covered, mass TV, energy-distance multiple."""
    return [{"step": r["step"], "modes_covered": r["eval_modes_covered"], "mass_tv": r["eval_mass_tv"],
             "energy_distance_ratio": r["eval_energy_distance"] / r["eval_energy_distance_true"],
             "energy_distance_ratio_std": r.get("eval_energy_distance_std", 0.0) / r["eval_energy_distance_true"]}
            for r in records if "eval_energy_distance" in r]


def run_cell(mixture: str, method: str, seed: int, extra: list[str], work: Path) -> dict:
    out = work / f"{mixture}_{method}_seed{seed}"
    overrides = [f"data.mixture={mixture}", *METHODS[method], f"run.seed={seed}", f"run.out_dir={out}",
                 "run.progress=false", "run.plot_every=0", "run.kernels=torch", *extra]
    command = [sys.executable, "-m", "fastratio.train", str(ROOT / "configs" / "toy2d.yaml")]
    for override in overrides:
        command += ["--set", override]
    # One thread per run: two runs share the two cores without oversubscription.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    row = {"mixture": mixture, "method": method, "seed": seed, "overrides": extra, "wall_seconds": round(seconds, 1)}
    if done.returncode != 0:
        # A run the divergence guard stopped is a result, not a crash of the benchmark.
        lines = done.stderr.strip().splitlines() or ["no output"]
        return {**row, "failures": [f"run stopped (exit {done.returncode}): {lines[-1]}"]}
    return {**row, **final_row(read_jsonl(out / "metrics.jsonl"))}


def final_row(records: list[dict]) -> dict:
    """The final evaluation of a run's metrics.jsonl, its verdict and every evaluation."""
    final = records[-1]
    return {
        "step": final["step"],
        "modes_covered": final["eval_modes_covered"], "modes": final["eval_modes"],
        "mass_tv": final["eval_mass_tv"], "mass_tv_exact_sample": final["eval_mass_tv_true"],
        "energy_distance": final["eval_energy_distance"], "energy_distance_std": final.get("eval_energy_distance_std"),
        "energy_distance_exact_sample": final["eval_energy_distance_true"],
        "energy_distance_ratio": final["eval_energy_distance"] / final["eval_energy_distance_true"],
        "energy_distance_ratio_std": final.get("eval_energy_distance_std", 0.0) / final["eval_energy_distance_true"],
        "high_quality": final["eval_high_quality"],
        "failures": toy.criterion_failures(final),
        "evaluations": evaluations(records),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixtures", nargs="+", default=list(toy.FAMILY), choices=sorted(toy.MIXTURES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="override for every cell")
    parser.add_argument("--work", type=Path, help="where the runs go (default: a new temporary directory)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "toy_family_cpu.json")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="toy_family_"))
    cells = [(m, method, s) for s in args.seeds for m in args.mixtures for method in args.methods]
    # The commit the runs start from (the tree may move on while they run).
    meta = environment(torch.device("cpu"))
    print(f"{len(cells)} runs under {work}, {args.jobs} at a time")
    done: dict[int, dict] = {}

    def write() -> None:  # after every finished cell, in cell order: a kill keeps what finished
        write_result(args.out, [{**meta, **done[i]} for i in sorted(done)])

    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_cell, *cell, args.extra, work): i for i, cell in enumerate(cells)}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            write()
    rows = [done[i] for i in sorted(done)]
    print(f"{'mixture':>9} {'method':>6} {'seed':>4} {'modes':>6} {'mass TV':>8} {'ED x':>6} {'hq':>5} {'min':>5}  verdict")
    for r in rows:
        verdict = "pass" if not r["failures"] else "FAIL: " + "; ".join(r["failures"])
        if "step" not in r:
            print(f"{r['mixture']:>9} {r['method']:>6} {r['seed']:>4}  {verdict}")
            continue
        print(f"{r['mixture']:>9} {r['method']:>6} {r['seed']:>4} {r['modes_covered']:>3}/{r['modes']:<2} {r['mass_tv']:>8.3f} "
              f"{r['energy_distance_ratio']:>6.2f} {r['high_quality']:>5.2f} {r['wall_seconds'] / 60:>5.1f}  {verdict}")
    return 0 if all(not r["failures"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
