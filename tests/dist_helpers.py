"""Multi-process tests on the CPU: processes spawned by the test, gloo, free ports, one thread each."""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, world: int, port: int) -> None:
    """What torchrun would set for ``rank``; one OpenMP thread (the machine has few cores)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _run(rank: int, world: int, port: int, fn, args) -> None:
    rank_environment(rank, world, port)
    fn(rank, *args)


def spawn(fn, world: int, *args, join: bool = True):
    """Run ``fn(rank, *args)`` in ``world`` processes with torchrun's environment; raises if one fails."""
    return mp.start_processes(_run, args=(world, free_port(), fn, args), nprocs=world, join=join,
                              start_method="spawn")
