"""Ratio network as verifier on the toy suite: best-of-N with a learned ratio moves samples toward
the data (energy distance down vs N = 1), and the exact log-ratio (oracle) does at least as well."""

import torch

from fastratio import toy
from fastratio.config import from_dict
from fastratio.draws import Draws
from fastratio.ema import EMA
from fastratio.estimators import shifted_ring
from fastratio.networks.mlp import MLPRatio
from fastratio.optim import make_adam
from fastratio.step import Networks, TrainStep
from fastratio.verifier import best_of_n, realness, selection_gumbel


def test_best_of_n_reduces_energy_distance_and_the_oracle_does_at_least_as_well():
    torch.manual_seed(0)
    p, q = toy.ring8(), shifted_ring()
    p32 = p.to("cpu", torch.float32)
    generator = toy.MixtureGenerator(q.to("cpu", torch.float32))
    q32 = generator.mixture()
    cfg = from_dict({"run": {"kernels": "torch"}, "optim": {"beta1": 0.9, "lr_schedule": "constant"},
                     "noise": {"sigma_dist": "loguniform", "sigma_min": 0.05, "sigma_max": 1.0}})
    ratio = MLPRatio(2, 64, 3, 1.0, "ve")
    rng = torch.Generator().manual_seed(0)
    step = TrainStep(cfg, Networks(generator, ratio=ratio), {"ratio": make_adam(ratio.parameters(), 5e-4, cfg)}, Draws(rng))
    # The verifier reads the ratio net's EMA, as the trainer saves it: the live classifier's logits
    # swing from step to step and best-of-N amplifies their outliers (a live net scores 0.05-0.09 here).
    averaged = EMA(ratio)
    for _ in range(500):
        with torch.no_grad():
            x_real, x_fake = p32.sample(256, rng), q32.sample(256, rng)
        step.ratio_update(x_real, x_fake)
        averaged.update(ratio, 0.99)

    def sample_latent(k, g):
        return torch.stack([torch.multinomial(generator.weights, k, replacement=True, generator=g).float(), torch.zeros(k)], 1), None

    def gen(z, labels):
        component = z[:, 0].long()
        return generator(component, torch.randn(z.shape[0], 2, generator=gen_rng))

    def learned(x, labels):
        return realness(lambda xt, s, lab: averaged.module(xt, s), x)

    def oracle(x, labels):
        return realness(lambda xt, s, lab: toy.exact_log_ratio(xt.double(), s.double(), q, p).float(), x)

    reference = p32.sample(2000, torch.Generator().manual_seed(9))
    distances = {}
    for name, score, n, rule in (("n1", learned, 1, "max"), ("learned", learned, 8, "max"), ("oracle", oracle, 8, "max"),
                                 ("learned_resample", learned, 8, "resample"), ("oracle_resample", oracle, 8, "resample")):
        gen_rng = torch.Generator().manual_seed(1)
        gumbel = selection_gumbel([3], 2000 * n) if rule == "resample" else None
        x, _, _ = best_of_n(gen, sample_latent, score, 2000, n, torch.Generator().manual_seed(2), chunk=4096, gumbel=gumbel)
        distances[name] = toy.energy_distance(x, reference)
    assert distances["learned"] < 0.7 * distances["n1"], distances
    assert distances["oracle"] <= distances["learned"] * 1.05, distances
    # Resampling in proportion to the exact p/q moves q toward p as well.
    assert distances["oracle_resample"] < 0.7 * distances["n1"], distances
    assert distances["learned_resample"] < distances["n1"], distances


def test_best_of_n_keeps_the_top_scored_candidate_and_the_group_class():
    def sample_latent(k, g):
        return torch.arange(k, dtype=torch.float32)[:, None], torch.nn.functional.one_hot(torch.arange(k) % 3, 3).float()

    def gen(z, labels):
        return z * 10 + labels.argmax(1, keepdim=True)

    def score(x, labels):  # prefers the candidate whose value mod 40 is largest
        return (x[:, 0] % 40)

    x, labels, scores = best_of_n(gen, sample_latent, score, n_out=3, n_candidates=4, rng=torch.Generator(), chunk=5)
    # group g holds z = 4g..4g+3 with the class of z = 4g: x = 10 z + class
    classes = [(4 * g) % 3 for g in range(3)]
    want = [max((10 * z + classes[g] for z in range(4 * g, 4 * g + 4)), key=lambda v: v % 40) for g in range(3)]
    assert x[:, 0].tolist() == want and labels.argmax(1).tolist() == classes
    assert scores.tolist() == [w % 40 for w in want]


def test_resampling_keeps_a_candidate_in_proportion_to_exp_score_from_each_seeds_own_stream():
    def sample_latent(k, g):
        return torch.arange(k, dtype=torch.float32)[:, None], None

    def score(x, labels):  # candidate 1 of each pair is three times as likely as candidate 0
        return torch.where(x[:, 0] % 2 == 1, torch.log(torch.tensor(3.0)), torch.tensor(0.0))

    seeds = range(20000)
    gumbel = selection_gumbel(seeds, 2)
    x, _, scores = best_of_n(lambda z, labels: z, sample_latent, score, len(seeds), 2, torch.Generator(), chunk=4096, gumbel=gumbel)
    share = float((x[:, 0] % 2 == 1).double().mean())
    assert abs(share - 0.75) < 0.01, share  # 3 standard errors at n = 20000
    assert torch.equal(scores, score(x, None))  # the kept candidate's own score, not the pair's maximum
    # Seed s's noise is its own: the same whatever seeds surround it, and apart from its noise stream.
    assert torch.equal(selection_gumbel([5, 6], 2)[2:], selection_gumbel([6], 2))
    assert not torch.equal(selection_gumbel([6], 2), selection_gumbel([7], 2))
