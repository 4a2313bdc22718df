"""2-D Gaussian-mixture task: exact data sampling, MLP networks, energy distance and mode coverage.

The mixture is standardised (``toy.standardized``), as images are scaled to [-1, 1]: one sigma range
and one sigma_data then serve mixtures of any spread. As on images, the teacher is fitted first
(stage 1, ``fastratio.train.pretrain_teacher``) and the generator and the ratio net start from it
unless ``model.generator_from_teacher`` / ``model.ratio_from_teacher`` say otherwise."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from .. import toy
from ..atomic import atomic_write
from ..config import Config
from ..networks.from_denoiser import DenoiserScore, OneStepGenerator
from ..networks.mlp import MLPDenoiser, MLPGenerator, MLPRatio
from ..shard import SINGLE, Shard
from ..step import Networks, needs_ratio, needs_scores

_EVAL_SEED = 12345  # evaluation draws its own fixed stream: it never perturbs the training RNG


def needs_teacher(cfg: Config) -> bool:
    """Whether stage 1 fits a teacher: the method reads its score, or a network starts from it."""
    m, method = cfg.model, cfg.method.name
    return needs_scores(method) or m.generator_from_teacher or (needs_ratio(method) and m.ratio_from_teacher)


class Toy2DTask:
    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        self.mixture = toy.standardized(toy.MIXTURES[cfg.data.mixture]())
        self.mixture_dev = self.mixture.to(device, torch.float32)
        self.latent_dim = self.mixture.dim if cfg.model.generator_from_teacher else cfg.model.latent_dim

    def build_teacher(self) -> MLPDenoiser:
        """A denoiser of the teacher's architecture (fresh weights): the teacher, and the body of the
        fake score and of the generator when they start from it."""
        m = self.cfg.model
        return MLPDenoiser(self.mixture.dim, m.score_hidden, m.score_depth, m.sigma_data).to(self.device)

    def build_networks(self) -> Networks:
        """The networks stage 2 trains or reads. The teacher is among them only when the method reads
        its score (VSD, Di-Bregman with a teacher); otherwise stage 1 (``train.pretrain_teacher``) fits
        it, the nets start from it, and it is dropped, as on images."""
        m, schedule, dim = self.cfg.model, self.cfg.noise.schedule, self.mixture.dim
        method = self.cfg.method.name

        def score_net() -> DenoiserScore:
            return DenoiserScore(self.build_teacher(), schedule)

        if m.generator_from_teacher:
            generator = OneStepGenerator(self.build_teacher(), m.sigma_init)
        else:
            generator = MLPGenerator(m.latent_dim, dim, m.gen_hidden, m.gen_depth)
        nets = Networks(generator=generator)
        if needs_ratio(method):
            width, depth = (m.score_hidden, m.score_depth) if m.ratio_from_teacher else (m.ratio_hidden, m.ratio_depth)
            nets.ratio = MLPRatio(dim, width, depth, m.sigma_data, schedule)
        if needs_scores(method):
            nets.teacher = toy.ExactScore(self.mixture.to(self.device, torch.float64), schedule) if m.exact_teacher else score_net()
            nets.fake_score = score_net()
        for name in ("generator", "ratio", "teacher", "fake_score"):
            if getattr(nets, name) is not None:
                setattr(nets, name, getattr(nets, name).to(self.device))
        return nets

    def sample_real(self, n: int, rng: torch.Generator, shard: Shard = SINGLE) -> tuple[torch.Tensor, None]:
        return shard.take(self.mixture_dev.sample(n, rng)), None

    def advance(self) -> None:
        """Samples are drawn inside the step."""

    def data_state(self) -> dict:
        return {}

    def load_data_state(self, state: dict, source: str) -> None:
        """Exact samples from the run's generator: nothing to restore beyond it."""

    def sample_latent(self, n: int, rng: torch.Generator, shard: Shard = SINGLE) -> tuple[torch.Tensor, None]:
        return shard.take(torch.randn(n, self.latent_dim, generator=rng, device=self.device)), None

    @torch.no_grad()
    def _eval_draws(self, generator: torch.nn.Module, draws: int = 1) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``draws`` independent (generator, reference, exact) sample sets of data.eval_samples each, from
        the evaluation's own fixed stream: the first is the same whatever ``draws`` is."""
        rng = torch.Generator(self.device).manual_seed(_EVAL_SEED)
        n, out = self.cfg.data.eval_samples, []
        for _ in range(draws):
            fake = generator(self.sample_latent(n, rng)[0]).float()
            reference, fresh = self.sample_real(n, rng)[0], self.sample_real(n, rng)[0]
            out.append((fake.cpu(), reference.cpu(), fresh.cpu()))
        return out

    def evaluate(self, generator: torch.nn.Module) -> dict[str, float]:
        draws = self._eval_draws(generator, toy.YARDSTICK_DRAWS)
        fake, _, fresh = draws[0]
        coverage = toy.mode_coverage(fake, self.mixture)
        # The generator's distance averaged over independent draws, with its spread; the yardstick is the
        # distance an exact sample of this size has on average (toy.expected_energy_distance), not one
        # exact sample's, which scatters by a factor of several between draws.
        gen = torch.tensor([toy.energy_distance(f, r) for f, r, _ in draws])
        n = fake.shape[0]
        return {
            "mass_tv": coverage["mass_tv"],
            "mass_tv_true": toy.mode_coverage(fresh, self.mixture)["mass_tv"],
            "energy_distance": gen.mean().item(),
            "energy_distance_std": gen.std().item() if len(draws) > 1 else 0.0,
            "energy_distance_true": statistics.fmean(toy.expected_energy_distance(r, n) for _, r, _ in draws),
            "modes_covered": coverage["modes_covered"],
            "modes": coverage["modes"],
            "high_quality": coverage["high_quality"],
        }

    def checkpoint_extras(self) -> dict:
        return {}

    def plot(self, generator: torch.nn.Module, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fake, reference, _ = self._eval_draws(generator)[0]
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ax.scatter(reference[:, 0], reference[:, 1], s=2, alpha=0.4, label="data")
        ax.scatter(fake[:, 0], fake[:, 1], s=2, alpha=0.4, label="generator")
        ax.set_aspect("equal")
        ax.legend(loc="upper right", markerscale=4, fontsize=7)
        ax.set_title(path.stem, fontsize=8)
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
        plt.close(fig)
