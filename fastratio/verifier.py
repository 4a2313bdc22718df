"""The trained ratio network as a verifier: best-of-N at inference (DiffRatio, parallel scaling).

A candidate x is scored by the ratio network's estimate of log p/q (= -log q/p, "Towards..." Eq. 6)
averaged over a fixed set of noise levels with fixed noise: realness(x) = mean_s l(x + s eps_s, s).
best_of_n draws N candidates per output in one batched pass (no extra sequential compute), scores
them and keeps one; conditional candidates of one output share its class. Two rules keep it:

max       the most real candidate (the DiffRatio paper's best-of-N). It converges to the mode of p/q
          as N grows, so it trades diversity for typicality.
resample  one candidate drawn with probability proportional to exp(realness), through the Gumbel-max
          trick: sampling-importance-resampling with the estimated p/q as the weight, which tends to
          p itself as N grows when the ratio is right, and to the generator (no harm) when the
          ratio net is at chance (docs/verifier.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .noise import add_noise

DEFAULT_SIGMAS = (0.05, 0.2, 0.5, 1.0)
SELECT_RULES = ("max", "resample")
# The resampling noise of seed s comes from its own stream, apart from the seed's noise and class
# (EDM's stream, fastratio.inference.seed_draw), so a seed's candidates are the same under either rule.
_SELECT_STREAM = 1 << 40
_SCORE_STREAM = 1 << 44  # keyed scoring noise (realness ``keys``), apart from both


def selection_gumbel(seeds, candidates: int) -> torch.Tensor:
    """Standard Gumbel noise [len(seeds) * candidates] for "resample", each seed's from its own stream."""
    u = torch.cat([torch.rand(candidates, generator=torch.Generator().manual_seed(_SELECT_STREAM + s), dtype=torch.float64)
                   for s in seeds])
    return -torch.log(-torch.log(u))  # u = 0 gives -inf: never kept


@torch.no_grad()
def realness(log_ratio: Callable, x: torch.Tensor, sigmas=DEFAULT_SIGMAS, labels=None, schedule: str = "ve", seed: int = 0,
             keys: torch.Tensor | None = None) -> torch.Tensor:
    """[B] mean over sigmas of ``log_ratio(x_t, sigma, labels)`` (an estimate of log p/q at x_t);
    the noise is drawn from ``seed``, identical for every call: row i's is the batch's row i, or with
    ``keys`` [B] (a candidate's identity, e.g. seed * N + j) each row's from its key's own stream, so
    a candidate's score does not depend on the batch it is scored in."""
    g = torch.Generator(x.device).manual_seed(seed)
    total = torch.zeros(x.shape[0], device=x.device)
    keyed = None
    if keys is not None:
        keyed = torch.stack([torch.randn((len(sigmas), *x.shape[1:]), generator=torch.Generator().manual_seed(_SCORE_STREAM + seed + int(k)))
                             for k in keys.tolist()], dim=1).to(x.device, x.dtype)
    for i, s in enumerate(sigmas):
        eps = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype) if keyed is None else keyed[i]
        sigma = torch.full((x.shape[0],), float(s), device=x.device, dtype=x.dtype)
        total += log_ratio(add_noise(x, sigma, eps, schedule), sigma, labels).float()
    return total / len(sigmas)


@torch.no_grad()
def best_of_n(
    generator: Callable, sample_latent: Callable, score: Callable, n_out: int, n_candidates: int,
    rng: torch.Generator, chunk: int = 1024, gumbel: torch.Tensor | None = None, keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(kept samples [n_out, ...], their labels or None, their scores [n_out]).

    ``sample_latent(k, rng) -> (z, labels)``, ``generator(z, labels) -> x``, ``score(x, labels) -> [k]``
    (higher is more real). Candidates are drawn as N consecutive rows per output, all with the class
    of the group's first row; ``chunk`` bounds the rows generated at once. Without ``gumbel`` the
    highest score is kept ("max"); with standard Gumbel noise [n_out * N] per candidate, the highest
    score + noise ("resample": a draw proportional to exp(score)). With ``keys`` [n_out * N], ``score``
    also gets each row's key (``score(x, labels, keys)``)."""
    z, labels = sample_latent(n_out * n_candidates, rng)
    if labels is not None:
        labels = labels[::n_candidates].repeat_interleave(n_candidates, dim=0)
    kept, kept_labels, kept_scores = [], [], []
    per_chunk = max(1, chunk // n_candidates) * n_candidates
    for i in range(0, z.shape[0], per_chunk):
        zc, lc = z[i : i + per_chunk], None if labels is None else labels[i : i + per_chunk]
        x = generator(zc, lc)
        scores = (score(x, lc) if keys is None else score(x, lc, keys[i : i + per_chunk])).reshape(-1, n_candidates)
        ranked = scores if gumbel is None else scores + gumbel[i : i + per_chunk].to(scores).reshape(-1, n_candidates)
        pick = ranked.argmax(dim=1)
        index = torch.arange(scores.shape[0], device=x.device) * n_candidates + pick
        kept.append(x[index])
        kept_labels.append(None if lc is None else lc[index])
        kept_scores.append(scores.gather(1, pick[:, None]).squeeze(1))
    labels_out = None if labels is None else torch.cat(kept_labels)
    return torch.cat(kept), labels_out, torch.cat(kept_scores)
