"""Fused noise injection x_t = alpha * x0 + std * eps with eps from seeded Philox, never stored.

Derivation: for a batch x0 [B, F] (F = features per sample) and per-sample alpha, std [B],
  x_t[b, f]    = alpha[b] x0[b, f] + std[b] eps[b, f],   eps[b, f] = randn(seed, (b + row_offset) * F + f)
  dL/dx0[b, f] = alpha[b] g[b, f]
  dL/dalpha[b] = sum_f g[b, f] x0[b, f]
  dL/dstd[b]   = sum_f g[b, f] eps[b, f]            (eps regenerated from (seed, index))
so the forward writes only x_t and the backward rereads (g, x0) and recomputes eps: no [B, F] noise
tensor is kept between them. VE is alpha = 1, std = sigma; VP passes fastratio.noise's coefficients.
The per-sample sums are accumulated with atomic adds over feature blocks (order not deterministic on
the GPU, at float32 rounding level). The seed is read from a one-element int64 device tensor, so a
caller can draw it on the device (no host sync) and a captured CUDA graph sees a fresh seed per replay.
``row_offset`` lets a data-parallel rank generate exactly its rows of the global batch's noise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import LAUNCH, check_rows, row_block, row_grid

BLOCK, NUM_WARPS, MAX_REGISTERS = LAUNCH


@triton.jit
def _inject_kernel(x0_ptr, alpha_ptr, std_ptr, out_ptr, n_feat, seed_ptr, noise_offset, BLOCK_SIZE: tl.constexpr):
    row, idx, mask = row_block(n_feat, BLOCK_SIZE)
    seed = tl.load(seed_ptr)
    x0 = tl.load(x0_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr + row).to(tl.float32)
    std = tl.load(std_ptr + row).to(tl.float32)
    eps = tl.randn(seed, (idx + noise_offset).to(tl.int32))  # 32-bit Philox counter (the launcher bounds it)
    tl.store(out_ptr + idx, (alpha * x0 + std * eps).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _inject_backward_kernel(
    grad_ptr, x0_ptr, alpha_ptr, grad_x0_ptr, grad_alpha_ptr, grad_std_ptr, n_feat, seed_ptr, noise_offset, BLOCK_SIZE: tl.constexpr
):
    row, idx, mask = row_block(n_feat, BLOCK_SIZE)
    seed = tl.load(seed_ptr)
    g = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr + row).to(tl.float32)
    eps = tl.randn(seed, (idx + noise_offset).to(tl.int32))
    tl.store(grad_x0_ptr + idx, (alpha * g).to(grad_x0_ptr.dtype.element_ty), mask=mask)
    tl.atomic_add(grad_alpha_ptr + row, tl.sum(tl.where(mask, g * x0, 0.0), axis=0))
    tl.atomic_add(grad_std_ptr + row, tl.sum(tl.where(mask, g * eps, 0.0), axis=0))


@torch.library.custom_op("fastratio::noise_inject", mutates_args=())
def _noise_inject_op(x0: torch.Tensor, alpha: torch.Tensor, std: torch.Tensor, seed: torch.Tensor, row_offset: int) -> torch.Tensor:
    x0 = x0.contiguous()
    out = torch.empty_like(x0)
    if x0.numel():
        n_feat = x0[0].numel()
        _inject_kernel[row_grid(x0, BLOCK)](x0, alpha.contiguous(), std.contiguous(), out, n_feat, seed, row_offset * n_feat, BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS)
    return out


@_noise_inject_op.register_fake
def _(x0, alpha, std, seed, row_offset):
    return torch.empty_like(x0)


@torch.library.custom_op("fastratio::noise_inject_backward", mutates_args=())
def _noise_inject_backward_op(
    grad: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor, seed: torch.Tensor, row_offset: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad, x0 = grad.contiguous(), x0.contiguous()
    grad_x0 = torch.empty_like(x0)
    grad_alpha = torch.zeros(x0.shape[0], device=x0.device, dtype=torch.float32)
    grad_std = torch.zeros_like(grad_alpha)
    if x0.numel():
        n_feat = x0[0].numel()
        _inject_backward_kernel[row_grid(x0, BLOCK)](
            grad, x0, alpha.contiguous(), grad_x0, grad_alpha, grad_std, n_feat, seed, row_offset * n_feat, BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS
        )
    return grad_x0, grad_alpha, grad_std


@_noise_inject_backward_op.register_fake
def _(grad, x0, alpha, seed, row_offset):
    per_sample = x0.new_empty(x0.shape[0], dtype=torch.float32)
    return torch.empty_like(x0), per_sample, torch.empty_like(per_sample)


def _setup_context(ctx, inputs, output):
    x0, alpha, std, seed, row_offset = inputs
    ctx.save_for_backward(x0, alpha, seed)
    ctx.std_dtype, ctx.row_offset = std.dtype, row_offset


def _backward(ctx, grad):
    x0, alpha, seed = ctx.saved_tensors
    grad_x0, grad_alpha, grad_std = _noise_inject_backward_op(grad, x0, alpha, seed, ctx.row_offset)
    return grad_x0, grad_alpha.to(alpha.dtype), grad_std.to(ctx.std_dtype), None, None


_noise_inject_op.register_autograd(_backward, setup_context=_setup_context)


def noise_inject(x0: torch.Tensor, alpha: torch.Tensor, std: torch.Tensor, seed: int | torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """x_t = alpha[:, None] x0 + std[:, None] eps [B, ...], eps = Philox normal from (seed, element index).

    ``seed``: an int, or a one-element int64 tensor on x0's device (drawn there without a host sync).
    ``row_offset``: rows b of x0 take the noise of rows b + row_offset of a larger batch."""
    check_rows(x0, {"alpha": alpha, "std": std})
    if not isinstance(seed, torch.Tensor):
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed: must lie in [0, 2^63), got {seed}")
        seed = torch.tensor([int(seed)], dtype=torch.int64, device=x0.device)
    if seed.shape != (1,) or seed.dtype != torch.int64 or seed.device != x0.device:
        raise ValueError(f"seed: expected a one-element int64 tensor on {x0.device}, got {tuple(seed.shape)} {seed.dtype} on {seed.device}")
    if row_offset < 0:
        raise ValueError(f"row_offset: must be >= 0, got {row_offset}")
    if (row_offset + x0.shape[0]) * x0[0].numel() > 2**31:
        # Philox counters are 32-bit here: beyond 2^31 elements per global batch the noise would repeat.
        raise ValueError(f"x0: {(row_offset + x0.shape[0]) * x0[0].numel()} noise elements in the global batch exceed 2^31; split the batch")
    return _noise_inject_op(x0, alpha, std, seed, int(row_offset))


def noise_inject_reference(x0: torch.Tensor, alpha: torch.Tensor, std: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """PyTorch reference for a given eps (fastratio.noise.add_noise with explicit coefficients)."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return alpha.reshape(shape) * x0 + std.reshape(shape) * eps
