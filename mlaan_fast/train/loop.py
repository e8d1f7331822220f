"""The training loop: one ``local_step`` per batch (every module's local forward and backward), one
gradient all-reduce across ranks, one optimizer step, one EMA shadow update; per epoch an
evaluation, a metrics row and an atomic checkpoint.
"""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlaan_fast.models.graphed_step import GraphedLocalStep
from mlaan_fast.train import checkpoint as ckpt
from mlaan_fast.train.config import TrainConfig, format_config, save_yaml
from mlaan_fast.train.data import build_datasets, build_loaders, check_labels, steps_per_epoch
from mlaan_fast.train.distributed import (
    allreduce_gradients,
    broadcast_state,
    close_distributed,
    init_distributed,
    max_across,
    sum_across,
)
from mlaan_fast.train.metrics import MetricsLog, format_bytes, summarize, write_summary


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; nothing was saved over the last good checkpoint."""


@dataclass
class RunResult:
    """What :func:`train` returns: the trained model, its run folder and summary (empty off rank 0)."""

    model: torch.nn.Module
    run_dir: Path | None
    summary: dict


def pick_device(name: str) -> torch.device:
    """'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N'; ValueError if CUDA is absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but no CUDA device is available (use --device cpu)")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; optionally demand deterministic kernels (else cuDNN autotunes)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int):
    """Per-iteration schedule: linear warm-up to the base lr over ``warmup_steps``, then cosine to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD (Nesterov) over every trainable parameter: fused kernel on CUDA, foreach elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, **impl)


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_ON_CPU = (
    "note: --compile on a CPU: where it was measured (2 cores, 2 threads, ResNet-32 K=16, batch 64, fp32) "
    "compiling took 95 s, then mlaan steps ran at 0.91x the eager speed and dgl+mlaan steps at 1.5x "
    "(README: torch.compile)"
)


def autocast(device: torch.device, amp: str):
    """The autocast context for ``amp`` ('off', 'bf16', 'fp16') on ``device``'s type."""
    if amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def build_for_config(cfg: TrainConfig, num_classes: int, device: torch.device, info=None):
    """The LocalModel ``cfg`` describes, on ``device`` (channels_last if asked)."""
    from mlaan_fast.models import build_model

    options = cfg.model_kwargs()
    if "infopro" in cfg.method and info is not None:
        options.setdefault("mean", tuple(info.mean))
        options.setdefault("std", tuple(info.std))
    model = build_model(cfg.arch, num_classes=num_classes, K=cfg.K, method=cfg.method, **options).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _to_device(images, targets, device, channels_last: bool, num_classes: int):
    check_labels(targets, num_classes, "training batch")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return (images.to(device, non_blocking=True, memory_format=fmt), targets.to(device, non_blocking=True))


def train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, device, dinfo, epoch, steps,
                    num_classes, show_progress: bool = True, graphed=None):
    """Train ``steps`` batches (through ``graphed``, a GraphedLocalStep, when given); returns a dict of
    epoch statistics (global over ranks)."""
    from tqdm import tqdm

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum = correct = seen = None
    check_every = max(1, min(25, steps // 20))
    meter_peak = None
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it", leave=False,
               disable=not (show_progress and dinfo.is_main), dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for step, (images, targets) in enumerate(loader):
        if step >= steps:
            break
        images, targets = _to_device(images, targets, device, cfg.channels_last, num_classes)
        optimizer.zero_grad(set_to_none=True)
        if graphed is not None:
            out = graphed(images, targets, grad_scaler=scaler)
        else:
            meter = _activation_meter(model) if step == 0 and device.type == "cpu" and not cfg.compile else None
            with meter or nullcontext(), autocast(device, cfg.amp):
                out = model.local_step(images, targets, grad_scaler=scaler)
            if meter is not None:
                meter_peak = meter.peak_bytes
        allreduce_gradients(params, dinfo.world)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        model.update_shadows()

        n = targets.numel()
        losses = torch.stack([torch.as_tensor(x, device=device).float() for x in out["module_losses"]]) * n
        hits = (out["logits"].argmax(1) == targets).sum()
        loss_sum = losses if loss_sum is None else loss_sum + losses
        correct = hits if correct is None else correct + hits
        seen = n if seen is None else seen + n
        if (step + 1) % check_every == 0 or step + 1 == steps:
            totals = sum_across(loss_sum.tolist() + [float(correct), float(seen)], device)
            module_losses = [x / totals[-1] for x in totals[:-2]]
            _check_finite(module_losses, epoch, step)
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{sum(module_losses):.3f}", acc=f"{100 * totals[-2] / totals[-1]:.1f}%",
                            img_s=f"{totals[-1] / elapsed:.0f}", refresh=False)
        bar.update(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    bar.close()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else meter_peak
    return {"train_loss": sum(module_losses), "train_acc": 100.0 * totals[-2] / totals[-1],
            "module_loss": module_losses, "epoch_time_s": elapsed, "images_per_s": totals[-1] / elapsed,
            "peak_bytes": None if peak is None else int(max_across(float(peak), device)),
            "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "saved_activations"}


def _activation_meter(model):
    try:
        from mlaan_fast.profiling import ActivationMeter
    except ImportError:
        return None
    return ActivationMeter(exclude=model)


def _check_finite(module_losses: list[float], epoch: int, step: int) -> None:
    bad = [i for i, v in enumerate(module_losses) if not math.isfinite(v)]
    if bad:
        also = f" (also modules {bad[1:]})" if len(bad) > 1 else ""
        raise TrainingDiverged(f"training diverged: non-finite loss ({module_losses[bad[0]]}) in module "
                               f"{bad[0]}{also} at epoch {epoch + 1}, by step {step + 1}; nothing was saved "
                               "over the last checkpoint; try a smaller --lr or a longer --warmup-epochs")


@torch.inference_mode()
def evaluate(model, loader, device, amp: str = "off", channels_last: bool = False,
             num_classes: int | None = None):
    """(mean cross-entropy, accuracy %) of ``model``'s inference path over ``loader``, summed over ranks."""
    model.eval()
    loss = correct = seen = 0.0
    for images, targets in loader:
        if num_classes is not None:
            check_labels(targets, num_classes, "test batch")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        images, targets = images.to(device, memory_format=fmt), targets.to(device)
        with autocast(device, amp):
            logits = model(images)
        loss += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
        seen += targets.numel()
    loss, correct, seen = sum_across([loss, correct, seen], device)
    return loss / max(seen, 1), 100.0 * correct / max(seen, 1)


def choose_run_dir(cfg: TrainConfig, resume: str | None) -> Path:
    """``--out`` if given; on resume the checkpoint's folder; else a fresh ``runs/<dataset>-<arch>-...``."""
    if cfg.out:
        return Path(cfg.out)
    if resume:
        return Path(resume).parent if Path(resume).suffix == ".pt" else Path(resume)
    base = Path("runs") / f"{cfg.dataset}-{cfg.arch}-{cfg.method.replace('+', '_')}-K{cfg.K}"
    path, n = base, 1
    while (path / "last.pt").exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def train(cfg: TrainConfig, resume: str | None = None, verbose: bool = True,
          stop_after: int | None = None) -> RunResult:
    """Run (or continue, given a checkpoint path ``resume``) the training ``cfg`` describes.

    ``stop_after``: leave after that many completed epochs (the schedule still spans ``cfg.epochs``).
    """
    device = pick_device(cfg.device)
    dist_info = init_distributed(device.type)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    main = dist_info.is_main
    say = print if verbose and main else (lambda *a, **k: None)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        seed_everything(cfg.seed, cfg.deterministic)
        train_set, test_set, info = build_datasets(cfg.dataset, cfg.data_dir)
        model = build_for_config(cfg, info.num_classes, device, info)
        state = ckpt.load_checkpoint(resume) if resume else None
        if state is not None:
            ckpt.check_compatible(state, model.config, cfg.to_dict(), path=str(resume))
            model.load_state_dict(state["model"])
        broadcast_state(model)
        if cfg.compile:
            model.compile_modules()
            if device.type == "cpu":
                say(COMPILE_ON_CPU)
        model.set_target_checks(False)  # every batch's labels are checked on the host (_to_device)
        graphed = None
        if cfg.cuda_graphs:
            if device.type != "cuda":
                raise ValueError(f"cuda_graphs: CUDA graphs need a CUDA device, this run uses {device}")
            graphed = GraphedLocalStep(model, amp_dtype=AMP_DTYPES[cfg.amp])
        run_dir = choose_run_dir(cfg, resume)
        if state is None and (run_dir / "last.pt").exists():
            raise FileExistsError(f"{run_dir} already holds a run (last.pt); continue it with --resume "
                                  f"{run_dir / 'last.pt'} or choose another --out")
        cfg.out = str(run_dir)
        loader, sampler, test_loader = build_loaders(train_set, test_set, cfg.batch_size, cfg.seed,
                                                     cfg.workers, dist_info.rank, dist_info.world,
                                                     pin_memory=device.type == "cuda")
        steps = steps_per_epoch(loader, cfg.max_steps_per_epoch)
        optimizer = make_optimizer(model, cfg, device)
        scheduler = warmup_cosine(optimizer, round(cfg.warmup_epochs * steps), cfg.epochs * steps)
        scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
        start_epoch, best_acc = 0, -1.0
        if state is not None:
            ckpt.restore_training_state(state, optimizer, scheduler, scaler, sampler)
            start_epoch, best_acc = state["epoch"], state["best_acc"]
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, run_dir / "config.yaml")
            metrics = MetricsLog(run_dir)
            metrics.keep_epochs_before(start_epoch + 1)
        n_params = sum(p.numel() for p in model.inference_parameters())
        say(f"mlaan-fast train: {cfg.arch} {cfg.method} K={cfg.K} on {cfg.dataset} ({len(train_set)} train / "
            f"{len(test_set)} test images), device {device}, {dist_info.world} process(es), "
            f"{n_params / 1e6:.2f} M inference parameters")
        say(f"resolved config (saved to {run_dir / 'config.yaml'}):\n{format_config(cfg)}")
        if start_epoch:
            say(f"resumed from {resume} after epoch {start_epoch} of {cfg.epochs}")

        for epoch in range(start_epoch, cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)):
            sampler.set_epoch(epoch)
            stats = train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, device, dist_info,
                                    epoch, steps, info.num_classes, show_progress=verbose, graphed=graphed)
            broadcast_state(model, buffers_only=True)  # BatchNorm statistics of rank 0, as DDP does
            test_loss, test_acc = evaluate(model, test_loader, device, cfg.amp, cfg.channels_last,
                                           info.num_classes)
            row = {"epoch": epoch + 1, **stats, "test_loss": test_loss, "test_acc": test_acc,
                   "lr": scheduler.get_last_lr()[0]}
            say(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f} "
                f"acc {row['train_acc']:.2f}%  test loss {test_loss:.4f} acc {test_acc:.2f}%  "
                f"{row['epoch_time_s']:.1f}s  "
                f"{row['images_per_s']:.0f} img/s  peak mem {format_bytes(row['peak_bytes'])} "
                f"({row['peak_kind'].replace('_', ' ')})")
            if main:
                metrics.append(row)
                improved, best_acc = test_acc > best_acc, max(best_acc, test_acc)
                state = ckpt.training_state(cfg, model, optimizer, scheduler, scaler, sampler, epoch + 1,
                                            (epoch + 1) * steps, best_acc, test_acc)
                ckpt.save_checkpoint(state, run_dir / "last.pt")
                if improved:
                    ckpt.save_checkpoint(state, run_dir / "best.pt")

        summary = {}
        if main:
            summary = summarize(metrics.rows, run_dir=str(run_dir), arch=cfg.arch, method=cfg.method, K=cfg.K,
                                dataset=cfg.dataset, device=str(device), world_size=dist_info.world,
                                inference_parameters=n_params)
            write_summary(run_dir, summary)
            if metrics.rows:
                say(f"done: best test acc {summary['best_test_acc']:.2f}%, final "
                    f"{summary['final_test_acc']:.2f}%, {summary['train_time_s']:.1f}s training; wrote "
                    f"config.yaml, metrics.jsonl, metrics.csv, summary.json, last.pt, best.pt in {run_dir}")
        return RunResult(model, run_dir, summary)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        close_distributed()
