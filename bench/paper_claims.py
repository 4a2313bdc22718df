"""The papers' claims on real small images: one teacher, eight one-step methods, one table.

    python bench/paper_claims.py --data digits|mnist|fashion_mnist [--budget-minutes M] [--seeds S]

Stage 1 trains (or reuses) one teacher from ``configs/<data>_teacher.yaml`` on the train split. Stage 2
trains, from that teacher and with the same number of generator steps (the same images seen), each
method of METHODS with the hyper-parameters of ``configs/<data>.yaml`` (set once for all methods; a
method changes only what names it). Every model is then measured against the held-out test split:

  fid, kid          torch-fidelity's FID and KID (features of --feature-extractor; Inception offline
                    with --inception), n generated images vs the test split (or --test-n of it)
  energy_distance   pixel-space squared energy distance to the test split (exact, no features)
  class_entropy     entropy (nats; log 10 = 2.303 is uniform) of the classes a logistic regression,
  classes_covered   fitted on the train split's pixels, assigns; classes getting >= 20% of their share
  confidence        the classifier's mean top probability (low for ambiguous, blurry samples)

beside the same measures of n real train images (real_train: what a perfect generator scores at
this n), of the teacher's Heun sampler (teacher_heun: 18 steps, 35 evaluations) and of the generator
before its first step (generator_init). The DiJS runs are also measured
best-of-N (N = 2, 4, 8, 16): N candidates per image, the ratio net keeps the most real one.

``--budget-minutes`` fits the plan to a wall-clock budget on this machine: the teacher gets at most a
fifth of it, evaluation the time the measured feature rate needs, and the generator steps (equal for
all methods, at most the config's run.steps) are set from each method's measured step time. Without it
the configs' steps are used, so the same command runs unchanged on a GPU. Runs live under
``--out-dir/<data>``; a rerun reuses finished runs and resumes interrupted ones (the plan is kept in
plan.json). Results: ``bench/results/paper_claims_<data>.json`` (rows per method and seed), a figure
(sample grids per method, FID and KID vs N) and a claims summary printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
from fastratio import checkpoint, config
from fastratio.atomic import atomic_write
from fastratio.data.formats import load_dataset
from fastratio.device import resolve_device
from fastratio.errors import UserError, run_cli
from fastratio.fid import image_features
from fastratio.guard import TrainingDiverged
from fastratio.images import to_uint8
from fastratio.inception import INCEPTION
from fastratio.inference import load_model, load_verifier, sample
from fastratio.runinfo import environment, write_result
from fastratio.runlog import read_jsonl
from fastratio.toy import energy_distance
from fastratio.train import train

# name -> config overrides; every method starts from the same teacher and trains the same steps.
METHODS = {
    "dijs": ["method.name=diffratio", "method.objective=dijs"],
    "dikl": ["method.name=diffratio", "method.objective=dikl"],
    "dirm": ["method.name=diffratio", "method.objective=dirm"],
    # Di-Bregman with a teacher: the VSD score difference weighted by h''(r) r from the ratio net.
    "dibregman_sba5": ["method.name=dibregman", "method.objective=sba", "method.sba_lambda=5"],
    "dibregman_lr": ["method.name=dibregman", "method.objective=lr"],
    "vsd": ["method.name=vsd"],
    "dijs_random_init": ["method.name=diffratio", "method.objective=dijs", "model.generator_from_teacher=false"],
    "dijs_ratio_scratch": ["method.name=diffratio", "method.objective=dijs", "model.ratio_from_teacher=false"],
}
BEST_OF = (2, 4, 8, 16)

# --sweep-steps: before the comparison, each family's candidates train one seed for that many generator
# steps and the lowest FID's overrides are the family's configuration in the comparison (issue 30: a
# baseline gets a configuration that suits it). The grid is what the methods' own papers use: the
# weighting (none: the digits config; sigma^2: DiffRatio/Di-Bregman on CIFAR-10, VSD/ProlificDreamer;
# dmd: sigma^2 with DMD's per-sample normalisation, DMD/DMD2) times the smallest sigma (0.002: EDM's;
# 0.02: about DMD2's t >= 20 of 1000), at equal steps, batch and learning rate for every candidate.
_SIGMA_MIN = {"smin0.002": ["noise.sigma_min=0.002"], "smin0.02": ["noise.sigma_min=0.02"]}
_WEIGHTINGS = {w: [f"noise.weighting={w}"] for w in ("none", "sigma2", "dmd")}
SWEEP = {
    family: {f"w={w}_{s}": _WEIGHTINGS[w] + _SIGMA_MIN[s] for w in weightings for s in _SIGMA_MIN}
    for family, weightings in {"dijs": ("none", "sigma2"), "vsd": ("none", "sigma2", "dmd"),
                               "dibregman_sba5": ("none", "sigma2", "dmd")}.items()
}
# Methods that take another family's chosen configuration (the same objective, another start).
SWEEP_FROM = {"dijs_random_init": "dijs", "dijs_ratio_scratch": "dijs", "dikl": "dijs", "dirm": "dijs", "dibregman_lr": "dibregman_sba5"}

# data -> the config pair configs/<configs>{_teacher,}.yaml (their data.path is the train file, unless
# "train" replaces it), the held-out test images (kind, path), and how to get missing files.
DATASETS = {
    "digits": {"configs": "digits", "test": ("digits", "")},
    "fashion_mnist": {"configs": "fashion_mnist", "test": ("idx", "data/fashion-mnist/t10k-images-idx3-ubyte.gz"),
                      "how": "apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb out/, "
                             "then copy out/usr/share/datasets/fashion-mnist/*-ubyte.gz to data/fashion-mnist/"},
    "mnist": {"configs": "fashion_mnist", "train": "data/mnist/train-images-idx3-ubyte.gz",
              "test": ("idx", "data/mnist/t10k-images-idx3-ubyte.gz"),
              "how": "put MNIST's IDX files (train-images-idx3-ubyte.gz, t10k-images-idx3-ubyte.gz and the two label files) "
                     "in data/mnist/"},
}
_TEACHER_SHARE = 0.2  # at most this share of --budget-minutes trains the teacher


def _check_files(data: str, cfg: config.Config) -> None:
    spec = DATASETS[data]
    for path in ([cfg.data.path] if cfg.data.kind != "digits" else []) + ([spec["test"][1]] if spec["test"][1] else []):
        if not Path(path).is_file():
            raise UserError(f"--data {data}: {path} not found; {spec['how']}")


def _load_cfg(name: str, data: str, overrides: list[str]) -> config.Config:
    spec = DATASETS[data]
    extra = [f"data.path={spec['train']}"] if "train" in spec else []
    return config.load(ROOT / "configs" / f"{name}.yaml", extra + overrides)


def _derive(cfg: config.Config, overrides: list[str]) -> config.Config:
    return config.from_dict(config.apply_overrides(config.to_dict(cfg), overrides))


def _finished(run_dir: Path, steps: int) -> Path | None:
    path = checkpoint.checkpoint_path(run_dir, steps)
    return path if path.is_file() else None


def _train(cfg: config.Config) -> tuple[Path | None, str]:
    """(final checkpoint or None, '' or the divergence message): a finished run is reused, an
    interrupted one resumed; a diverged run is a result, not a crash."""
    run_dir = Path(cfg.run.out_dir)
    done = _finished(run_dir, cfg.run.steps)
    if done is None:
        try:
            train(cfg, resume="auto" if checkpoint.list_checkpoints(run_dir) else None)
        except TrainingDiverged as err:
            return None, str(err)
        done = _finished(run_dir, cfg.run.steps)
        if done is None:  # stopped by a signal: rerun the command to resume it, never a result
            raise UserError(f"{run_dir}: stopped before step {cfg.run.steps}; rerun to resume it")
    return done, ""


def _seconds_per_step(cfg: config.Config, work: Path) -> float:
    """Wall seconds of one step of this config, from a 6-step run (steps 4-6 timed by the loop)."""
    probe = _derive(cfg, [f"run.out_dir={work}", "run.steps=6", "run.log_every=3", "run.ckpt_every=6",
                          "run.eval_every=1000000", "run.plot_every=0"])
    if not _finished(work, 6):
        train(probe, resume="auto" if checkpoint.list_checkpoints(work) else None)
    return cfg.optim.batch_size / read_jsonl(work / "metrics.jsonl")[-1]["images_per_s"]


class Judge:
    """The measures of one image set against the test split; the test features are computed once."""

    def __init__(self, train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor, args, device):
        from sklearn.linear_model import LogisticRegression

        self.args, self.device = args, device
        self.test = test_images
        self.test_pixels = self._pixels(test_images)
        self.test_features = self._features(test_images)
        # A linear classifier on pixels: cheap, exact to reproduce, and enough to tell digit classes.
        take = torch.randperm(train_images.shape[0], generator=torch.Generator().manual_seed(0))[:10000]
        self.classifier = LogisticRegression(max_iter=300, C=0.1).fit(self._pixels(train_images[take]).numpy(), train_labels[take].numpy())

    @staticmethod
    def _pixels(images: torch.Tensor) -> torch.Tensor:
        return images.reshape(images.shape[0], -1).double() / 127.5 - 1

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return image_features(images, feature_extractor=self.args.feature_extractor, weights=self.args.inception,
                              batch=self.args.batch, device=self.device)

    def classifier_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float(self.classifier.score(self._pixels(images).numpy(), labels.numpy()))

    def measure(self, images: torch.Tensor) -> dict[str, float]:
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
        from torch_fidelity.metric_kid import kid_features_to_metric

        features = self._features(images)
        fid = fid_statistics_to_metric(fid_features_to_statistics(features), fid_features_to_statistics(self.test_features), False)
        n = min(features.shape[0], self.test_features.shape[0])
        kid = kid_features_to_metric(features, self.test_features, kid_subsets=100, kid_subset_size=n, verbose=False)
        probs = self.classifier.predict_proba(self._pixels(images).numpy())
        share = np.bincount(probs.argmax(1), minlength=probs.shape[1]) / probs.shape[0]
        return {
            "fid": float(fid["frechet_inception_distance"]),
            "kid": float(kid["kernel_inception_distance_mean"]),
            "kid_std": float(kid["kernel_inception_distance_std"]),
            "energy_distance": energy_distance(self._pixels(images), self.test_pixels),
            "class_entropy": float(-(share[share > 0] * np.log(share[share > 0])).sum()) + 0.0,  # not -0.0 for one class
            "classes_covered": int((share >= 0.2 / probs.shape[1]).sum()),
            "confidence": float(probs.max(1).mean()),
        }


def _row_name(row: dict) -> str:
    if row["method"] in ("real_train", "teacher_heun", "generator_init"):
        return row["method"]
    return f"{row['method']}-seed{row['seed']}" + (f"-best{row['best_of']}" if row["best_of"] > 1 else "")


class MeasureCache:
    """The measures of each image set, kept in ``path`` as they are made, so a rerun (or a run
    resumed after a kill) measures only what is missing; keyed by name under one signature."""

    def __init__(self, path: Path, signature: dict, judge: Judge):
        self.path, self.signature, self.judge = path, signature, judge
        stored = json.loads(path.read_text()) if path.is_file() else {}
        self.values = stored.get("values", {}) if stored.get("signature") == json.loads(json.dumps(signature)) else {}

    def measure(self, name: str, images: torch.Tensor) -> dict:
        if name not in self.values:
            self.values[name] = self.judge.measure(images)
            write_result(self.path, {"signature": self.signature, "values": self.values})
        return self.values[name]


def _previous_invocations(results: Path, plan: dict) -> list[dict]:
    if not results.is_file():
        return []
    old = json.loads(results.read_text())
    if old.get("plan") != json.loads(json.dumps(plan)):
        return []
    return old.get("invocations", [])


def _initial_generator(cfg: config.Config, device) -> torch.nn.Module:
    from fastratio.tasks import build_task

    return build_task(cfg, device).build_networks().generator.eval()


def _generate(model, n: int, seed: int, device, steps: int = 18, best_of: int = 1) -> torch.Tensor:
    """uint8 samples of a checkpoint (its EMA network) or of a module."""
    verifier = None
    if isinstance(model, Path):
        ckpt = model
        model, state = load_model(ckpt, device)
        verifier = load_verifier(state, ckpt, device) if best_of > 1 else None
    with torch.no_grad():
        chunks = [sample(model, min(256, n - i), seed * 1_000_003 + i, device, None, steps, verifier, best_of) for i in range(0, n, 256)]
    return to_uint8(torch.cat(chunks)).cpu()


def _plan(args, out: Path, teacher_cfg, stage2, judge_rate: float) -> dict:
    """Teacher and generator steps: the configs', or what fits --budget-minutes (kept in plan.json)."""
    path = out / "plan.json"
    if path.is_file():
        plan = json.loads(path.read_text())
        if plan.get("seeds") == args.seeds and plan.get("methods") == args.methods and plan.get("n") == args.n:
            return plan
    plan = {"seeds": args.seeds, "methods": args.methods, "n": args.n, "budget_minutes": args.budget_minutes,
            "teacher_steps": args.teacher_steps or teacher_cfg.run.steps, "steps": args.steps or stage2.run.steps}
    if args.budget_minutes and not (args.steps and args.teacher_steps):
        budget = args.budget_minutes * 60
        t_teacher = _seconds_per_step(teacher_cfg, out / "probe" / "teacher")
        if not args.teacher_steps:
            plan["teacher_steps"] = max(10, min(plan["teacher_steps"], int(_TEACHER_SHARE * budget / t_teacher) // 10 * 10))
        evals = args.seeds * len(args.methods) + 1 + (len(BEST_OF) if "dijs" in args.methods else 0)
        eval_seconds = evals * args.n / judge_rate
        # The probes run from a probe teacher: step times do not depend on the teacher's weights.
        probe_teacher = _finished(out / "probe" / "teacher", 6)
        per_step = {m: _seconds_per_step(_derive(stage2, METHODS[m] + [f"teacher.checkpoint={probe_teacher}"]),
                                         out / "probe" / m) for m in args.methods}
        left = budget - plan["teacher_steps"] * t_teacher - eval_seconds
        if not args.steps:
            plan["steps"] = max(10, min(plan["steps"], int(left / (args.seeds * sum(per_step.values()))) // 10 * 10))
        plan.update(seconds_per_step={"teacher": t_teacher, **per_step}, eval_seconds_estimate=eval_seconds)
    out.mkdir(parents=True, exist_ok=True)
    write_result(path, plan)
    return plan


def _summary(rows: list[dict]) -> dict[str, dict]:
    """method -> {metric: (mean, std over seeds)} of the one-step rows at N = 1, plus the references."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method and r.get("best_of", 1) == 1 and "fid" in r]
        if group:
            out[method] = {k: (statistics.mean(r[k] for r in group), statistics.stdev(r[k] for r in group) if len(group) > 1 else 0.0, len(group))
                           for k in ("fid", "kid", "energy_distance", "class_entropy", "classes_covered", "confidence")}
    return out


def markdown(rows: list[dict]) -> str:
    summary = _summary(rows)
    lines = ["| method | seeds | FID | KID x1e3 | energy distance | class entropy | classes | confidence |", "|---|---|---|---|---|---|---|---|"]
    def cell(m: dict, k: str, scale: float = 1.0, fmt: str = ".2f") -> str:
        mean, std, count = m[k]
        return f"{mean * scale:{fmt}} ± {std * scale:{fmt}}" if count > 1 else f"{mean * scale:{fmt}}"

    for method, m in summary.items():
        lines.append(f"| {method} | {m['fid'][2]} | {cell(m, 'fid')} | {cell(m, 'kid', 1e3)} | {cell(m, 'energy_distance', 1.0, '.4f')} | "
                     f"{cell(m, 'class_entropy', 1.0, '.3f')} | {cell(m, 'classes_covered', 1.0, '.1f')} | {cell(m, 'confidence', 1.0, '.3f')} |")
    diverged = [f"{r['method']} seed {r['seed']}" for r in rows if "diverged" in r]
    if diverged:
        lines.append(f"\nDiverged (no samples): {', '.join(diverged)}")
    return "\n".join(lines)


def _compare(summary: dict, a: str, b: str, key: str = "fid") -> tuple[str, str]:
    """(verdict, evidence) for "a has a lower mean `key` than b": "confirmed" or "reversed" when the
    means differ by more than the two seed standard deviations together, else "not confirmed" (within
    the spread, or one seed on both sides: no spread, so a difference is not a verdict). A reference
    measured once (the generator at step 0) has no spread of its own: the other side's decides."""
    if a not in summary or b not in summary:
        return "not measured", f"{a if a not in summary else b} has no samples (diverged or not run)"
    (ma, sa, na), (mb, sb, nb) = summary[a][key], summary[b][key]
    scale, label = (1e3, "KID x1e3") if key == "kid" else (1.0, key.upper())
    evidence = (f"{label} {a} {ma * scale:.2f} ± {sa * scale:.2f} vs {b} {mb * scale:.2f} ± {sb * scale:.2f} "
                f"({min(na, nb)} seed{'s' * (min(na, nb) > 1)})")
    if max(na, nb) < 2:
        return "not confirmed", f"{evidence}, no spread: {a if ma < mb else b} lower"
    if ma + sa < mb - sb:
        return "confirmed", evidence
    if ma - sa > mb + sb:
        return "reversed", evidence
    return "not confirmed", f"{evidence}, within the spread"


def _compare_both(summary: dict, a: str, b: str) -> tuple[str, str]:
    """FID and KID must agree for "confirmed" or "reversed"; where they do not, "not confirmed"."""
    (fid_v, fid_e), (kid_v, kid_e) = _compare(summary, a, b, "fid"), _compare(summary, a, b, "kid")
    if fid_v == kid_v == "not measured":
        return fid_v, fid_e
    kid_e = kid_e.replace(kid_e[kid_e.index(" ("):kid_e.index(")") + 1], "")  # the seed count is in the FID half
    verdict = fid_v if fid_v == kid_v else "not confirmed"
    mixed = "" if fid_v == kid_v else f" (FID: {fid_v}, KID: {kid_v})"
    return verdict, f"{fid_e}; {kid_e}{mixed}"


def claims(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The papers' claims judged mechanically from the rows: (claim, verdict, evidence)."""
    summary = _summary(rows)
    out = [("(1a) DiJS beats DiKL", *_compare_both(summary, "dijs", "dikl")),
           ("(1b) DiKL beats DiRM", *_compare_both(summary, "dikl", "dirm")),
           ("(2) ratio (DiJS) beats two scores (VSD)", *_compare_both(summary, "dijs", "vsd")),
           ("(3) teacher init beats random init", *_compare_both(summary, "dijs", "dijs_random_init")),
           ("(4) Di-Bregman SBA (lambda 5) beats reverse KL (VSD)", *_compare_both(summary, "dibregman_sba5", "vsd")),
           ("(extra) ratio net from the teacher's encoder beats from scratch", *_compare_both(summary, "dijs", "dijs_ratio_scratch")),
           ("(sanity) DiJS improves on its starting point (step 0)", *_compare_both(summary, "dijs", "generator_init"))]
    by_n = {r["best_of"]: r for r in rows if r["method"] == "dijs" and r["seed"] == 0 and "fid" in r}
    if 1 in by_n and max(by_n) > 1:
        one, best = by_n[1], by_n[max(by_n)]
        fids = ", ".join(f"N={n} {by_n[n]['fid']:.2f}" for n in sorted(by_n))
        # One seed: KID's spread over feature subsets is the yardstick.
        better = best["kid"] + best["kid_std"] < one["kid"] - one["kid_std"]
        worse = best["kid"] - best["kid_std"] > one["kid"] + one["kid_std"]
        verdict = "confirmed" if better else "reversed" if worse else "not confirmed"
        out.append(("(5) verifier: best-of-N improves the one-step model", verdict,
                    (f"FID {fids}; KID x1e3 N=1 {one['kid'] * 1e3:.2f} ± {one['kid_std'] * 1e3:.2f} vs N={max(by_n)} "
                     f"{best['kid'] * 1e3:.2f} ± {best['kid_std'] * 1e3:.2f} (seed 0)")))
    teacher = next((r for r in rows if r["method"] == "teacher_heun"), None)
    if teacher and "dijs" in summary:
        mean, std, _ = summary["dijs"]["fid"]
        verdict = "confirmed" if mean - std <= teacher["fid"] else "not confirmed"
        out.append(("(6) one step approaches the multi-step teacher", verdict,
                    (f"FID DiJS {mean:.2f} ± {std:.2f} vs teacher Heun {teacher['nfe']} NFE {teacher['fid']:.2f}; "
                     f"real train images {summary['real_train']['fid'][0]:.2f}")))
    return out


def sweep_markdown(sweep: dict) -> str:
    """Each family's candidates at --sweep-steps, seed 0, the chosen one in bold ('' without a sweep)."""
    if "from" in sweep:
        return "Configurations chosen by the sweep of " + sweep["from"] + ": " + ", ".join(f"{f} {c}" for f, c in sweep["chosen"].items())
    if not sweep.get("rows"):
        return ""
    lines = [f"| family | weighting, smallest sigma ({sweep['steps']} steps, seed 0) | FID | KID x1e3 | classes | class entropy |",
             "|---|---|---|---|---|---|"]
    for r in sweep["rows"]:
        mark = "**" if sweep["chosen"].get(r["sweep"]) == r["candidate"] else ""
        cells = (f"{r['fid']:.2f} | {r['kid'] * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f} | {r['classes_covered']} | {r['class_entropy'] + 0.0:.3f}"
                 if "fid" in r else "diverged | | |")
        lines.append(f"| {r['sweep']} | {mark}{r['candidate']}{mark} | {cells} |")
    return "\n".join(lines)


def report(result: dict) -> str:
    """The sweep, the comparison and the claims of a results file, as Markdown tables."""
    rows = result["rows"]
    return "\n\n".join(filter(None, [sweep_markdown(result.get("sweep", {})), markdown(rows), claims_markdown(rows)]))


def claims_markdown(rows: list[dict]) -> str:
    lines = ["| claim | found here | evidence |", "|---|---|---|"]
    lines += [f"| {c} | {v} | {e} |" for c, v, e in claims(rows)]
    return "\n".join(lines)


def figure(grids: dict[str, torch.Tensor], rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastratio.images import grid

    names = list(grids)
    cols = 5
    nrows = math.ceil((len(names) + 1) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.4 * cols, 2.6 * nrows), dpi=100)
    axes = axes.reshape(-1)
    for ax, name in zip(axes, names):
        canvas = grid(grids[name])
        ax.imshow(canvas[..., 0] if canvas.shape[-1] == 1 else canvas, cmap="gray", vmin=0, vmax=255)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    ax = axes[len(names)]
    curve = [r for r in rows if r["method"] == "dijs" and r["seed"] == 0 and "fid" in r]  # best-of-N ran on seed 0
    ns = sorted({r["best_of"] for r in curve})
    for key, style in (("fid", "o-"), ("kid", "s--")):
        means = [statistics.mean(r[key] for r in curve if r["best_of"] == n) for n in ns]
        base = means[0] if means and means[0] else 1.0
        ax.plot(ns, [m / base for m in means], style, label=f"{key.upper()} / N=1")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("candidates N (ratio-net verifier)", fontsize=7)
    ax.set_title("DiJS best-of-N (seed 0)", fontsize=8)
    ax.legend(fontsize=6)
    for ax in axes[len(names) + 1:]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def _run_method(stage2, name: str, overrides: list[str], teacher: Path, run_dir: Path, seed: int, steps: int):
    """Train one method run (reused when finished): (row, checkpoint or None)."""
    cfg = _derive(stage2, overrides + [f"teacher.checkpoint={teacher}", f"run.out_dir={run_dir}", f"run.seed={seed}",
                                       f"run.steps={steps}", f"run.ckpt_every={max(1, steps // 4)}"])
    t = time.time()
    ckpt, diverged = _train(cfg)
    row = {"method": name, "seed": seed, "best_of": 1, "steps": steps,
           "images_seen": steps * cfg.optim.batch_size, "train_seconds": round(time.time() - t, 1)}
    return ({**row, "diverged": diverged} if ckpt is None else row), ckpt


def _chosen_from(results: Path) -> dict[str, str]:
    """The {family: candidate} a sweep chose in another results file; a candidate this SWEEP lacks is refused."""
    try:
        chosen = json.loads(results.read_text())["sweep"]["chosen"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"--configurations-from {results}: no sweep's choice readable ({type(err).__name__}: {err})") from None
    if not isinstance(chosen, dict) or not chosen:
        raise UserError(f"--configurations-from {results}: its sweep chose nothing")
    for family, candidate in chosen.items():
        if not isinstance(candidate, str) or candidate not in SWEEP.get(family, {}):
            raise UserError(f"--configurations-from {results}: sweep.chosen.{family} = {candidate!r} is not a candidate here")
    return chosen


def sweep(args, out: Path, stage2, teacher: Path, cache: MeasureCache, device) -> tuple[dict, list[dict]]:
    """Each swept family's candidates at seed 0 and --sweep-steps: ({family: chosen candidate}, rows).
    The lowest FID is chosen (a diverged candidate never is)."""
    families = dict.fromkeys(SWEEP_FROM.get(m, m) for m in args.methods if SWEEP_FROM.get(m, m) in SWEEP)
    chosen, rows = {}, []
    for family in families:
        for candidate, overrides in SWEEP[family].items():
            name = f"{family}[{candidate}]"
            row, ckpt = _run_method(stage2, name, METHODS[family] + overrides, teacher, out / "sweep" / name, 0, args.sweep_steps)
            row.update(n=args.n, sweep=family, candidate=candidate)
            if ckpt is not None:
                row.update(cache.measure(f"sweep-{name}", _generate(ckpt, args.n, 1000, device)))
            rows.append(row)
            print(f"sweep {name}: " + (f"FID {row['fid']:.2f}, KID {row['kid']:.4f}" if "fid" in row else f"diverged ({row['diverged']})"))
        done = [r for r in rows if r["sweep"] == family and "fid" in r]
        if done:
            chosen[family] = min(done, key=lambda r: r["fid"])["candidate"]
    return chosen, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(DATASETS), default="digits")
    parser.add_argument("--budget-minutes", type=float, default=0.0, help="fit teacher, generator steps and evaluation to this wall time")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--n", type=int, default=200, help="generated images per measurement")
    parser.add_argument("--test-n", type=int, default=0, help="compare with a fixed random subset of this many test images (0: all)")
    parser.add_argument("--steps", type=int, default=0, help="generator steps per run (default: the config's, or what fits the budget)")
    parser.add_argument("--sweep-steps", type=int, default=0,
                        help="first train each family's candidate configurations (SWEEP) this many steps at seed 0, "
                             "and compare each method at its family's best (0: the config as it is)")
    parser.add_argument("--configurations-from", type=Path, metavar="RESULTS",
                        help="instead of sweeping here, take each family's configuration from the sweep of this "
                             "results file (e.g. bench/results/paper_claims_digits.json)")
    parser.add_argument("--teacher-steps", type=int, default=0, help="teacher steps (default: the config's, or a fifth of the budget)")
    parser.add_argument("--inception", default=str(ROOT / "data" / "inception.pth"),
                        help="torch-fidelity Inception weights (python -m fastratio.tools.convert_inception; see ../shared/DATA.md)")
    parser.add_argument("--feature-extractor", default=INCEPTION)
    parser.add_argument("--batch", type=int, default=64, help="feature-extractor batch")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "paper_claims")
    parser.add_argument("--results", type=Path, help="default bench/results/paper_claims_<data>.json")
    parser.add_argument("--figure", type=Path, help="default docs/paper-claims.png (digits), docs/paper-claims-<data>.png")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override both configs (e.g. run.device=cuda)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--report", action="store_true", help="print the tables of the existing results file and stop")
    args = parser.parse_args(argv)
    results = args.results or ROOT / "bench" / "results" / f"paper_claims_{args.data}.json"
    if args.report:
        if not results.is_file():
            raise UserError(f"--report: {results} not found; run without --report first")
        print(report(json.loads(results.read_text())))
        return 0
    if args.seeds < 1 or args.n < 2 or args.budget_minutes < 0:
        raise UserError(f"--seeds >= 1, --n >= 2 and --budget-minutes >= 0 (got {args.seeds}, {args.n}, {args.budget_minutes})")
    if args.feature_extractor != INCEPTION:
        args.inception = None
    started = time.time()
    device = resolve_device(args.device)
    out = args.out_dir / args.data
    common = ["run.progress=false", "run.plot_every=0", "run.eval_every=1000000", f"run.device={args.device}", *args.set]
    teacher_cfg = _load_cfg(f"{DATASETS[args.data]['configs']}_teacher", args.data, common)
    stage2 = _load_cfg(DATASETS[args.data]["configs"], args.data, common)
    _check_files(args.data, stage2)

    train_set = load_dataset(stage2.data.kind, stage2.data.path, "train")
    test_kind, test_path = DATASETS[args.data]["test"]
    test_set = load_dataset(test_kind, test_path or stage2.data.path, "test")
    if args.test_n and test_set.images.shape[0] > args.test_n:  # a fixed random subset, the same for every row
        keep = torch.randperm(test_set.images.shape[0], generator=torch.Generator().manual_seed(0))[: args.test_n]
        test_set.images, test_set.labels = test_set.images[keep], test_set.labels[keep]
    t = time.time()
    judge = Judge(train_set.images, train_set.labels, test_set.images, args, device)
    judge_rate = test_set.images.shape[0] / (time.time() - t)
    plan = _plan(args, out, teacher_cfg, stage2, judge_rate)
    print(f"plan: teacher {plan['teacher_steps']} steps, {plan['steps']} generator steps x {len(args.methods)} methods x {args.seeds} seeds")

    teacher_cfg = _derive(teacher_cfg, [f"run.out_dir={out / 'teacher'}", f"run.steps={plan['teacher_steps']}",
                                        f"run.ckpt_every={max(1, plan['teacher_steps'] // 4)}"])
    teacher, _ = _train(teacher_cfg)
    cache = MeasureCache(out / "measures.json", {"plan": plan, "n": args.n, "test_n": args.test_n, "features": args.feature_extractor},
                         judge)
    real = train_set.images[torch.randperm(train_set.images.shape[0], generator=torch.Generator().manual_seed(0))[: args.n]]
    rows = [{"method": "real_train", "seed": 0, "best_of": 1, "n": args.n, **cache.measure("real_train", real)}]
    heun = _generate(teacher, args.n, 0, device, steps=teacher_cfg.teacher.sample_steps)
    rows.append({"method": "teacher_heun", "seed": 0, "best_of": 1, "n": args.n, "nfe": 2 * teacher_cfg.teacher.sample_steps - 1,
                 **cache.measure("teacher_heun", heun)})
    # Where every teacher-initialised method starts: g(z) = D(sigma_init z; sigma_init), no step taken.
    init = _initial_generator(_derive(stage2, [f"teacher.checkpoint={teacher}"]), device)
    start = _generate(init, args.n, 1000, device)
    rows.append({"method": "generator_init", "seed": 0, "best_of": 1, "n": args.n, "steps": 0, **cache.measure("generator_init", start)})
    grids = {"real (train)": train_set.images[:64], f"teacher, {rows[1]['nfe']} NFE": heun[:64], "generator at step 0": start[:64]}
    if args.configurations_from:
        chosen, sweep_rows = _chosen_from(args.configurations_from), []
    else:
        chosen, sweep_rows = sweep(args, out, stage2, teacher, cache, device) if args.sweep_steps else ({}, [])
    configured = {m: METHODS[m] + SWEEP[SWEEP_FROM.get(m, m)].get(chosen.get(SWEEP_FROM.get(m, m)), []) for m in args.methods}

    previous = _previous_invocations(results, plan)

    def write_results() -> dict:  # after every run, so that a kill or a partial campaign keeps what finished
        result = {
            "data": args.data, "argv": sys.argv[1:] if argv is None else argv, "environment": environment(device), "plan": plan, "n": args.n,
            "test_n": args.test_n, "test_images": int(test_set.images.shape[0]), "feature_extractor": args.feature_extractor,
            "classifier_test_accuracy": judge.classifier_accuracy(test_set.images, test_set.labels),
            "configs": {"teacher": config.to_dict(teacher_cfg), "stage2": config.to_dict(stage2)}, "methods": configured,
            "sweep": {"steps": args.sweep_steps, "chosen": chosen, "candidates": {f: SWEEP[f] for f in chosen}, "rows": sweep_rows,
                      **({"from": str(args.configurations_from)} if args.configurations_from else {})},
            # Every invocation on this plan, oldest first (a rerun reuses runs and measures: minutes, not an hour).
            "invocations": previous + [{"finished": time.strftime("%Y-%m-%d %H:%M"),
                                         "wall_minutes": round((time.time() - started) / 60, 1)}],
            "rows": rows,
            "claims": [{"claim": c, "verdict": v, "evidence": e} for c, v, e in claims(rows)],
        }
        write_result(results, result)
        return result

    for seed in range(args.seeds):
        for method in args.methods:
            # A chosen configuration gets its own run folder: a rerun never reuses a run trained otherwise.
            tag = chosen.get(SWEEP_FROM.get(method, method))
            row, ckpt = _run_method(stage2, method, configured[method], teacher,
                                    out / (f"{method}[{tag}]-seed{seed}" if tag else f"{method}-seed{seed}"), seed, plan["steps"])
            row["n"] = args.n
            if ckpt is None:
                rows.append(row)
                print(f"{method} seed {seed}: diverged ({row['diverged']})")
                write_results()
                continue
            images = _generate(ckpt, args.n, 1000 + seed, device)
            rows.append({**row, **cache.measure(_row_name(row) + (f"[{tag}]" if tag else ""), images)})
            print(f"{method} seed {seed}: FID {rows[-1]['fid']:.2f}, KID {rows[-1]['kid']:.4f}, ED {rows[-1]['energy_distance']:.4f}")
            if seed == 0:
                grids[method] = images[:64]
            if method == "dijs" and seed == 0:
                for n_cand in BEST_OF:
                    chosen_images = _generate(ckpt, args.n, 1000 + seed, device, best_of=n_cand)
                    name = _row_name({**row, "best_of": n_cand}) + (f"[{tag}]" if tag else "")
                    rows.append({**row, "best_of": n_cand, **cache.measure(name, chosen_images)})
                    print(f"  best of {n_cand}: FID {rows[-1]['fid']:.2f}, KID {rows[-1]['kid']:.4f}")
            write_results()
    result = write_results()
    figure(grids, rows, args.figure or ROOT / "docs" / ("paper-claims.png" if args.data == "digits" else f"paper-claims-{args.data}.png"))
    print(report(result))
    print(f"wrote {results} ({result['invocations'][-1]['wall_minutes']} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
