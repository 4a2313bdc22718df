"""Fused ratio weighting: classifier loss, its logit gradient and the generator weight in one pass.

Derivation (l = ratio logit, y = 1 real / 0 generated, w = w(sigma), all math in float32):
  classifier loss  BCE(sigmoid(l), y) = softplus(l) - y l,
                   softplus(l) = max(l, 0) + log(1 + exp(-|l|))        (never overflows)
  d loss / d l     = sigmoid(l) - y
  generator scale  s = -w * weight(l), the factor of grad_x l in the generator direction
                   (fastratio.objectives.ratio_direction), weight(l) from Di-Bregman Table 1 /
                   "Towards..." Eq. 8-10: dikl/kl 1, dijs/lr sigmoid(l), dirm sigmoid(-l),
                   be e^{l}, ls e^{-l}, sba e^{-lambda l}; exponents clamped at MAX_LOG_WEIGHT.
One read of (l, y, w) and three writes replace about a dozen elementwise launches.

The objective is a constexpr (it selects code, and is fixed for a run); lambda and w are runtime
values, so changing them never recompiles. Autograd: the loss is differentiable in l (its gradient is
the saved d loss / d l times the upstream gradient); d loss / d l and the generator scale are
returned as constants, which is how the training step uses them (stop-gradient weights).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastratio.objectives import MAX_LOG_WEIGHT, generator_weight

from .rows import LAUNCH, check_launchable

OBJECTIVE_CODES = {"dikl": 0, "kl": 0, "dijs": 1, "lr": 1, "dirm": 2, "be": 3, "ls": 4, "sba": 5}
BLOCK, NUM_WARPS, MAX_REGISTERS = LAUNCH


@triton.jit
def softplus_jit(x):
    # NaN-propagating max (PTX max.NaN.f32): a plain max would turn a NaN logit into 0 here.
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def clamp_max_jit(x, bound):
    """min(x, bound) that keeps NaN: tl.minimum compiles to PTX min.f32, which returns the bound for a
    NaN x, and a NaN logit would become a finite maximal weight the divergence guard never sees."""
    return tl.where(x > bound, bound, x)


@triton.jit
def generator_weight_jit(l, sig, sba_lambda, max_log_weight, OBJECTIVE: tl.constexpr):
    """weight(l) of OBJECTIVE_CODES[objective]; sig = sigmoid(l). Shared with the surrogate kernel."""
    if OBJECTIVE == 0:
        weight = tl.full(l.shape, 1.0, tl.float32)
    elif OBJECTIVE == 1:
        weight = sig
    elif OBJECTIVE == 2:
        # sigmoid(-l) = exp(-softplus(l)), not 1 - sigmoid(l): that cancels to 0 in fp32 for l > ~17
        # (47% error at l = 16) while the true weight is e^{-l}.
        weight = tl.exp(-softplus_jit(l))
    elif OBJECTIVE == 3:
        weight = tl.exp(clamp_max_jit(l, max_log_weight))
    elif OBJECTIVE == 4:
        weight = tl.exp(clamp_max_jit(-l, max_log_weight))
    else:
        weight = tl.exp(clamp_max_jit(-sba_lambda * l, max_log_weight))
    return weight


@triton.jit
def _ratio_weighting_kernel(
    logit_ptr, label_ptr, wsig_ptr, loss_ptr, dlogit_ptr, scale_ptr,
    n, sba_lambda, max_log_weight,
    OBJECTIVE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    l = tl.load(logit_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(label_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(wsig_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    sp = softplus_jit(l)
    sig = tl.exp(-softplus_jit(-l))  # sigmoid(l) without exp overflow
    loss = sp - y * l
    dlogit = sig - y
    scale = -w * generator_weight_jit(l, sig, sba_lambda, max_log_weight, OBJECTIVE)

    tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=mask)
    tl.store(dlogit_ptr + offs, dlogit.to(dlogit_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + offs, scale.to(scale_ptr.dtype.element_ty), mask=mask)


def _check(logit: torch.Tensor, label: torch.Tensor, weight_sigma: torch.Tensor, objective: str) -> None:
    if objective not in OBJECTIVE_CODES:
        raise ValueError(f"objective: {objective!r} is not one of {', '.join(OBJECTIVE_CODES)}")
    if logit.dim() != 1:
        raise ValueError(f"logit: expected shape [N], got {tuple(logit.shape)}")
    for name, t in (("label", label), ("weight_sigma", weight_sigma)):
        if t.shape != logit.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match logit {tuple(logit.shape)}")
        if t.device != logit.device:
            raise ValueError(f"{name}: on {t.device}, logit on {logit.device}")
    for name, t in (("logit", logit), ("label", label), ("weight_sigma", weight_sigma)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name}: dtype {t.dtype} not supported (float32, bfloat16, float16)")
    check_launchable(logit, "logit")


@torch.library.custom_op("fastratio::ratio_weighting", mutates_args=())
def _ratio_weighting_op(
    logit: torch.Tensor, label: torch.Tensor, weight_sigma: torch.Tensor, objective_code: int, sba_lambda: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logit, label, weight_sigma = logit.contiguous(), label.contiguous(), weight_sigma.contiguous()
    loss, dlogit, scale = (torch.empty_like(logit, dtype=torch.float32) for _ in range(3))
    n = logit.numel()
    if n:
        _ratio_weighting_kernel[(triton.cdiv(n, BLOCK),)](
            logit, label, weight_sigma, loss, dlogit, scale, n, float(sba_lambda), MAX_LOG_WEIGHT,
            OBJECTIVE=objective_code, BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS,
        )
    return loss, dlogit, scale


@_ratio_weighting_op.register_fake
def _(logit, label, weight_sigma, objective_code, sba_lambda):
    return tuple(torch.empty_like(logit, dtype=torch.float32) for _ in range(3))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.logit_dtype = inputs[0].dtype


def _backward(ctx, grad_loss, grad_dlogit, grad_scale):
    (dlogit,) = ctx.saved_tensors
    grad_logit = (grad_loss * dlogit).to(ctx.logit_dtype) if grad_loss is not None else None
    return grad_logit, None, None, None, None


_ratio_weighting_op.register_autograd(_backward, setup_context=_setup_context)


def ratio_weighting(
    logit: torch.Tensor, label: torch.Tensor, weight_sigma: torch.Tensor, objective: str, sba_lambda: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(classifier loss [N], d loss/d logit [N], generator scale -w weight(l) [N]), float32.

    logit [N] float32/bf16/fp16; label [N] (1 real, 0 generated); weight_sigma [N] = w(sigma).
    """
    _check(logit, label, weight_sigma, objective)
    return _ratio_weighting_op(logit, label, weight_sigma, OBJECTIVE_CODES[objective], sba_lambda)


def ratio_weighting_reference(
    logit: torch.Tensor, label: torch.Tensor, weight_sigma: torch.Tensor, objective: str, sba_lambda: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference built from fastratio.objectives (computed in the input's precision)."""
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, label.to(logit.dtype), reduction="none")
    dlogit = torch.sigmoid(logit) - label.to(logit.dtype)
    scale = -weight_sigma.to(logit.dtype) * generator_weight(logit, objective, sba_lambda)
    return loss, dlogit, scale
