"""Why best-of-N helps or hurts: the trained ratio net as a verifier, taken apart on real small images.

    python bench/verifier_study.py CKPT --data digits [--n 200] [--refit-steps 400] [--out bench/results/verifier_digits.json]

CKPT is a DiffRatio stage-2 checkpoint of bench/paper_claims.py (its longest DiJS run). Four nets
score candidates: the ratio net's EMA (what fastratio.sample uses), the live ratio net, and "refit":
the live net trained --refit-steps more classifier steps against the frozen final generator (the
run's batch, noise law and learning rate), so that it estimates log p/q of the generator that is
actually sampled, not of one it chased during training.

  calibration   per noise level s, the logit l(x + s eps, s) on the held-out test images and on as
                many fresh generated ones: mean logits, the AUC of real against generated, and
                Spearman's correlation between a generated image's realness and how clearly the
                pixel classifier reads it as a digit (its top probability)
  best-of-N     FID, KID and class coverage (paper_claims.Judge, against the test split) of the image
                kept out of the first N = 2, 4, 8, 16 of 16 candidates per output, for each net at
                the verifier's default noise levels, kept two ways: "max", the most real
                (fastratio.verifier.best_of_n), and "resample", one drawn with probability
                proportional to exp(realness), i.e. sampling-importance-resampling with the
                estimated p/q as the weight; and for the EMA at each single level, "max" at N = 16
  picks         the class shares kept at N = 16 by each rule, against N = 1

All scorers see the same candidates (one seed), so a difference between rows is the scoring's alone.
Results: one JSON, written as rows are made.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_claims import DATASETS, ROOT, Judge

from fastratio import config
from fastratio.data.formats import load_dataset
from fastratio.device import resolve_device
from fastratio.draws import Draws
from fastratio.errors import UserError, run_cli
from fastratio.images import to_uint8
from fastratio.inception import INCEPTION
from fastratio.inference import denoiser_of, latent_sampler, load_model, load_verifier
from fastratio.networks.image import RatioUNet
from fastratio.noise import add_noise, sample_sigma
from fastratio.objectives import ratio_classifier_loss
from fastratio.runinfo import environment, write_result
from fastratio.verifier import DEFAULT_SIGMAS, realness

SIGMA_GRID = (0.02, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0)
BEST_OF = (2, 4, 8, 16)


def live_ratio(state: dict, path: Path, device) -> RatioUNet:
    """The ratio net as it was last trained (the checkpoint's nets.ratio), beside the verifier's EMA."""
    try:
        ratio = RatioUNet(**state["ratio_kwargs"])
        ratio.load_state_dict(state["nets"]["ratio"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: no live ratio net ({str(err).splitlines()[0][:120]})") from None
    return ratio.to(device).eval()


def refit(ratio: RatioUNet, generate, real: torch.Tensor, cfg: config.Config, steps: int, device) -> tuple[RatioUNet, list[float]]:
    """A copy of ``ratio`` trained ``steps`` classifier steps (real y=1, generated y=0, each noised at
    its own sigma of the run's law) against the frozen generator; (net, loss every 50 steps)."""
    net = copy.deepcopy(ratio).train().requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.optim.ratio_lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    draws = Draws(torch.Generator(device).manual_seed(12345))
    batch, losses = cfg.optim.batch_size, []
    for step in range(steps):
        x_real = real[torch.randint(real.shape[0], (batch,), generator=draws.generator, device=device)]
        with torch.no_grad():
            x_fake = generate(batch, draws.generator)
        x = torch.cat([x_real, x_fake])
        sigma = sample_sigma(cfg.noise, 2 * batch, draws, device)
        logit = net(add_noise(x, sigma, draws.randn(tuple(x.shape), device), cfg.noise.schedule), sigma, None).float()
        loss_real, loss_fake = ratio_classifier_loss(logit[:batch], logit[batch:])
        loss = 0.5 * (loss_real.mean() + loss_fake.mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 49:
            losses.append(round(loss.item(), 4))
    return net.eval().requires_grad_(False), losses


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a real image's score > a generated one's), ties counted half (Mann-Whitney)."""
    diff = pos.double()[:, None] - neg.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.argsort().argsort().astype(float), b.argsort().argsort().astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def scores(net: RatioUNet, x: torch.Tensor, sigmas) -> torch.Tensor:
    """fastratio's realness of images in [-1, 1], in chunks."""
    return torch.cat([realness(net, chunk, sigmas, None, net.schedule) for chunk in x.split(1024)]).cpu()


def calibration(nets: dict, real: torch.Tensor, fake: torch.Tensor, confidence: np.ndarray) -> list[dict]:
    rows = []
    for name, net in nets.items():
        for sigmas in [(s,) for s in SIGMA_GRID] + [DEFAULT_SIGMAS]:
            s_real, s_fake = scores(net, real, sigmas), scores(net, fake, sigmas)
            rows.append({"net": name, "sigma": sigmas[0] if len(sigmas) == 1 else "default", "logit_real": float(s_real.mean()),
                         "logit_fake": float(s_fake.mean()), "auc": auc(s_real, s_fake),
                         "spearman_realness_confidence": spearman(s_fake.numpy(), confidence)})
    return rows


def select(score: torch.Tensor, n_cand: int, rule: str, seed: int) -> torch.Tensor:
    """Index of the kept candidate per output among the first n_cand of each row of ``score`` [n, 16]."""
    s = score[:, :n_cand].double()
    if rule == "max":
        return s.argmax(dim=1)
    return torch.multinomial(torch.softmax(s, dim=1), 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", choices=sorted(DATASETS), default="digits")
    parser.add_argument("--n", type=int, default=200, help="kept images per measurement")
    parser.add_argument("--seed", type=int, default=1000, help="the candidates' noise stream (paper_claims: 1000 + seed)")
    parser.add_argument("--refit-steps", type=int, default=400)
    parser.add_argument("--inception", default=str(ROOT / "data" / "inception.pth"))
    parser.add_argument("--feature-extractor", default=INCEPTION)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, help="default bench/results/verifier_<data>.json")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        raise UserError(f"{args.checkpoint}: not found")
    if args.n < 2 or args.refit_steps < 0:
        raise UserError(f"--n >= 2 and --refit-steps >= 0 (got {args.n}, {args.refit_steps})")
    if args.feature_extractor != INCEPTION:
        args.inception = None
    out = args.out or ROOT / "bench" / "results" / f"verifier_{args.data}.json"
    started = time.time()
    device = resolve_device(args.device)
    model, state = load_model(args.checkpoint, device)
    cfg = config.from_dict(state["config"])
    train_set = load_dataset(cfg.data.kind, cfg.data.path, "train")
    test_kind, test_path = DATASETS[args.data]["test"]
    test_set = load_dataset(test_kind, test_path or cfg.data.path, "test")
    judge = Judge(train_set.images, train_set.labels, test_set.images, args, device)
    sample_latent = latent_sampler(denoiser_of(model), device, None)

    def generate(k: int, rng: torch.Generator) -> torch.Tensor:  # images in [-1, 1]
        with torch.no_grad():
            return torch.cat([model(*sample_latent(min(1024, k - i), rng)).clamp(-1, 1) for i in range(0, k, 1024)])

    def pixels(images: torch.Tensor) -> torch.Tensor:
        return images.to(device).float() / 127.5 - 1

    nets = {"ema": load_verifier(state, args.checkpoint, device), "live": live_ratio(state, args.checkpoint, device)}
    t = time.time()
    nets["refit"], refit_losses = refit(nets["live"], generate, pixels(train_set.images), cfg, args.refit_steps, device)
    result = {"checkpoint": str(args.checkpoint), "step": state.get("step"), "data": args.data, "n": args.n, "seed": args.seed,
              "test_images": int(test_set.images.shape[0]), "refit": {"steps": args.refit_steps, "batch": cfg.optim.batch_size,
              "lr": cfg.optim.ratio_lr, "loss_every_50": refit_losses, "seconds": round(time.time() - t, 1)},
              "environment": environment(device), "argv": sys.argv[1:] if argv is None else argv}
    print(f"refit: {args.refit_steps} steps, classifier loss every 50: {refit_losses}")

    fake = to_uint8(generate(test_set.images.shape[0], torch.Generator(device).manual_seed(args.seed + 1))).cpu()
    confidence = judge.classifier.predict_proba(judge._pixels(fake).numpy()).max(1)
    result["calibration"] = calibration(nets, pixels(test_set.images), pixels(fake), confidence)
    for row in result["calibration"]:
        print(f"calibration {row['net']} sigma {row['sigma']}: AUC {row['auc']:.3f}, logit real {row['logit_real']:.3f} "
              f"fake {row['logit_fake']:.3f}, spearman(realness, confidence) {row['spearman_realness_confidence']:.3f}")
    write_result(out, result)

    n_max = BEST_OF[-1]
    candidates = generate(args.n * n_max, torch.Generator(device).manual_seed(args.seed))  # output j: rows j*16 .. j*16+15
    kept_pixels = to_uint8(candidates).cpu().reshape(args.n, n_max, *candidates.shape[1:])
    # (net, noise levels, rules, N): every net at the default levels both ways; the EMA at each single
    # level kept the verifier's way, at the largest N only (each row is one FID: minutes on a CPU).
    scorers = {f"{name}@default": (net, DEFAULT_SIGMAS, ("max", "resample"), BEST_OF) for name, net in nets.items()}
    scorers.update({f"ema@{s}": (nets["ema"], (s,), ("max",), BEST_OF[-1:]) for s in SIGMA_GRID})
    result["best_of"] = [{"scorer": "none", "rule": "none", "best_of": 1, **judge.measure(kept_pixels[:, 0])}]
    result["picks"] = {"best_of_1": _shares(judge, kept_pixels[:, 0])}
    for name, (net, sigmas, rules, ns) in scorers.items():
        score = scores(net, candidates, sigmas).reshape(args.n, n_max)
        for rule in rules:
            for n_cand in ns:
                index = select(score, n_cand, rule, args.seed)
                images = kept_pixels[torch.arange(args.n), index]
                result["best_of"].append({"scorer": name, "rule": rule, "best_of": n_cand, **judge.measure(images)})
                row = result["best_of"][-1]
                print(f"{name} {rule} best of {n_cand}: FID {row['fid']:.2f}, KID {row['kid'] * 1e3:.2f}e-3 ± {row['kid_std'] * 1e3:.2f}, "
                      f"classes {row['classes_covered']}, entropy {row['class_entropy']:.3f}")
                if name.endswith("@default") and n_cand == n_max:
                    result["picks"][f"{name} {rule} best_of_{n_cand}"] = _shares(judge, images)
            result["wall_minutes"] = round((time.time() - started) / 60, 1)
            write_result(out, result)
    print(f"wrote {out} ({result['wall_minutes']} min)")
    return 0


def _shares(judge: Judge, images: torch.Tensor) -> list[float]:
    """The share of each class the pixel classifier assigns."""
    probs = judge.classifier.predict_proba(judge._pixels(images).numpy())
    return (np.bincount(probs.argmax(1), minlength=probs.shape[1]) / probs.shape[0]).round(3).tolist()


if __name__ == "__main__":
    sys.exit(run_cli(main))
