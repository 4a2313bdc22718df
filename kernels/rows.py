"""Shared pieces of the per-sample ("row") kernels: a batch [B, ...] is viewed as B rows of F
features, launched on a (B, cdiv(F, BLOCK)) grid with per-row scalars (alpha, std, logit, w)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Every kernel's launch shape: 1024 elements over 8 warps is 4 per thread, one 128-bit load of fp32
# each, and at most 32 registers per thread, the budget for full occupancy (2048 threads of an
# H100/A100 SM share 64K registers); maxnreg holds ptxas to it (sm_80 took 40 for the unaligned noise
# backward otherwise), without spills. Checked by compiling for sm_90/sm_80 (fastratio.kernels.gpu_build).
LAUNCH = (1024, 8, 32)  # (BLOCK, num_warps, maxnreg)


@triton.jit
def row_block(n_feat, BLOCK_SIZE: tl.constexpr):
    """(row, flat element index, in-bounds mask) of this program's block. The index is 64-bit: row *
    n_feat in 32 bits would wrap for batches of 2^31 elements or more."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    return row, row * n_feat + cols, cols < n_feat


def row_grid(x: torch.Tensor, block: int) -> tuple[int, int]:
    return (x.shape[0], triton.cdiv(x[0].numel(), block))


def check_launchable(t: torch.Tensor, name: str) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under its interpreter (TRITON_INTERPRET=1)."""
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name}: on {t.device}; the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 on the CPU "
                         "(run.kernels=torch runs the PyTorch references)")


def check_rows(x0: torch.Tensor, per_sample: dict[str, torch.Tensor], same_shape: dict[str, torch.Tensor] | None = None) -> None:
    """x0 [B, ...] float; each per_sample tensor [B] and each same_shape tensor like x0, all on x0's
    device, each of a floating dtype."""
    check_launchable(x0, "x0")
    if x0.dim() < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0: expected shape [B, ...] with B > 0, got {tuple(x0.shape)}")
    if x0.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x0: dtype {x0.dtype} not supported (float32, bfloat16, float16)")
    for name, t in (same_shape or {}).items():
        if t.shape != x0.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match x0 {tuple(x0.shape)}")
    for name, t in per_sample.items():
        if t.shape != (x0.shape[0],):
            raise ValueError(f"{name}: expected shape [{x0.shape[0]}], got {tuple(t.shape)}")
    for name, t in {**(same_shape or {}), **per_sample}.items():
        if t.device != x0.device:
            raise ValueError(f"{name}: on {t.device}, x0 on {x0.device}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} not supported (float32, bfloat16, float16)")
