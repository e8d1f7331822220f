"""Data parallelism over ``torchrun`` ranks: set-up, one bucketed gradient all-reduce per iteration,
parameter/buffer broadcast from rank 0, and sums of metrics across ranks.

Local learning runs its own backward passes inside ``LocalModel.local_step``, so the model is not
wrapped in DistributedDataParallel: after the step the trainer averages every gradient across ranks
(DDP's semantics: the result is the gradient of the mean loss over all ranks' samples).
"""
from __future__ import annotations

import datetime
import os
import time
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


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1), else single process;
    a collective that waits longer than ``timeout_s`` for a rank fails instead of hanging."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank)


def lost_peer(exc: BaseException) -> bool:
    """True for the error a collective raises when another rank died or let it time out."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(mark in text for mark in (
        "Connection closed by peer", "Connection reset by peer", "Timed out waiting", "NCCL communicator",
        "gloo/transport"))


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


def _group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _reduce_bucket(bucket: list[torch.Tensor], group, async_op: bool):
    """Start (or run) one all_reduce(SUM) of a bucket's gradients flattened; -> (work, flat)."""
    flat = torch.cat([g.reshape(-1) for g in bucket])
    return dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=async_op), flat


def _unflatten_mean(bucket: list[torch.Tensor], flat: torch.Tensor, world: int) -> None:
    flat.div_(world)
    offset = 0
    for g in bucket:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def allreduce_gradients(parameters, world: int | None = None, bucket_bytes: int = BUCKET_BYTES,
                        group=None) -> None:
    """Average ``.grad`` over the ranks of ``group`` (default: all): flattened buckets, one all_reduce(SUM)
    each, scaled by 1/size.

    Parameters whose ``.grad`` is None are skipped; every rank runs the same model and schedule, so
    the set is the same on every rank.
    """
    world = _group_size(group) if world is None else world
    if world <= 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    for bucket in _buckets(grads, bucket_bytes):
        _, flat = _reduce_bucket(bucket, group, async_op=False)
        _unflatten_mean(bucket, flat, world)


class GradientReducer:
    """Data-parallel gradient averaging that overlaps the step: the schedule reports each group of
    parameters whose gradients are complete (``ready``, its ``on_grads_ready`` hook) and their
    all-reduce starts at once, in buckets, while later modules still compute; ``finish`` reduces what
    was never reported, waits for everything and divides by the group size (as DDP overlaps its
    all-reduce with the backward pass). ``waited_s``: time ``finish`` spent waiting, summed."""

    def __init__(self, parameters, group=None, bucket_bytes: int = BUCKET_BYTES):
        self.parameters, self.group, self.bucket_bytes = list(parameters), group, bucket_bytes
        self.world = _group_size(group)
        self.waited_s = 0.0
        self._reset()

    def _reset(self) -> None:
        self._started: list = []  # (work, flat, bucket)
        self._bucket: list[torch.Tensor] = []
        self._size = 0
        self._done: set[int] = set()

    def ready(self, params) -> None:
        """``params``' gradients are final for this step: queue them, starting a full bucket's all-reduce."""
        if self.world <= 1:
            return
        for p in params:
            if p.grad is None or id(p) in self._done:
                continue
            if self._bucket and (p.grad.dtype != self._bucket[0].dtype or self._size >= self.bucket_bytes):
                self._launch()
            self._done.add(id(p))
            self._bucket.append(p.grad)
            self._size += p.grad.numel() * p.grad.element_size()

    def _launch(self) -> None:
        if self._bucket:
            work, flat = _reduce_bucket(self._bucket, self.group, async_op=True)
            self._started.append((work, flat, self._bucket))
        self._bucket, self._size = [], 0

    def finish(self) -> None:
        """Reduce the rest, wait for every bucket, write the averages into ``.grad``."""
        if self.world <= 1:
            return
        self.ready(self.parameters)
        self._launch()
        start = time.perf_counter()
        for work, flat, bucket in self._started:
            work.wait()
            _unflatten_mean(bucket, flat, self.world)
        self.waited_s += time.perf_counter() - start
        self._reset()


def broadcast_state(module: torch.nn.Module, src: int = 0, buffers_only: bool = False, group=None) -> None:
    """Copy ``module``'s parameters (unless ``buffers_only``) and buffers from rank ``src`` (global) to every
    rank of ``group``; tensors on the meta device (parts another pipeline stage holds) are skipped."""
    if not dist.is_initialized() or _group_size(group) == 1:
        return
    # state_dict() also holds frozen parameters (EMA shadows) that parameters() may leave out; its
    # tensors share storage with the module's, so broadcasting into them updates the module.
    tensors = list(module.buffers()) if buffers_only else list(module.state_dict().values())
    with torch.no_grad():
        for t in tensors:
            if not t.is_meta:
                dist.broadcast(t, src, group=group)


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
