"""One training iteration: ratio (or fake-score) updates, then one generator update.

The step takes its inputs (a real batch, generator latents and their class labels, None when
unconditional) as tensors and asks a ``Draws`` for its noise levels, noise and augmentations, so
the same code runs eagerly and as one compiled graph (fastratio.runner, fastratio.draws). It
returns 0-dim device tensors: nothing here syncs with the host, the loop reads metrics every
``log_every`` steps. With ``run.precision=bf16`` network forwards run under bf16 autocast; weights,
gradients and optimizer state stay fp32.

Augmentation (``augment.p`` > 0) is applied to what the ratio network, the teacher and the fake score
are *trained* on, with the augmentation labels as conditioning; the generator update queries them
at zero augmentation, i.e. on the un-augmented distribution (non-leaky, EDM Appendix B.5).

Gradient accumulation (``optim.batch_gpu``, EDM's ``--batch-gpu``): every update of the step (each
ratio, fake-score or shared update, the generator update, the stage-1 teacher update) runs its rank's
rows as K micro-batches of ``batch_gpu`` samples (``accumulate``): a forward and backward per
micro-batch, the loss scaled by 1/K so the gradients sum to the full batch's, DDP's all-reduce on the
last micro-batch only (``no_sync`` before it), then one clip and one Adam step on the sum; the EMAs
update once per step (fastratio.runner). Random numbers are drawn once per update at the full batch's
shape and each micro-batch takes its rows (fastratio.shard, fastratio.draws), so a split step equals
the unsplit one up to float rounding. Every objective is a mean of per-sample terms (the classifier's
is the mean of its real and generated halves, of equal size in each micro-batch; DMD's normalisation
is per sample), so the 1/K-weighted micro-batch means are the batch means; the logged metrics are the
same weighted sums. Not reproduced: dropout masks (``model.dropout``), which a network draws from the
device's default generator per forward. The loop is Python unrolled into the compiled step and into
the captured CUDA graph; nothing in it reads the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import objectives, ops
from .augment import augment
from .config import Config
from .draws import Draws
from .noise import add_noise, expand, loss_weight, noise_coefficients, sample_sigma, teacher_sigma
from .optim import accumulate_grad, apply_grad, optimizer_step
from .shard import SINGLE, Shard

# An update's objective on one micro-batch: (its shard, its rows of the inputs) -> (loss, metrics),
# the loss and every metric a mean over the micro-batch's samples.
Objective = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Networks:
    """The modules one method trains or reads; unused roles are None."""

    generator: nn.Module | None = None  # None only in a teacher run (method.name=teacher)
    ratio: nn.Module | None = None  # diffratio, dibregman
    teacher: nn.Module | None = None  # vsd, dibregman: frozen data score
    fake_score: nn.Module | None = None  # vsd, dibregman: score of the generator's samples


def needs_ratio(method: str) -> bool:
    return method in ("diffratio", "dibregman")


def needs_scores(method: str) -> bool:
    return method in ("vsd", "dibregman")


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast of network forwards when run.precision=bf16, else a no-op context."""
    if cfg.run.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_augment(x: torch.Tensor, cfg: Config, draws: Draws, shard: Shard = SINGLE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, augmentation labels) for a network's training input; (x, None) when augmentation is off."""
    if cfg.augment.p > 0:
        return augment(x, cfg.augment, draws, shard)
    return x, None


def draw_sigma(cfg: Config, x0: torch.Tensor, draws: Draws, shard: Shard = SINGLE) -> torch.Tensor:
    """One noise level per row of x0 (this rank's rows of the global draw)."""
    return shard.take(sample_sigma(cfg.noise, shard.rows(x0.shape[0]), draws, x0.device)).to(x0.dtype)


def draw_noised(x0: torch.Tensor, cfg: Config, draws: Draws, shard: Shard = SINGLE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, sigma, eps): a noise level per sample and the forward-noised batch."""
    sigma = draw_sigma(cfg, x0, draws, shard)
    eps = shard.take(draws.randn((shard.rows(x0.shape[0]), *x0.shape[1:]), x0.device, x0.dtype))
    return add_noise(x0, sigma, eps, cfg.noise.schedule), sigma, eps


def _attention_for(double_backward: bool):
    """The math SDPA backend when a double backward (R1) runs: the fused attention kernels have no
    second derivative."""
    if double_backward:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None else torch.cat([a, b])


def micro_batches(cfg: Config, n_local: int) -> int:
    """Micro-batches per update for a rank's n_local rows: n_local / optim.batch_gpu (1 when unset or
    not smaller)."""
    size = cfg.optim.batch_gpu
    if not size or size >= n_local:
        return 1
    if n_local % size:
        raise ValueError(f"optim.batch_gpu: {size} does not divide the {n_local} rows of this rank's update")
    return n_local // size


def _no_sync(module: nn.Module):
    """DDP's no_sync (gradients accumulate locally, no all-reduce) for a wrapped network, else nothing."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def accumulate(objective: Objective, inputs: tuple, micros: int, shard: Shard, draws: Draws, opt: torch.optim.Optimizer,
               module: nn.Module, wrapper: nn.Module, grad_clip: float, norm_key: str) -> dict[str, torch.Tensor]:
    """One update of ``module`` (forwards through ``wrapper``, its DDP wrapper or itself) by ``opt``:
    ``objective(shard, *inputs)`` on the rank's rows, or on each of ``micros`` micro-batches with the
    gradients summed (module docstring); returns the metrics (batch means) and the pre-clip gradient
    norm under ``norm_key``. ``inputs``: per-rank tensors [n_local, ...] or None."""
    if micros == 1:
        loss, metrics = objective(shard, *inputs)
        return {**metrics, norm_key: optimizer_step(module, opt, loss, grad_clip)}
    totals: dict[str, torch.Tensor] = {}
    kept = draws.keep_served()  # the first micro-batch draws at the full batch's shapes ...
    for k in range(micros):
        if k > 0:
            draws.serve_again(kept)  # ... the later ones read the same tensors, each taking its rows
        part = shard.micro_batch(k, micros)
        with _no_sync(wrapper) if k < micros - 1 else contextlib.nullcontext():
            loss, metrics = objective(part, *(part.local(t) for t in inputs))
            accumulate_grad(opt, loss / micros, first=k == 0)
        for key, value in metrics.items():
            totals[key] = value / micros if k == 0 else totals[key] + value / micros
    draws.serve_normally()
    return {**totals, norm_key: apply_grad(module, opt, grad_clip)}


def dsm_update(
    score_net: nn.Module, opt: torch.optim.Optimizer, x0: torch.Tensor, cfg: Config, draws: Draws,
    labels: torch.Tensor | None = None, shard: Shard = SINGLE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoising-score-matching step (Eq. 3 for the teacher on data, Eq. 4 for the fake score on
    generated samples); returns (loss, grad norm). ``score_net`` may be a DDP wrapper."""
    loss = dsm_objective(score_net, x0, cfg, draws, labels, shard)
    return loss.detach(), optimizer_step(score_net, opt, loss, cfg.optim.grad_clip)


def dsm_objective(score_net: nn.Module, x0: torch.Tensor, cfg: Config, draws: Draws, labels: torch.Tensor | None = None,
                  shard: Shard = SINGLE) -> torch.Tensor:
    """The denoising-score-matching loss of one batch (mean over samples), not yet applied."""
    x0, aug = maybe_augment(x0, cfg, draws, shard)
    x_t, sigma, eps = draw_noised(x0, cfg, draws, shard)
    _, std = noise_coefficients(sigma, cfg.noise.schedule)
    # lambda = std^2: the noise-prediction loss ||std s + eps||^2, O(1) at every noise level. The
    # generator's w(sigma) (noise.weighting) is another matter: with w = 1 here the loss would be
    # dominated by 1/sigma^2 at the smallest sigma (a 1e5 DSM loss on digits at sigma = 0.002).
    with autocast(cfg, x0.device):
        score = score_net(x_t, sigma, labels, aug)
    return objectives.dsm_loss(score.float(), eps, std, std**2).mean()


class TeacherStep:
    """Stage 1 for images: one denoiser update on a real batch (loss ``teacher.loss``: EDM Eq. 2, or
    EDM2 Eq. 21 with the network's learned uncertainty), in micro-batches of ``optim.batch_gpu``.
    Same call signature as ``TrainStep``; the latents are unused."""

    def __init__(self, cfg: Config, nets: Networks, optimizers: dict[str, torch.optim.Optimizer], draws: Draws,
                 shard: Shard = SINGLE, wrapped: dict[str, nn.Module] | None = None):
        self.cfg, self.opt, self.draws, self.shard = cfg, optimizers["teacher"], draws, shard
        self.module = nets.teacher
        self.denoiser = (wrapped or {}).get("teacher", nets.teacher)

    def _objective(self, shard: Shard, x_real: torch.Tensor, labels_real: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        x, aug = maybe_augment(x_real, cfg, self.draws, shard)
        n = shard.rows(x.shape[0])
        sigma, weight = (shard.take(t) for t in teacher_sigma(cfg.teacher.loss, n, self.draws, x.device, cfg.model.sigma_data,
                                                               cfg.noise.p_mean, cfg.noise.p_std))
        noise = shard.take(self.draws.randn((n, *x.shape[1:]), x.device))
        noisy = add_noise(x, sigma, noise, "ve")  # EDM's teachers denoise x + sigma n, whatever the run's schedule
        with autocast(cfg, x.device):
            if cfg.teacher.loss == "edm2":  # EDM2 networks take no augmentation labels (config refuses augment.p > 0)
                denoised, logvar = self.denoiser(noisy, sigma, labels_real, return_logvar=True)
            else:
                denoised = self.denoiser(noisy, sigma, labels_real, aug)
        if cfg.teacher.loss == "edm2":
            loss = objectives.uncertainty_loss(denoised.float(), x, weight, logvar.float()).mean()
        else:
            loss = objectives.denoiser_loss(denoised.float(), x, weight).mean()
        return loss, {"teacher_loss": loss.detach()}

    def __call__(self, x_real, z=None, labels_real=None, labels_fake=None) -> dict[str, torch.Tensor]:
        return accumulate(self._objective, (x_real, labels_real), micro_batches(self.cfg, x_real.shape[0]), self.shard, self.draws,
                          self.opt, self.module, self.denoiser, self.cfg.optim.grad_clip, "teacher_grad_norm")


class TrainStep:
    """Callable ``step(x_real, z, labels_real, labels_fake) -> metrics`` implementing the configured method."""

    def __init__(self, cfg: Config, nets: Networks, optimizers: dict[str, torch.optim.Optimizer], draws: Draws,
                 shard: Shard = SINGLE, wrapped: dict[str, nn.Module] | None = None):
        self.cfg, self.nets, self.opt, self.draws, self.shard = cfg, nets, optimizers, draws, shard
        # Forwards whose parameter gradients are all-reduced go through the DDP wrappers; the ratio
        # net's input-gradient query in the generator update uses the bare module (no parameter
        # gradient, so no reduction may be pending there).
        self.wrapped = {name: (wrapped or {}).get(name, getattr(nets, name)) for name in ("generator", "ratio", "fake_score")}
        self.method = cfg.method.name
        self.device = next(nets.generator.parameters()).device
        self.triton = ops.use_triton(cfg.run.kernels, self.device)

    def _autocast(self):
        return autocast(self.cfg, self.device)

    def _noised(self, x0: torch.Tensor, shard: Shard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, sigma) for the ratio and generator updates, which never need eps itself."""
        shard = self.shard if shard is None else shard
        sigma = draw_sigma(self.cfg, x0, self.draws, shard)
        return ops.inject_noise(x0, sigma, self.cfg.noise.schedule, self.draws, self.triton, shard), sigma

    def _weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return loss_weight(sigma, self.cfg.noise.weighting, self.cfg.model.sigma_data)

    def _apply(self, name: str, module: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        return optimizer_step(module, self.opt[name], loss, self.cfg.optim.grad_clip)

    def _update(self, name: str, objective: Objective, norm_key: str, *inputs: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One update of network ``name`` by ``objective``, in micro-batches of optim.batch_gpu (``accumulate``)."""
        micros = micro_batches(self.cfg, inputs[0].shape[0])
        return accumulate(objective, inputs, micros, self.shard, self.draws, self.opt[name], getattr(self.nets, name),
                          self.wrapped[name], self.cfg.optim.grad_clip, norm_key)

    # -- auxiliary updates -----------------------------------------------------------------------
    def ratio_update(self, x_real, x_fake, labels_real=None, labels_fake=None) -> dict[str, torch.Tensor]:
        """Classifier step, real y=1 vs generated y=0, each noised at its own sigma."""
        return self._update("ratio", self._ratio_objective, "ratio_grad_norm", x_real, x_fake, labels_real, labels_fake)

    def _ratio_objective(self, shard: Shard, x_real, x_fake, labels_real=None, labels_fake=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The classifier's loss (with R1 when configured) and its metrics; both halves go through one
        forward (one DDP reduction, one launch per layer)."""
        x_real, aug_real = maybe_augment(x_real, self.cfg, self.draws, shard)
        x_fake, aug_fake = maybe_augment(x_fake, self.cfg, self.draws, shard)
        xt_real, sigma_real = self._noised(x_real, shard)
        xt_fake, sigma_fake = self._noised(x_fake, shard)
        gamma = self.cfg.method.r1_gamma
        if gamma > 0:
            xt_real = xt_real.detach().requires_grad_(True)
        with self._autocast(), _attention_for(gamma > 0):
            logit = self.wrapped["ratio"](
                torch.cat([xt_real, xt_fake]), torch.cat([sigma_real, sigma_fake]),
                _cat(labels_real, labels_fake), _cat(aug_real, aug_fake),
            ).float()
            logit_real, logit_fake = logit.split([x_real.shape[0], x_fake.shape[0]])
            classifier = loss = ops.classifier_loss(logit_real, logit_fake, self.triton)
            extra = {}
            if gamma > 0:
                (grad_real,) = torch.autograd.grad(logit_real.sum(), xt_real, create_graph=True)
                r1 = objectives.r1_penalty(grad_real.float()).mean()
                loss = loss + 0.5 * gamma * r1
                extra["ratio_r1"] = r1.detach()
        return loss, {
            **extra,
            "ratio_loss": classifier.detach(),
            "ratio_acc_real": (logit_real.detach() > 0).float().mean(),
            "ratio_acc_fake": (logit_fake.detach() < 0).float().mean(),
        }

    def fake_score_update(self, x_fake: torch.Tensor, labels_fake=None) -> dict[str, torch.Tensor]:
        """Denoising score matching of the generator's samples (the VSD 'fake' score, Eq. 4)."""
        return self._update("fake_score", self._fake_score_objective, "fake_grad_norm", x_fake, labels_fake)

    def _fake_score_objective(self, shard: Shard, x_fake, labels_fake=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = dsm_objective(self.wrapped["fake_score"], x_fake, self.cfg, self.draws, labels_fake, shard)
        return loss, {"fake_dsm_loss": loss.detach()}

    def shared_update(self, x_real, x_fake, labels_real=None, labels_fake=None) -> dict[str, torch.Tensor]:
        """``model.shared_encoder``: the ratio is a read-out of the fake score's encoder, so one update of
        the fake score minimises its score-matching loss plus the classifier's (Di-Bregman App. D, after
        SiDA: "the discriminator is built upon the auxiliary model encoder"). The classifier's forward
        goes through the bare encoder; the fake score's DDP wrapper reduces the summed gradient once."""
        return self._update("fake_score", self._shared_objective, "fake_grad_norm", x_real, x_fake, labels_real, labels_fake)

    def _shared_objective(self, shard: Shard, x_real, x_fake, labels_real=None, labels_fake=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dsm = dsm_objective(self.wrapped["fake_score"], x_fake, self.cfg, self.draws, labels_fake, shard)
        classifier, metrics = self._ratio_objective(shard, x_real, x_fake, labels_real, labels_fake)
        return dsm + classifier, {**metrics, "fake_dsm_loss": dsm.detach()}

    # -- generator -------------------------------------------------------------------------------
    def _ratio_logit_grad(self, x_t, sigma, w, labels=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Ratio logit l [B] and d l / d x_t [B, ...] (both detached), plus the logged potential."""
        cfg = self.cfg.method
        x_in = x_t.detach().requires_grad_(True)
        with torch.enable_grad(), self._autocast():
            logit = self.nets.ratio(x_in, sigma, labels).float()
            # Only d l / d x_t is needed: the ratio net's parameters get no gradient here.
            (grad_logit,) = torch.autograd.grad(logit.sum(), x_in)
        logit = logit.detach()
        potential = (w * objectives.generator_potential(logit, cfg.objective, cfg.sba_lambda)).mean()
        return logit, grad_logit, {"gen_potential": potential}

    def generator_direction(self, x_t, sigma, labels=None, x0=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x-space gradient g of the generator loss at x_t [B, ...] (noised from the sample x0) and diagnostics."""
        cfg = self.cfg.method
        dmd = self.cfg.noise.weighting == "dmd"
        w = None if dmd else self._weight(sigma)
        metrics: dict[str, torch.Tensor] = {}
        logit = None
        if needs_ratio(self.method):  # with dmd the logged potential is unweighted: its weight needs the teacher
            logit, grad_logit, metrics = self._ratio_logit_grad(x_t, sigma, torch.ones_like(sigma) if dmd else w, labels)
        if self.method == "diffratio":
            direction = objectives.ratio_direction(logit, grad_logit, w, cfg.objective, cfg.sba_lambda)
        else:
            with torch.no_grad(), self._autocast():
                s_fake = self.nets.fake_score(x_t, sigma, labels).float()
                s_teacher = self.nets.teacher(x_t, sigma, labels).float()
            if dmd:
                alpha, std = noise_coefficients(sigma, self.cfg.noise.schedule)
                w = objectives.dmd_weight(sigma, x0, (x_t + expand(std**2, x_t) * s_teacher) / expand(alpha, x_t))
            ratio_w = None if logit is None else objectives.generator_weight(logit, cfg.objective, cfg.sba_lambda)
            direction = objectives.score_difference_direction(s_fake, s_teacher, w, ratio_w)
        if cfg.gan_weight > 0:  # Di-Bregman Alg. 1: L_gen = L_Di-Bregman + w_GAN L_GAN, at the same x_t
            direction = direction + cfg.gan_weight * objectives.gan_direction(logit, grad_logit)
            metrics["gen_gan_loss"] = F.softplus(-logit).mean()
        metrics["gen_direction_norm"] = direction.reshape(direction.shape[0], -1).norm(dim=1).mean()
        return direction, metrics

    def generator_update(self, z: torch.Tensor, x_fake: torch.Tensor, labels=None) -> dict[str, torch.Tensor]:
        """The generator step, ordered so its peak memory is the larger of its two halves, not their sum.

        1. The direction g at x_t = alpha x_fake + std eps, x_fake being this step's no-grad sample of
           the same latents (the generator has not changed since, and has no dropout, so it equals the
           sample the generator's forward below returns), from the just-updated ratio net (or scores).
           No generator graph exists yet, so the ratio net's input-gradient query (or the score
           forwards) do not sit on top of the generator's activations.
        2. The generator's forward with grad, x0, and the surrogate <sg(alpha g), x0>, whose gradient
           with respect to the generator equals that of <sg(g), x_t> (dx_t/dx0 = alpha; eps is free of
           the generator). The fused kernel takes exactly (x0, dl/dx_t, l, w, alpha).
        The random draws (sigma, noise) come in the same order as before this ordering: the
        generator's forward draws nothing. Both halves run per micro-batch (``accumulate``)."""
        return self._update("generator", self._generator_objective, "gen_grad_norm", z, x_fake, labels)

    def _generator_objective(self, shard: Shard, z: torch.Tensor, x_fake: torch.Tensor, labels=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg.method
        x_t, sigma = self._noised(x_fake, shard)
        alpha, _ = noise_coefficients(sigma, self.cfg.noise.schedule)
        # The fused surrogate kernel knows one weight per objective; the GAN term takes the unfused path.
        fused = self.triton and self.method == "diffratio" and cfg.gan_weight == 0
        if fused:  # the direction is never materialised
            w = self._weight(sigma)
            logit, grad_logit, metrics = self._ratio_logit_grad(x_t, sigma, w, labels)
            scale = w * objectives.generator_weight(logit, cfg.objective, cfg.sba_lambda)
            metrics["gen_direction_norm"] = (scale * grad_logit.reshape(grad_logit.shape[0], -1).norm(dim=1)).mean()
        else:
            direction, metrics = self.generator_direction(x_t, sigma, labels, x_fake)
            direction = direction * expand(alpha, direction)
        with self._autocast():
            x0 = self.wrapped["generator"](z, labels).float()
        if fused:
            from .kernels.generator_surrogate import generator_surrogate

            per_sample = generator_surrogate(x0, grad_logit, logit, w, alpha, cfg.objective, cfg.sba_lambda)
        else:
            per_sample = objectives.surrogate_loss(direction, x0)
        return per_sample.mean(), metrics

    def __call__(self, x_real, z, labels_real=None, labels_fake=None) -> dict[str, torch.Tensor]:
        """Auxiliary updates on this step's generator sample, then the generator update. The sample is
        a no-grad forward drawn once (the generator does not change during the auxiliary updates);
        the generator update runs its own forward with grad after all auxiliary work. Reusing one
        forward with grad instead would keep the generator's graph alive under the auxiliary updates,
        their activations on top of its own (bench/step_cost.py; README, speed section). With
        optim.batch_gpu the sample is drawn in micro-batches too, so no forward runs at more rows."""
        metrics: dict[str, torch.Tensor] = {}
        micros = micro_batches(self.cfg, z.shape[0])
        with torch.no_grad(), self._autocast():
            if micros == 1:
                x_fake = self.nets.generator(z, labels_fake).float()
            else:
                parts = [self.shard.micro_batch(k, micros) for k in range(micros)]
                x_fake = torch.cat([self.nets.generator(part.local(z), part.local(labels_fake)).float() for part in parts])
        ratio_steps = self.cfg.method.ratio_steps if needs_ratio(self.method) else 0
        fake_steps = self.cfg.method.fake_score_steps if needs_scores(self.method) else 0
        for i in range(max(ratio_steps, fake_steps)):
            if self.cfg.model.shared_encoder:  # config: ratio_steps == fake_score_steps
                metrics.update(self.shared_update(x_real, x_fake, labels_real, labels_fake))
                continue
            if i < ratio_steps:
                metrics.update(self.ratio_update(x_real, x_fake, labels_real, labels_fake))
            if i < fake_steps:
                metrics.update(self.fake_score_update(x_fake, labels_fake))
        metrics.update(self.generator_update(z, x_fake, labels_fake))
        return metrics

