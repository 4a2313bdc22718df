"""Fused generator surrogate: ratio weighting, w(sigma), the alpha chain factor and the reduction.

Derivation: the generator direction at x_t is g[b, f] = s[b] * dl/dx_t[b, f] with
s[b] = -w(sigma_b) * weight(l_b) (fastratio.objectives.ratio_direction), and
x_t = alpha[b] * x0[b, f] + std[b] * eps, so dx_t/dx0 = alpha[b]. The surrogate whose gradient
carries g into the generator (fastratio.objectives.surrogate_loss, Eq. 2) is, up to a term free of
the generator,
  S[b]          = sum_f sg(g[b, f]) * alpha[b] * x0[b, f]
  dS/dx0[b, f]  = grad_out[b] * alpha[b] * s[b] * dl/dx_t[b, f]
The forward reduces one row per program row (atomic adds over feature blocks); the backward is one
elementwise pass that never materialises g. Only x0 receives a gradient: the weight, logit, w and
the logit gradient are stop-gradient inputs, as in the surrogate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastratio.objectives import MAX_LOG_WEIGHT, ratio_direction

from .ratio_weighting import OBJECTIVE_CODES, generator_weight_jit, softplus_jit
from .rows import LAUNCH, check_rows, row_block, row_grid

BLOCK, NUM_WARPS, MAX_REGISTERS = LAUNCH


@triton.jit
def _row_scale(logit_ptr, wsig_ptr, alpha_ptr, row, sba_lambda, max_log_weight, OBJECTIVE: tl.constexpr):
    """alpha[b] * s[b] for one row."""
    l = tl.load(logit_ptr + row).to(tl.float32)
    sig = tl.exp(-softplus_jit(-l))
    weight = generator_weight_jit(l, sig, sba_lambda, max_log_weight, OBJECTIVE)
    return -tl.load(wsig_ptr + row).to(tl.float32) * weight * tl.load(alpha_ptr + row).to(tl.float32)


@triton.jit
def _surrogate_forward_kernel(
    x0_ptr, glogit_ptr, logit_ptr, wsig_ptr, alpha_ptr, out_ptr, n_feat, sba_lambda, max_log_weight,
    OBJECTIVE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    row, idx, mask = row_block(n_feat, BLOCK_SIZE)
    x0 = tl.load(x0_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    gl = tl.load(glogit_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    scale = _row_scale(logit_ptr, wsig_ptr, alpha_ptr, row, sba_lambda, max_log_weight, OBJECTIVE)
    tl.atomic_add(out_ptr + row, scale * tl.sum(gl * x0, axis=0))


@triton.jit
def _surrogate_backward_kernel(
    grad_ptr, glogit_ptr, logit_ptr, wsig_ptr, alpha_ptr, grad_x0_ptr, n_feat, sba_lambda, max_log_weight,
    OBJECTIVE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    row, idx, mask = row_block(n_feat, BLOCK_SIZE)
    gl = tl.load(glogit_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    scale = _row_scale(logit_ptr, wsig_ptr, alpha_ptr, row, sba_lambda, max_log_weight, OBJECTIVE)
    scale = scale * tl.load(grad_ptr + row).to(tl.float32)
    tl.store(grad_x0_ptr + idx, (scale * gl).to(grad_x0_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("fastratio::generator_surrogate", mutates_args=())
def _surrogate_op(
    x0: torch.Tensor, grad_logit: torch.Tensor, logit: torch.Tensor, weight_sigma: torch.Tensor,
    alpha: torch.Tensor, objective_code: int, sba_lambda: float,
) -> torch.Tensor:
    x0, grad_logit = x0.contiguous(), grad_logit.contiguous()
    out = torch.zeros(x0.shape[0], device=x0.device, dtype=torch.float32)
    _surrogate_forward_kernel[row_grid(x0, BLOCK)](
        x0, grad_logit, logit.contiguous(), weight_sigma.contiguous(), alpha.contiguous(), out, x0[0].numel(),
        float(sba_lambda), MAX_LOG_WEIGHT, OBJECTIVE=objective_code, BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS,
    )
    return out


@_surrogate_op.register_fake
def _(x0, grad_logit, logit, weight_sigma, alpha, objective_code, sba_lambda):
    return x0.new_empty(x0.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastratio::generator_surrogate_backward", mutates_args=())
def _surrogate_backward_op(
    grad: torch.Tensor, grad_logit: torch.Tensor, logit: torch.Tensor, weight_sigma: torch.Tensor,
    alpha: torch.Tensor, objective_code: int, sba_lambda: float, x0_dtype: torch.dtype,
) -> torch.Tensor:
    grad_logit = grad_logit.contiguous()
    grad_x0 = torch.empty_like(grad_logit, dtype=x0_dtype)
    _surrogate_backward_kernel[row_grid(grad_logit, BLOCK)](
        grad.contiguous(), grad_logit, logit.contiguous(), weight_sigma.contiguous(), alpha.contiguous(), grad_x0,
        grad_logit[0].numel(), float(sba_lambda), MAX_LOG_WEIGHT, OBJECTIVE=objective_code, BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS,
    )
    return grad_x0


@_surrogate_backward_op.register_fake
def _(grad, grad_logit, logit, weight_sigma, alpha, objective_code, sba_lambda, x0_dtype):
    return torch.empty_like(grad_logit, dtype=x0_dtype)


def _setup_context(ctx, inputs, output):
    x0, grad_logit, logit, weight_sigma, alpha, objective_code, sba_lambda = inputs
    ctx.save_for_backward(grad_logit, logit, weight_sigma, alpha)
    ctx.objective_code, ctx.sba_lambda, ctx.x0_dtype = objective_code, sba_lambda, x0.dtype


def _backward(ctx, grad):
    grad_logit, logit, weight_sigma, alpha = ctx.saved_tensors
    grad_x0 = _surrogate_backward_op(grad, grad_logit, logit, weight_sigma, alpha, ctx.objective_code, ctx.sba_lambda, ctx.x0_dtype)
    return grad_x0, None, None, None, None, None, None


_surrogate_op.register_autograd(_backward, setup_context=_setup_context)


def generator_surrogate(
    x0: torch.Tensor, grad_logit: torch.Tensor, logit: torch.Tensor, weight_sigma: torch.Tensor,
    alpha: torch.Tensor, objective: str, sba_lambda: float = 5.0,
) -> torch.Tensor:
    """Per-sample surrogate S [B] (float32) whose gradient w.r.t. x0 [B, ...] is alpha * g (see module doc)."""
    if objective not in OBJECTIVE_CODES:
        raise ValueError(f"objective: {objective!r} is not one of {', '.join(OBJECTIVE_CODES)}")
    check_rows(x0, {"logit": logit, "weight_sigma": weight_sigma, "alpha": alpha}, {"grad_logit": grad_logit})
    return _surrogate_op(x0, grad_logit, logit, weight_sigma, alpha, OBJECTIVE_CODES[objective], sba_lambda)


def generator_surrogate_reference(
    x0: torch.Tensor, grad_logit: torch.Tensor, logit: torch.Tensor, weight_sigma: torch.Tensor,
    alpha: torch.Tensor, objective: str, sba_lambda: float = 5.0,
) -> torch.Tensor:
    """PyTorch reference: <sg(ratio_direction), alpha x0> per sample."""
    direction = ratio_direction(logit, grad_logit, weight_sigma, objective, sba_lambda).detach()
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return (direction * alpha.reshape(shape) * x0).reshape(x0.shape[0], -1).sum(1)
