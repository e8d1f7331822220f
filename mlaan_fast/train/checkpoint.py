"""Checkpoints: atomic writes, and loads that refuse files from another model or damaged files.

A checkpoint is a dict saved with ``torch.save`` holding only tensors and plain Python values, so it
loads with ``weights_only=True``: ``format``, ``version``, ``config`` (the TrainConfig dict),
``model_config`` (``LocalModel.config``), ``model`` (state_dict: backbone, auxiliary nets, EMA
shadows), ``optimizer``, ``scheduler``, ``scaler``, ``rng``, ``sampler``, ``epoch`` (epochs completed),
``step``, ``best_acc``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from mlaan_fast.models.options import OPTION_NAMES
from mlaan_fast.train.config import RESUME_KEYS

FORMAT = "mlaan_fast.checkpoint"
VERSION = 1
# What must match for a checkpoint to continue a run exactly: the model's shape (these keys and
# every model option) and the TrainConfig settings declared with resume=True (training path).
MODEL_KEYS = ("arch", "method", "K", "num_classes")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, or from another model or run."""


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsync, then rename.

    If anything fails, the temp file is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint onto the CPU; CheckpointError if missing, truncated, corrupt or not ours."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} ({path.stat().st_size} bytes) is truncated or corrupt and "
                              f"cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                              "use an intact copy (best.pt or last.pt)") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an mlaan_fast training checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {state.get('version')}, this mlaan_fast "
                              f"reads version {VERSION}")
    return state


def check_compatible(state: dict, model_config: dict, config: dict | None = None, path: str = "checkpoint"):
    """Raise CheckpointError listing every difference in the model (and, given ``config``, the run)."""
    saved_model = state["model_config"]
    diffs = [f"{k}: checkpoint has {saved_model.get(k)!r}, this run has {model_config.get(k)!r}"
             for k in MODEL_KEYS if saved_model.get(k) != model_config.get(k)]
    if "options" in model_config:
        saved_options, options = saved_model.get("options") or {}, model_config["options"]
        diffs += [f"model option {k}: checkpoint has {saved_options.get(k)!r}, this run has {options[k]!r}"
                  for k in OPTION_NAMES if saved_options.get(k) != options.get(k)]
    if config is not None:
        saved = state["config"]
        diffs += [f"{k}: checkpoint has {saved.get(k)!r}, this run has {config.get(k)!r}"
                  for k in RESUME_KEYS if k in saved and saved.get(k) != config.get(k)]
    if diffs:
        raise CheckpointError(f"{path} was written by a different model or run and cannot be resumed "
                              "here:\n  " + "\n  ".join(diffs))


def training_state(cfg, model, optimizer, scheduler, scaler, sampler, epoch: int, step: int, best_acc: float,
                   test_acc: float) -> dict:
    """Everything :func:`save_checkpoint` stores after ``epoch`` completed epochs (RNG states taken now)."""
    return {"config": cfg.to_dict(), "model_config": model.config,
            "model": strip_compile_prefix(model.state_dict()), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(), "sampler": sampler.state_dict(), "epoch": epoch, "step": step,
            "best_acc": best_acc, "test_acc": test_acc}


def restore_training_state(state: dict, optimizer, scheduler, scaler, sampler) -> None:
    """Load what :func:`training_state` saved into fresh objects (the model is loaded separately)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])


def strip_compile_prefix(state_dict: dict) -> dict:
    """State dict keys without torch.compile's ``_orig_mod.`` wrapper component."""
    return {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}


def rng_state() -> dict:
    """Every RNG the run draws from: torch (CPU and CUDA), numpy, Python, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where the devices exist)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
