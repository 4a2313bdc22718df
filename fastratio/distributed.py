"""torch.distributed for ``torchrun --nproc_per_node=K -m fastratio.train CONFIG``.

Data parallel: every rank holds every network; the trained ones are wrapped in DDP so their
gradients are averaged in backward (the generator's surrogate backward included: it runs through
the DDP-wrapped generator). Randomness follows ``fastratio.shard`` (one global draw, each rank its
rows), so K ranks with per-rank batch B/K reproduce one process with batch B. Rank 0 alone writes
the run folder (config, metrics, plots, checkpoints); metrics are averaged over ranks first.
NCCL on CUDA, gloo on CPU. Without torchrun (no WORLD_SIZE) everything here is a no-op.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str, resolve) -> Context:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(0, 1, 0, resolve(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank}: only {torch.cuda.device_count()} CUDA devices on this node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world, local_rank, device)


def wrap(module: nn.Module, ctx: Context) -> nn.Module:
    """DDP wrapper for a trained network (the module itself on one process)."""
    if ctx.world == 1:
        return module
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Buffers (resample filters, frequencies) are constants, equal on every rank: no per-forward sync.
    # torch 2.14 renamed the switch; the GPU machine's 2.11 has only the old name.
    ddp = nn.parallel.DistributedDataParallel
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters else {"broadcast_buffers": False}
    return ddp(module, device_ids=ids, **no_sync)


def mean_over_ranks(values: dict[str, float], ctx: Context) -> dict[str, float]:
    if ctx.world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / ctx.world).tolist()))


def any_rank(flag: bool, ctx: Context) -> bool:
    """True on every rank if it is True on one (a stop request, a divergence)."""
    if ctx.world == 1:
        return flag
    t = torch.tensor([float(flag)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(ctx: Context) -> None:
    if ctx.world > 1:
        dist.barrier()


def teardown(ctx: Context) -> None:
    if ctx.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
