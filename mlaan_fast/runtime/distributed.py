"""Data parallelism over ``torchrun`` ranks: set-up, one bucketed gradient all-reduce per iteration,
parameter/buffer broadcast from rank 0, and sums of metrics across ranks.

Local learning runs its own backward passes inside ``LocalModel.local_step``, so the model is not
wrapped in DistributedDataParallel: after the step the trainer averages every gradient across ranks
(DDP's semantics: the result is the gradient of the mean loss over all ranks' samples).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2**20


@dataclass(frozen=True)
class DistInfo:
    """This process's place: rank, number of ranks, and GPU index on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1), else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank)


def close_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int):
    """Consecutive groups of same-dtype/device tensors of about ``bucket_bytes`` each."""
    bucket, size = [], 0
    for t in tensors:
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device or size >= bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def allreduce_gradients(parameters, world: int, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average ``.grad`` over all ranks: flatten into buckets, one all_reduce(SUM) each, scale by 1/world.

    Parameters whose ``.grad`` is None are skipped; every rank runs the same model and schedule, so
    the set is the same on every rank.
    """
    if world <= 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    for bucket in _buckets(grads, bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_state(module: torch.nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Copy ``module``'s parameters (unless ``buffers_only``) and buffers from rank ``src`` to every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    # state_dict() also holds frozen parameters (EMA shadows) that parameters() may leave out; its
    # tensors share storage with the module's, so broadcasting into them updates the module.
    tensors = list(module.buffers()) if buffers_only else list(module.state_dict().values())
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src)


def sum_across(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of a list of numbers over all ranks (identity without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def max_across(value: float, device: torch.device) -> float:
    """The largest ``value`` over all ranks (identity without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()
