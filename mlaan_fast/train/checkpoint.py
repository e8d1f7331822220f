"""Checkpoints: atomic writes, a digest of every byte, and loads that refuse damaged files, files
from another model, and non-finite state.

A checkpoint file is one header line, ``MLAAN_FAST_CHECKPOINT 2 sha256=<hex> bytes=<n>``, followed by
the ``n`` bytes of a ``torch.save`` payload whose SHA-256 digest is ``<hex>``: a byte changed anywhere
(header included), a truncation or an empty file is refused. The payload is a dict of tensors and
plain Python values, so it loads with ``weights_only=True``: ``format``, ``version``, ``config`` (the
TrainConfig dict), ``model_config`` (``LocalModel.config``), ``model`` (state_dict: backbone,
auxiliary nets, EMA shadows), ``optimizer``, ``scheduler``, ``scaler``, ``rng``, ``sampler``,
``epoch`` (epochs completed), ``step``, ``best_acc``, ``test_acc`` and ``metrics`` (the metrics rows
of every completed epoch, so a run folder's metrics can be rebuilt from its checkpoint).

Format 1 files (a bare ``torch.save`` zip, no digest, no metrics) still load: they are checked for
structure and finite values, but a changed byte inside a tensor cannot be detected there.
"""
from __future__ import annotations

import hashlib
import io
import math
import random
import re
from pathlib import Path

import numpy as np
import torch

from mlaan_fast.models.options import OPTION_NAMES
from mlaan_fast.train.config import RESUME_KEYS
from mlaan_fast.train.runfolder import atomic_write, describe_os_error

FORMAT = "mlaan_fast.checkpoint"
VERSION = 2
MAGIC = b"MLAAN_FAST_CHECKPOINT"
_HEADER = re.compile(rb"MLAAN_FAST_CHECKPOINT (\d{1,4}) sha256=([0-9a-f]{64}) bytes=(\d{1,20})\n")
_ZIP = b"PK\x03\x04"  # a format 1 file: torch.save's zip archive
# What must match for a checkpoint to continue a run exactly: the model's shape (these keys and
# every model option) and the TrainConfig settings declared with resume=True (training path).
MODEL_KEYS = ("arch", "method", "K", "num_classes")
_REQUIRED = {"config": dict, "model_config": dict, "model": dict, "optimizer": dict, "scheduler": dict,
             "rng": dict, "sampler": dict, "epoch": int, "best_acc": (int, float)}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, damaged, non-finite, or from another model or run."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, I/O error); the previous file is intact."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


def encode_checkpoint(state: dict) -> list[bytes]:
    """The file contents for ``state``: [header line, payload]."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    payload = buffer.getbuffer()
    digest = hashlib.sha256(payload).hexdigest()
    header = f"{MAGIC.decode()} {VERSION} sha256={digest} bytes={len(payload)}\n".encode()
    return [header, payload]


def save_checkpoint(state: dict, *paths: str | Path) -> None:
    """Write ``state`` to each of ``paths`` atomically (temp file, fsync, rename), serialised once.

    Refuses (CheckpointError) a state holding non-finite tensors. If a write fails, the temp file is
    removed, ``path`` keeps its previous contents and CheckpointWriteError names the path and the cause.
    """
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"refusing to write {paths[0]}: non-finite values in {', '.join(bad[:3])}")
    chunks = encode_checkpoint(state)
    for path in map(Path, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, chunks, durable=True)
        except OSError as exc:
            kept = f"; the previous {path.name} is kept" if path.exists() else ""
            why = describe_os_error(exc, with_path=False)
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {why}{kept}", exc.errno) from exc


def load_checkpoint(path: str | Path, check_finite: bool = True) -> dict:
    """Read a checkpoint onto the CPU (a folder means its last.pt); CheckpointError, naming the file,
    if it is missing, empty, truncated, changed anywhere, not ours, incomplete or (unless
    ``check_finite`` is False) holds non-finite tensors."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read it ({describe_os_error(exc)})") from None
    version, payload = _verified_payload(data, path)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path} ({len(data)} bytes) is truncated or corrupt and cannot be "
                              f"read ({type(exc).__name__}: {first}); use an intact copy (best.pt or last.pt)"
                              ) from None
    _check_structure(state, version, path)
    if check_finite:
        bad = nonfinite_tensors(state)
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise CheckpointError(f"checkpoint {path} holds non-finite values in {', '.join(bad[:3])}{more}; "
                                  "it cannot be trained or evaluated from")
    return state


def _verified_payload(data: bytes, path: Path) -> tuple[int, bytes]:
    """(format version, torch.save payload) of a file's bytes, the digest checked."""
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); use an intact copy (best.pt or "
                              "last.pt)")
    if data.startswith(_ZIP):
        return 1, data
    match = _HEADER.match(data[:200])
    if match is None:
        if data.startswith(MAGIC[:8]):
            raise CheckpointError(f"checkpoint {path} is corrupt: its header line is damaged; "
                                  "use an intact copy (best.pt or last.pt)")
        raise CheckpointError(f"checkpoint {path} is not an mlaan_fast training checkpoint "
                              "(or its first bytes are damaged)")
    version, digest, size = int(match[1]), match[2].decode(), int(match[3])
    payload = memoryview(data)[match.end():]
    if len(payload) != size:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: it holds {len(payload)} of the "
                              f"{size} bytes its header announces; use an intact copy (best.pt or last.pt)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: its bytes do not match their SHA-256 digest "
                              "(changed on disk or in transfer); use an intact copy (best.pt or last.pt)")
    if version != VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {version}, this mlaan_fast reads "
                              f"versions 1 and {VERSION}")
    return version, payload


def _check_structure(state, version: int, path: Path) -> None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an mlaan_fast training checkpoint")
    if state.get("version") != version:
        raise CheckpointError(f"checkpoint {path}: format version {state.get('version')!r}, this mlaan_fast "
                              f"reads versions 1 and {VERSION}")
    wrong = [k for k, kind in _REQUIRED.items() if not isinstance(state.get(k), kind)]
    if wrong:
        raise CheckpointError(f"checkpoint {path} is incomplete or damaged: missing or malformed "
                              f"{', '.join(wrong)}")


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating tensors in ``state``'s model and optimizer state holding NaN or inf."""
    bad = [f"model tensor {k}" for k, v in state.get("model", {}).items() if _nonfinite(v)]
    for index, slots in state.get("optimizer", {}).get("state", {}).items():
        bad += [f"optimizer {slot} of parameter {index}" for slot, v in slots.items() if _nonfinite(v)]
    for key in ("best_acc", "test_acc"):
        value = state.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(key)
    return bad


def _nonfinite(value) -> bool:
    return (isinstance(value, torch.Tensor) and value.is_floating_point()
            and not bool(torch.isfinite(value).all()))


def load_model_state(model: torch.nn.Module, state: dict, path: str | Path) -> None:
    """``model.load_state_dict(state["model"])``; CheckpointError naming the file if they do not fit."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).replace("\n", " ").replace("\t", "")[:300]
        raise CheckpointError(f"checkpoint {path}: its model tensors do not fit this model ({first})"
                              ) from None


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
                              "here: " + "; ".join(diffs))


def training_state(cfg, model, optimizer, scheduler, scaler, sampler, epoch: int, step: int, best_acc: float,
                   test_acc: float, metrics: list[dict] | None = None, whole_state=None) -> dict:
    """Everything :func:`save_checkpoint` stores after ``epoch`` completed epochs (RNG states taken now);
    ``metrics``: the rows of epochs 1..``epoch``; ``whole_state``: (model, optimizer) state dicts of the
    whole model when this process holds only part of it (a pipeline stage's gathered states)."""
    model_state, optimizer_state = whole_state or (model.state_dict(), optimizer.state_dict())
    return {"config": cfg.to_dict(), "model_config": model.config,
            "model": strip_compile_prefix(model_state), "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(), "sampler": sampler.state_dict(), "epoch": epoch, "step": step,
            "best_acc": best_acc, "test_acc": test_acc, "metrics": list(metrics or [])}


def restore_training_state(state: dict, optimizer, scheduler, scaler, sampler,
                           path: str | Path = "checkpoint") -> None:
    """Load what :func:`training_state` saved into fresh objects (the model is loaded separately);
    CheckpointError naming ``path`` if a part does not fit."""
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).replace("\n", " ")[:300]
        raise CheckpointError(f"checkpoint {path}: its training state does not fit this run "
                              f"({type(exc).__name__}: {first})") from None


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
