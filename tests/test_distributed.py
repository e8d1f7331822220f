"""Data parallelism on CPU with gloo and 2 processes.

What is exactly equivalent: 2 ranks with micro-batches b0, b1 == one process that runs ``local_step``
on b0 and then b1 (gradients accumulate), halves the gradients and steps. Each rank normalises with
its own micro-batch statistics, so the comparison is not against one step on the concatenated batch
(BatchNorm would see other statistics); BatchNorm running averages are excluded from the comparison
with the single process (it updates them twice per step), and are identical across ranks (rank 0's
are broadcast after each epoch, as DDP does).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp
from tolerance import assert_all_close_scaled

from mlaan_fast.runtime.distributed import GradientReducer, allreduce_gradients
from mlaan_fast.train import loop
from mlaan_fast.train.config import TrainConfig, resolve_config
from mlaan_fast.train.data import build_datasets, build_loaders

CFG = dict(
    dataset="synthetic",
    arch="resnet20",
    method="mlaan",
    K=2,
    batch_size=16,
    epochs=1,
    max_steps_per_epoch=2,
    workers=0,
    device="cpu",
    lr=0.05,
    warmup_epochs=0,
)
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, cfg: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    # bucketed all-reduce: two dtypes, buckets far smaller than the tensors
    params = [
        torch.nn.Parameter(torch.zeros(n, dtype=dt))
        for n, dt in ((5, torch.float32), (300, torch.float32), (7, torch.float64), (3, torch.float32))
    ]
    for p in params:
        p.grad = torch.arange(p.numel(), dtype=p.dtype) * (rank + 1)
    allreduce_gradients(params, world, bucket_bytes=64)
    torch.save([p.grad for p in params], os.path.join(out_dir, f"grads{rank}.pt"))
    # the overlapping reducer: two groups reported early (their buckets start at once), the rest at finish
    for p in params:
        p.grad = torch.arange(p.numel(), dtype=p.dtype) * (rank + 1)
    reducer = GradientReducer(params, bucket_bytes=64)
    reducer.ready(params[:2])
    reducer.ready(params[1:2])  # reported twice: reduced once
    reducer.finish()
    torch.save([p.grad for p in params], os.path.join(out_dir, f"overlapped{rank}.pt"))
    result = loop.train(TrainConfig(**cfg), verbose=False)  # joins the existing group, closes it at the end
    torch.save(result.model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


def _single_process_reference(cfg: TrainConfig, world: int) -> dict:
    """One process replaying every rank's micro-batch per step, gradients averaged, one step.

    It runs on one thread, as each rank does: CPU convolutions round differently with another
    thread count, and two training steps can grow that rounding past the tolerance (seen: 7e-5
    on the first convolution's weight with 2 threads against 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _replay_ranks(cfg, world)
    finally:
        torch.set_num_threads(threads)


def _replay_ranks(cfg: TrainConfig, world: int) -> dict:
    cpu = torch.device("cpu")
    loop.seed_everything(cfg.seed, deterministic=False)
    train_set, test_set, info = build_datasets(cfg.dataset, cfg.data_dir)
    model = loop.build_for_config(cfg, info.num_classes, cpu, info)
    shards = [
        build_loaders(train_set, test_set, cfg.batch_size, cfg.seed, 0, rank=r, world=world)[:2]
        for r in range(world)
    ]
    steps = min(len(shards[0][0]), cfg.max_steps_per_epoch)
    opt = loop.make_optimizer(model, cfg, cpu)
    sched = loop.warmup_cosine(opt, round(cfg.warmup_epochs * steps), cfg.epochs * steps)
    for epoch in range(cfg.epochs):
        for _, sampler in shards:
            sampler.set_epoch(epoch)
        model.train()
        for step, batches in enumerate(zip(*(loader for loader, _ in shards))):
            if step == steps:
                break
            opt.zero_grad(set_to_none=True)
            for images, targets in batches:
                model.local_step(images, targets)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.div_(world)
            opt.step()
            sched.step()
            model.update_shadows()
    return model.state_dict()


def test_gloo_two_ranks_match_each_other_and_single_process(tmp_path):
    cfg = dict(resolve_config({**CFG, "out": str(tmp_path / "run")}).to_dict())
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), cfg), nprocs=2, join=True)

    for rank in (0, 1):
        for name in ("grads", "overlapped"):
            for n, g in zip((5, 300, 7, 3), torch.load(tmp_path / f"{name}{rank}.pt")):
                torch.testing.assert_close(g, torch.arange(n, dtype=g.dtype) * 1.5, rtol=0, atol=0)

    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    differ = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert not differ, f"ranks disagree on {differ[:5]}"

    ref = _single_process_reference(TrainConfig(**cfg), world=2)
    compared = [k for k in ref if not k.endswith(BN_STATS)]
    # The ranks' gradients are summed by an all-reduce, the reference's by one backward over both
    # micro-batches: another order, so each floating tensor is compared to its own magnitude.
    floating = [k for k in compared if ref[k].is_floating_point()]
    assert_all_close_scaled({k: r0[k] for k in floating}, {k: ref[k] for k in floating})
    for k in set(compared) - set(floating):
        assert torch.equal(r0[k], ref[k]), k
    moved = [k for k in compared if r0[k].is_floating_point()]
    assert moved, "no floating-point state compared"
    assert (tmp_path / "run" / "last.pt").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 writes once


def test_torchrun_cli_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "mlaan_fast",
        "train",
        "--dataset",
        "synthetic",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--epochs",
        "1",
        "--max-steps-per-epoch",
        "2",
        "--batch-size",
        "16",
        "--K",
        "2",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("resolved config") == 1 and "2 process(es)" in done.stdout  # rank 0 speaks
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "last.pt").is_file() and (out / "summary.json").is_file()
