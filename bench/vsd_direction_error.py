"""Where a toy VSD run's generator direction goes wrong: the teacher's error against the fake score's, by sigma.

    python bench/vsd_direction_error.py RUN_DIR [RUN_DIR ...] [--step N] [--samples 100000] [--out FILE]

For a toy VSD run (``method.name=vsd``, VE schedule) and one of its checkpoints (default: the
latest), at x_t = g(z) + sigma eps with g the live generator (the one VSD's step differentiates):
the true direction sigma^2 (s_q - s_p) (q the generator's noised law, p the mixture's; w = sigma^2),
VSD's sigma^2 (s_fake - s_teacher), and its two error terms, the teacher's sigma^2 (s_teacher - s_p)
and the fake score's sigma^2 (s_fake - s_q). s_p is closed-form; s_q is ``toy.empirical_score`` of
``--samples`` generator draws. Root-mean-square norms over 2,000 points per sigma and the cosine
between VSD's and the true direction; JSON rows with versions and commit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fastratio import checkpoint, config, toy
from fastratio.errors import UserError, run_cli
from fastratio.runinfo import environment, write_result
from fastratio.tasks.toy2d import Toy2DTask

SIGMAS = (0.01, 0.02, 0.05, 0.1, 0.3, 1.0, 3.0)
POINTS = 2000


def _rms(v: torch.Tensor) -> float:
    return float(v.square().sum(1).mean().sqrt())


@torch.no_grad()
def direction_errors(run_dir: Path, step: int | None, samples: int, seed: int = 0) -> list[dict]:
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = config.load(run_dir / "config.yaml")
    if cfg.data.kind != "toy2d" or cfg.method.name != "vsd" or cfg.noise.schedule != "ve":
        raise UserError(f"{run_dir}: a toy VSD run with the ve schedule, got {cfg.data.kind}, {cfg.method.name}, {cfg.noise.schedule}")
    found = (run_dir / f"ckpt-{step:09d}.pt", None) if step is not None else checkpoint.load_latest(run_dir)
    if found is None:
        raise UserError(f"{run_dir}: no checkpoint")
    state = checkpoint.load_or_fail(found[0], "checkpoint")
    task = Toy2DTask(cfg, torch.device("cpu"))
    nets = task.build_networks()
    for name in ("generator", "teacher", "fake_score"):
        getattr(nets, name).load_state_dict(state["nets"][name])
    run = {"run": run_dir.name, "mixture": cfg.data.mixture, "seed": cfg.run.seed, "teacher_steps": cfg.method.teacher_steps,
           "exact_teacher": cfg.model.exact_teacher, "samples": samples}
    g = torch.Generator().manual_seed(seed)
    draws = nets.generator(task.sample_latent(samples, g)[0]).double()
    x0 = nets.generator(task.sample_latent(POINTS, g)[0]).double()
    rows = []
    for s in SIGMAS:
        x_t = x0 + s * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        sigma = torch.full((POINTS,), s, dtype=torch.float64)
        s_fake, s_teacher = (getattr(nets, n)(x_t.float(), sigma.float()).double() for n in ("fake_score", "teacher"))
        s_q, s_p = toy.empirical_score(x_t, draws, s), task.mixture.score(x_t, sigma)
        true, vsd = s * s * (s_q - s_p), s * s * (s_fake - s_teacher)
        rows.append({**run, "step": state["step"], "sigma": s, "true_norm": _rms(true), "vsd_error": _rms(vsd - true),
                     "teacher_error": _rms(s * s * (s_teacher - s_p)), "fake_error": _rms(s * s * (s_fake - s_q)),
                     "cosine": float((true * vsd).sum() / (true.norm() * vsd.norm()))})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--step", type=int)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    table = []
    for run_dir in args.run_dirs:
        rows = direction_errors(run_dir, args.step, args.samples)
        print(f"{run_dir} at step {rows[0]['step']} (sigma^2-weighted, RMS over {POINTS} points)")
        print(f"{'sigma':>6} {'|true|':>8} {'|vsd-true|':>10} {'teacher':>8} {'fake':>8} {'cosine':>7}")
        for r in rows:
            print(f"{r['sigma']:>6} {r['true_norm']:>8.4f} {r['vsd_error']:>10.4f} {r['teacher_error']:>8.4f} {r['fake_error']:>8.4f} {r['cosine']:>7.3f}")
        table += rows
    if args.out is not None:
        meta = environment(torch.device("cpu"))
        write_result(args.out, [{**meta, **r} for r in table])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
