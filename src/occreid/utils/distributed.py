"""torch.distributed helpers (``torchrun``): init, rank queries, gathers."""

from __future__ import annotations

import os
from typing import List

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Initialise the process group when launched by ``torchrun`` (WORLD_SIZE > 1).

    Uses NCCL for CUDA devices and gloo otherwise. Returns True when distributed.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or is_dist():
        return is_dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors of different first-dimension sizes from all ranks (rank order)."""
    if not is_dist():
        return x
    world = get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_l: List[int] = [int(s.item()) for s in sizes]
    maxn = max(sizes_l)
    pad = x.new_zeros((maxn - x.shape[0],) + tuple(x.shape[1:]))
    xp = torch.cat([x, pad], 0)
    out = [torch.empty_like(xp) for _ in range(world)]
    dist.all_gather(out, xp.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes_l)], 0)


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over all processes (no-op without a process group)."""
    if is_dist():
        dist.all_reduce(x)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return x
    y = x.clone()
    dist.all_reduce(y)
    return y / get_world_size()
