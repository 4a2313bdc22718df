"""Adam and the update every network of a step goes through, written so torch.compile can trace a
whole training step, backward passes and optimizer steps included, into one graph.

``Optimizer.step`` and ``Optimizer.zero_grad`` are deliberately opaque to dynamo (the step forces
graph breaks around itself). Inside a compiled step ``adam_update`` therefore calls
``torch.optim.adam.adam``, the functional routine ``Adam.step`` itself runs, on the optimizer's own
state: the arithmetic is torch's Adam and the state dict stays the standard one. Eager steps call
``opt.step()``, which also creates the state on the first step (a compiled step always follows at
least one eager step, fastratio.runner).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.adam import adam

from .config import Config


def make_adam(params, lr: float, cfg: Config) -> torch.optim.Adam:
    params = list(params)
    # Compiled and captured steps keep Adam's step counters on the GPU: a CUDA graph cannot read
    # host tensors, and a compiled step should not mix them into its device arithmetic.
    capturable = cfg.step.mode != "eager" and params[0].is_cuda
    # A scheduled learning rate is a device tensor updated in place (LearningRateSchedule): a float
    # would be a constant of the compiled step (a recompile per value) and frozen in a CUDA graph.
    rate = torch.tensor(lr, dtype=torch.float32, device=params[0].device) if cfg.optim.lr_schedule != "constant" else lr
    opt = torch.optim.Adam(params, lr=rate, betas=(cfg.optim.beta1, cfg.optim.beta2), capturable=capturable)
    opt.base_lr = lr
    return opt


def edm2_lr_factor(nimg: torch.Tensor, batch_size: int, ref_batches: float, rampup_mimg: float) -> torch.Tensor:
    """EDM2's learning-rate schedule as a factor of the reference rate (``training_loop.py``,
    ``learning_rate_schedule``; Karras et al. 2024, Sec. 3 "learning rate decay"): 1 / sqrt(max(nimg /
    (ref_batches * batch), 1)), times min(nimg / rampup, 1) during the warm-up. ``nimg`` counts the
    images the update about to be made has seen before it, as EDM2's ``cur_nimg``."""
    factor = torch.rsqrt(torch.clamp_min(nimg / (ref_batches * batch_size), 1.0)) if ref_batches > 0 else torch.ones_like(nimg)
    if rampup_mimg > 0:
        factor = factor * torch.clamp_max(nimg / (rampup_mimg * 1e6), 1.0)
    return factor


class LearningRateSchedule:
    """Sets every optimizer's tensor learning rate to base_lr x ``edm2_lr_factor(nimg)`` on the device
    (no host work: it runs inside a compiled or captured iteration)."""

    def __init__(self, optimizers: dict[str, torch.optim.Adam], cfg: Config):
        self.optimizers, self.cfg = optimizers, cfg
        # load_state_dict (a resume) replaces each group's rate with the checkpoint's tensor, on the
        # CPU: put a device tensor back, once, before any step reads it.
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=group["params"][0].device)

    def __call__(self, nimg: torch.Tensor) -> None:
        o = self.cfg.optim
        factor = edm2_lr_factor(nimg.float(), o.batch_size, o.lr_ref_batches, o.lr_rampup_mimg)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"].copy_(opt.base_lr * factor)


def adam_update(opt: torch.optim.Adam) -> None:
    """``opt.step()``, traceable by dynamo once the state exists."""
    if not torch.compiler.is_compiling():
        opt.step()
        return
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        state = [opt.state[p] for p in params]
        with torch.no_grad():
            adam(
                params, [p.grad for p in params], [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
                [s["max_exp_avg_sq"] for s in state] if group["amsgrad"] else [], [s["step"] for s in state],
                foreach=group["foreach"], capturable=group["capturable"], differentiable=group["differentiable"],
                fused=group["fused"], amsgrad=group["amsgrad"], beta1=group["betas"][0], beta2=group["betas"][1],
                lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
            )


def accumulate_grad(opt: torch.optim.Adam, loss: torch.Tensor, first: bool) -> None:
    """Add d loss / d parameters to the ``.grad`` of opt's parameters; ``first`` starts the update's sum
    (the previous update's gradients are dropped). A micro-batch of an accumulated update calls this
    once each (fastratio.step.accumulate), an unsplit update once."""
    params = [p for group in opt.param_groups for p in group["params"]]
    if torch.compiler.is_compiling():
        # dynamo's rewrite of loss.backward() hands parameters the loss never reaches (say, the
        # augmentation embedding at zero augmentation) gradients of the wrong shape; autograd.grad
        # with allow_unused gives them None, as backward leaves them in eager.
        for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
            if first or p.grad is None:
                p.grad = g
            elif g is not None:
                p.grad = p.grad + g
    else:
        if first:
            for p in params:
                p.grad = None
        loss.backward()  # DDP's gradient all-reduce hooks fire here (outside no_sync)


def apply_grad(module: nn.Module, opt: torch.optim.Adam, grad_clip: float) -> torch.Tensor:
    """Clip the accumulated gradient (0: off) and take the Adam step; returns the pre-clip gradient norm
    without a host sync."""
    params = [p for group in opt.param_groups for p in group["params"]]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    else:  # the norm alone (logged, and watched for divergence): no scale-by-1 pass over every gradient
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros((), device=params[0].device)
    adam_update(opt)
    return norm


def optimizer_step(module: nn.Module, opt: torch.optim.Adam, loss: torch.Tensor, grad_clip: float) -> torch.Tensor:
    """Backward, clip (0: off) and Adam step; returns the pre-clip gradient norm without a host sync."""
    accumulate_grad(opt, loss, first=True)
    return apply_grad(module, opt, grad_clip)
