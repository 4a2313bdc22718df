"""Bias of the learned generator gradient on the toy suite: ratio network vs two-score VSD.

    python bench/gradient_bias.py [--seeds 0 1 2] [--steps 2000] [--out bench/results/gradient_bias_cpu.json]

For each seed, fits both estimators against the same fixed mixture generator (equal auxiliary
parameter budget, same steps and batch) and reports cosines to the exact DiKL gradient
(``fastratio.estimators.gradient_bias``). Prints a table and writes JSON rows with versions and commit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastratio.estimators import gradient_bias
from fastratio.runinfo import environment, write_result

KEYS = ("ratio_theta_cosine", "vsd_theta_cosine", "ratio_x_cosine", "vsd_x_cosine")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gradient_bias_cpu.json"))
    args = parser.parse_args()
    meta = environment(torch.device("cpu"))
    rows = []
    print(f"{'seed':>4} " + " ".join(f"{k:>19}" for k in KEYS))
    for seed in args.seeds:
        report = gradient_bias(train_steps=args.steps, seed=seed)
        rows.append({**meta, "seed": seed, **report})
        print(f"{seed:>4} " + " ".join(f"{report[k]:>19.3f}" for k in KEYS))
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in KEYS}
    print("mean " + " ".join(f"{mean[k]:>19.3f}" for k in KEYS))
    write_result(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
