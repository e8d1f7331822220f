"""The training loop: one ``local_step`` per batch (every module's local forward and backward), one
gradient all-reduce across ranks, one optimizer step, one EMA shadow update; per epoch an
evaluation, a metrics row and an atomic checkpoint.
"""
from __future__ import annotations

import errno
import math
import os
import random
import re
import shlex
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlaan_fast.runtime.distributed import (
    broadcast_state,
    close_distributed,
    init_distributed,
    max_across,
    sum_across,
)
from mlaan_fast.train import checkpoint as ckpt
from mlaan_fast.train.config import TrainConfig, check_device_name, format_config, save_yaml
from mlaan_fast.train.data import build_datasets, build_loaders, check_labels, steps_per_epoch
from mlaan_fast.train.metrics import MetricsLog, format_bytes, summarize, write_summary
from mlaan_fast.train.placement import build_runner, check_ranks_agree, pipeline_shape
from mlaan_fast.train.runfolder import RunFolder, describe_os_error


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; nothing was saved over the last good checkpoint."""


@dataclass
class RunResult:
    """What :func:`train` returns: the trained model, its run folder and summary (empty off rank 0)."""

    model: torch.nn.Module
    run_dir: Path | None
    summary: dict


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; ``checkpoint`` is what resumes it (None: nothing saved yet)."""

    def __init__(self, run_dir: Path | None, checkpoint: Path | None):
        super().__init__()
        self.run_dir, self.checkpoint = run_dir, checkpoint


def pick_device(name: str) -> torch.device:
    """'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N'; ValueError if the name is unknown
    or the device absent."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but no CUDA device is available (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: {name!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def check_backend_env(device: torch.device) -> None:
    """Refuse (ValueError) an MLAAN_FAST_BACKEND naming no backend, or one that cannot run on ``device``."""
    from mlaan_fast.ops import BACKENDS, BackendUnavailableError, select_backend, use_backend
    from mlaan_fast.ops._backend import ENV_VAR

    if not os.environ.get(ENV_VAR):
        return
    try:
        select_backend(ENV_VAR, device)
    except (ValueError, BackendUnavailableError) as exc:
        usable = []
        for name in BACKENDS:
            with use_backend(name):
                with suppress(BackendUnavailableError):
                    usable.append(select_backend(ENV_VAR, device))
        raise ValueError(f"{exc}; unset {ENV_VAR} or set it to one of: {', '.join(usable)} "
                         f"(on {device.type})") from None


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


def train_one_epoch(runner, loader, optimizer, scheduler, scaler, cfg, device, dinfo, epoch, steps,
                    num_classes, show_progress: bool = True):
    """Train ``steps`` batches through ``runner`` (a runtime ModelRunner or PipelineRunner); returns a dict
    of epoch statistics (global over ranks)."""
    from tqdm import tqdm

    runner.train()
    model = runner.model
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
        meter = _activation_meter(model) if step == 0 and device.type == "cpu" and not cfg.compile else None
        with meter or nullcontext():
            out = runner.step(images, targets, grad_scaler=scaler)
        if meter is not None:
            meter_peak = meter.peak_bytes
        runner.reduce_gradients()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        runner.update_shadows()

        # Each module's loss comes from the rank that holds it (pipeline stages hold some, 0 elsewhere);
        # samples are counted by the ranks that count them, hits where the logits are.
        n = targets.numel()
        losses = torch.stack([torch.as_tensor(x, device=device).float() for x in out["module_losses"]]) * n
        hits = (out["logits"].argmax(1) == targets).sum() if out["logits"] is not None else 0
        n = n if runner.counts_samples else 0
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
    """(mean cross-entropy, accuracy %) of the inference path over ``loader``, summed over ranks;
    ``model``: a LocalModel or a runtime runner (a pipeline stage has logits on the last stage only)."""
    model.eval()
    infer = getattr(model, "infer", model)
    loss = correct = seen = 0.0
    for images, targets in loader:
        if num_classes is not None:
            check_labels(targets, num_classes, "test batch")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        images, targets = images.to(device, memory_format=fmt), targets.to(device)
        with autocast(device, amp):
            logits = infer(images)
        if logits is None:
            continue
        loss += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
        seen += targets.numel()
    loss, correct, seen = sum_across([loss, correct, seen], device)
    return loss / max(seen, 1), 100.0 * correct / max(seen, 1)


def checkpoint_folder(resume: str | Path) -> Path:
    """The folder a checkpoint lives in (``resume`` itself when it names a folder)."""
    path = Path(resume)
    return path if path.is_dir() else path.parent


def choose_run_dir(cfg: TrainConfig, resume: str | None, state: dict | None = None) -> Path:
    """On resume the checkpoint's own folder, wherever it now lives (unless ``cfg.out`` was changed from
    the checkpoint's ``state``); else ``--out`` if given, or a fresh ``runs/<dataset>-<arch>-...``."""
    saved_out = state["config"].get("out") if state is not None else None
    if resume and (not cfg.out or cfg.out == saved_out):
        return checkpoint_folder(resume)
    if cfg.out:
        return Path(cfg.out)
    base = Path("runs") / f"{cfg.dataset}-{cfg.arch}-{cfg.method.replace('+', '_')}-K{cfg.K}"
    path, n = base, 1
    while (path / "last.pt").exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def claim_run_dir(run_dir: Path, resume: str | None) -> RunFolder:
    """Create, probe and lock ``run_dir``; refuse a folder holding another run (FileExistsError)."""
    folder = RunFolder(run_dir)
    continuing = resume is not None and checkpoint_folder(resume).resolve() == run_dir.resolve()
    if not continuing and (run_dir / "last.pt").exists():
        folder.release()
        raise FileExistsError(f"{run_dir} already holds a run (last.pt); continue it with --resume "
                              f"{run_dir / 'last.pt'} or choose another --out")
    return folder


def train(cfg: TrainConfig, resume: str | None = None, verbose: bool = True,
          stop_after: int | None = None) -> RunResult:
    """Run (or continue, given a checkpoint path ``resume``) the training ``cfg`` describes.

    ``stop_after``: leave after that many completed epochs (the schedule still spans ``cfg.epochs``).
    Bad settings, data and checkpoints are refused before the first epoch, leaving no run folder behind
    (nor changing an existing one); the folder is locked against a second trainer while this one runs.
    """
    device = pick_device(cfg.device)
    check_backend_env(device)
    dist_info = init_distributed(device.type, cfg.comm_timeout)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    main = dist_info.is_main
    say = print if verbose and main else (lambda *a, **k: None)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    run_dir = folder = None
    training = False  # until the first epoch starts, a failure removes a run folder this call created
    try:
        state = ckpt.load_checkpoint(resume) if resume else None
        run_dir = choose_run_dir(cfg, resume, state)
        folder = claim_run_dir(run_dir, resume) if main else None
        check_ranks_agree(cfg, dist_info)
        seed_everything(cfg.seed, cfg.deterministic)
        train_set, test_set, info = build_datasets(cfg.dataset, cfg.data_dir)
        pipelined = cfg.pipeline_stages > 1
        # A pipeline stage is cut from the whole model on the CPU; only its own parts reach the device.
        model = build_for_config(cfg, info.num_classes, torch.device("cpu") if pipelined else device, info)
        if pipelined:
            pipeline_shape(cfg, dist_info, model.num_modules)
        if state is not None:
            ckpt.check_compatible(state, model.config, cfg.to_dict(), path=str(resume))
            ckpt.load_model_state(model, state, resume)
        if not pipelined:
            broadcast_state(model)
        if cfg.compile:
            model.compile_modules()
            if device.type == "cpu":
                say(COMPILE_ON_CPU)
        if cfg.cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs: CUDA graphs need a CUDA device, this run uses {device}")
        cfg.out = str(run_dir)
        replicas = dist_info.world // cfg.pipeline_stages
        replica = dist_info.rank // cfg.pipeline_stages
        loader, sampler, test_loader = build_loaders(train_set, test_set, cfg.batch_size, cfg.seed,
                                                     cfg.workers, replica, replicas, drop_last=cfg.drop_last,
                                                     pin_memory=device.type == "cuda")
        steps = steps_per_epoch(loader, cfg.max_steps_per_epoch)
        if steps == 0:
            if replicas > 1:
                size = (f"{cfg.batch_size} ({loader.batch_size} per process) is larger than this process's "
                        f"{len(loader.sampler)}")
            else:
                size = f"{cfg.batch_size} is larger than the {len(train_set)}"
            raise ValueError(f"batch_size: {size} training images, and drop_last leaves out a short batch: "
                             "no step would train; use a smaller --batch-size or --no-drop-last")
        first_batch = next(iter(loader)) if pipelined and cfg.partition == "measured" else None
        runner = build_runner(cfg, model, device, dist_info, first_batch,
                              lambda: build_for_config(cfg, info.num_classes, torch.device("cpu"), info), say)
        optimizer = make_optimizer(runner, cfg, device)
        scheduler = warmup_cosine(optimizer, round(cfg.warmup_epochs * steps), cfg.epochs * steps)
        scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
        start_epoch, best_acc = 0, -1.0
        if state is not None:
            if pipelined:
                state = {**state, "optimizer": runner.pipeline.stage_optimizer_state(state["optimizer"])}
            ckpt.restore_training_state(state, optimizer, scheduler, scaler, sampler, path=resume)
            start_epoch, best_acc = state["epoch"], state["best_acc"]
        if main:
            _write_config(cfg, run_dir)
            metrics = _metrics_for(run_dir, state)
        training = True
        n_params = sum(p.numel() for p in model.inference_parameters())
        say(f"mlaan-fast train: {cfg.arch} {cfg.method} K={cfg.K} on {cfg.dataset} ({len(train_set)} train / "
            f"{len(test_set)} test images), device {device}, {dist_info.world} process(es), "
            f"{n_params / 1e6:.2f} M inference parameters")
        say(f"resolved config (saved to {run_dir / 'config.yaml'}):\n{format_config(cfg)}")
        if start_epoch:
            say(f"resumed from {resume} after epoch {start_epoch} of {cfg.epochs}")

        for epoch in range(start_epoch, cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)):
            sampler.set_epoch(epoch)
            stats = train_one_epoch(runner, loader, optimizer, scheduler, scaler, cfg, device, dist_info,
                                    epoch, steps, info.num_classes, show_progress=verbose)
            runner.drain()  # an async pipeline ends each epoch as a run resumed from its checkpoint starts
            if cfg.precise_bn:
                _recompute_batchnorm(model, loader, cfg, device, info.num_classes)
            runner.broadcast_buffers()  # BatchNorm statistics of the first replica, as DDP does
            test_loss, test_acc = evaluate(runner, test_loader, device, cfg.amp, cfg.channels_last,
                                           info.num_classes)
            row = {"epoch": epoch + 1, **stats, "test_loss": test_loss, "test_acc": test_acc,
                   "lr": scheduler.get_last_lr()[0]}
            say(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f} "
                f"acc {row['train_acc']:.2f}%  test loss {test_loss:.4f} acc {test_acc:.2f}%  "
                f"{row['epoch_time_s']:.1f}s  "
                f"{row['images_per_s']:.0f} img/s  peak mem {format_bytes(row['peak_bytes'])} "
                f"({row['peak_kind'].replace('_', ' ')})")
            _check_epoch_state(runner, optimizer, test_loss, epoch, test_loader, device, cfg)
            whole = runner.whole_state(optimizer)
            if main:
                improved, best_acc = test_acc > best_acc, max(best_acc, test_acc)
                state = ckpt.training_state(cfg, model, optimizer, scheduler, scaler, sampler, epoch + 1,
                                            (epoch + 1) * steps, best_acc, test_acc, metrics.rows + [row],
                                            whole_state=whole)
                _save_epoch(run_dir, state, improved, metrics, row)

        summary = {}
        if main:
            summary = summarize(metrics.rows, run_dir=str(run_dir), arch=cfg.arch, method=cfg.method, K=cfg.K,
                                dataset=cfg.dataset, device=str(device), world_size=dist_info.world,
                                inference_parameters=n_params)
            if cfg.compare_end_to_end and metrics.rows:
                summary["end_to_end_comparison"] = _compare_with_end_to_end(cfg, model, loader, device, info,
                                                                            dist_info.world, say)
            write_summary(run_dir, summary)
            if metrics.rows:
                say(f"done: best test acc {summary['best_test_acc']:.2f}%, final "
                    f"{summary['final_test_acc']:.2f}%, {summary['train_time_s']:.1f}s training; wrote "
                    f"config.yaml, metrics.jsonl, metrics.csv, summary.json, last.pt, best.pt in {run_dir}")
        return RunResult(model, run_dir, summary)
    except KeyboardInterrupt:
        raise TrainingInterrupted(run_dir, _resumable(run_dir, resume)) from None
    finally:
        if folder is not None and training:
            folder.release()
        elif folder is not None:
            folder.discard()
        torch.use_deterministic_algorithms(was_deterministic)
        close_distributed()


def _recompute_batchnorm(model, loader, cfg: TrainConfig, device, num_classes: int) -> None:
    """Before evaluating: the backbone's BatchNorm statistics from the epoch's first ``cfg.precise_bn``
    training images (:mod:`mlaan_fast.train.precise_bn`); each data-parallel rank uses its own shard."""
    from mlaan_fast.train.precise_bn import recompute_batchnorm_statistics

    batches = (_to_device(images, targets, device, cfg.channels_last, num_classes)[0]
               for images, targets in loader)
    recompute_batchnorm_statistics(model.local_modules, batches, cfg.precise_bn)


def _compare_with_end_to_end(cfg: TrainConfig, model, loader, device, info, world: int, say) -> dict | None:
    """The run's network and the same one trained end to end, one step each on the first training batch
    (:mod:`mlaan_fast.train.compare`); printed, and returned for summary.json. One process only."""
    from dataclasses import replace

    from mlaan_fast.train.compare import compare_with_end_to_end, format_comparison

    if world > 1:
        say("compare_end_to_end: skipped (it measures one whole model in one process)")
        return None
    images, targets = _to_device(*next(iter(loader)), device, cfg.channels_last, info.num_classes)
    local = build_for_config(cfg, info.num_classes, device, info)
    local.load_state_dict(model.state_dict())
    end_to_end = build_for_config(replace(cfg, method="e2e", K=1, options={}), info.num_classes, device, info)
    result = compare_with_end_to_end(local.train(), end_to_end.train(), images, targets)
    say(format_comparison(result, cfg.method, cfg.K, cfg.arch, device))
    return result


def _write_config(cfg: TrainConfig, run_dir: Path) -> None:
    """``run_dir/config.yaml``, written atomically (a full disk leaves the previous one)."""
    path = run_dir / "config.yaml"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_yaml(cfg, tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)
        raise


def _metrics_for(run_dir: Path, state: dict | None) -> MetricsLog:
    """The run's metrics log, made to agree with the checkpoint it continues from: the checkpoint's own
    rows where it has them (a crash between checkpoint and metrics, a torn or lost file), else the
    file's rows up to the checkpoint's epoch."""
    if state is None or "metrics" in state:
        log = MetricsLog(run_dir, rows=[])
        log.replace(state["metrics"] if state is not None else [])
        return log
    log = MetricsLog(run_dir)
    log.keep_epochs_before(state["epoch"] + 1)
    return log


def _save_epoch(run_dir: Path, state: dict, improved: bool, metrics: MetricsLog, row: dict) -> None:
    """best.pt (if ``improved``), then last.pt, then the metrics row: an epoch whose checkpoint failed is
    not recorded, and a crash after the checkpoint leaves its rows in it for the resume to restore."""
    epoch = state["epoch"]
    paths = ([run_dir / "best.pt"] if improved else []) + [run_dir / "last.pt"]
    try:
        ckpt.save_checkpoint(state, *paths)
    except ckpt.CheckpointWriteError as exc:
        hint = _resume_hint(run_dir, exc.errno)
        raise ckpt.CheckpointWriteError(f"epoch {epoch} was not saved: {exc}; {hint}", exc.errno) from None
    try:
        metrics.append(row)
    except OSError as exc:
        hint = _resume_hint(run_dir, exc.errno)
        raise ckpt.CheckpointWriteError(f"epoch {epoch} is saved in {run_dir / 'last.pt'} but its metrics "
                                        f"could not be written ({describe_os_error(exc)}); {hint} (the "
                                        "resume rewrites them)", exc.errno) from None


def _resume_hint(run_dir: Path, error: int | None) -> str:
    fix = "free some space" if error == errno.ENOSPC else "fix that"
    last = run_dir / "last.pt"
    if last.exists():
        return f"{fix}, then resume with: mlaan-fast train --resume {shlex.quote(str(last))}"
    return f"{fix}, then run the same command again"


def _resumable(run_dir: Path | None, resume: str | None) -> Path | None:
    """The checkpoint that continues an interrupted run: its folder's last.pt, else the one it resumed."""
    if run_dir is not None and (run_dir / "last.pt").is_file():
        return run_dir / "last.pt"
    return Path(resume) if resume else None


_MODULE_KEY = re.compile(r"(?:local_modules|ind_heads|casc_heads|lams)\.(\d+)\.")


def _where(name: str, num_modules: int) -> str:
    """'module J (name)' for a state-dict name, 'the EMA shadows (name)' for a shadow."""
    match = _MODULE_KEY.match(name)
    if match:
        return f"module {match[1]} ({name})"
    if name.startswith("fc."):
        return f"module {num_modules - 1} ({name})"
    return f"the EMA shadows ({name})" if "shadow" in name else name


def _nonfinite_state(model, optimizer) -> list[str]:
    """Where the model's weights, buffers and shadows, then the optimizer's state, hold NaN or inf (parts
    another pipeline stage holds, on the meta device, are that stage's to check)."""
    bad = [k for k, v in model.state_dict().items()
           if v.is_floating_point() and not v.is_meta and not torch.isfinite(v).all()]
    for name, p in model.named_parameters():
        for slot, v in optimizer.state.get(p, {}).items():
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
                bad.append(f"{name} [optimizer {slot}]")
    return [_where(name, model.num_modules) for name in bad]


def _check_epoch_state(runner, optimizer, test_loss: float, epoch: int, test_loader, device, cfg) -> None:
    """TrainingDiverged if the state after ``epoch`` holds NaN/inf on any rank or its test loss is not
    finite: such a state is never saved, as last.pt or best.pt (every rank decides alike)."""
    model = runner.model
    bad = _nonfinite_state(model, optimizer)
    anywhere = sum_across([float(len(bad))], device)[0]
    if not anywhere and math.isfinite(test_loss):
        return
    if bad:
        also = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        what = f"non-finite values in {bad[0]}{also}"
    elif anywhere:
        what = "non-finite values in the state of another pipeline stage"
    elif cfg.pipeline_stages > 1:
        what = f"non-finite test loss ({test_loss})"
    else:
        module = _first_nonfinite_module(model, test_loader, device, cfg)
        where = f", first seen in the output of module {module}" if module is not None else ""
        what = f"non-finite test loss ({test_loss}){where}"
    raise TrainingDiverged(f"training diverged at epoch {epoch + 1}: {what}; nothing was saved over the last "
                           "checkpoint; try a smaller --lr or a longer --warmup-epochs")


@torch.inference_mode()
def _first_nonfinite_module(model, loader, device, cfg) -> int | None:
    """The first backbone module (the classifier counts as the last) whose output on the first test batch
    holds NaN or inf."""
    images, _ = next(iter(loader))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    x = images.to(device, memory_format=fmt)
    with autocast(device, cfg.amp):
        for j, module in enumerate(model.local_modules):
            x = module(x)
            if not torch.isfinite(x).all():
                return j
        logits = model.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
    return model.num_modules - 1 if not torch.isfinite(logits).all() else None
