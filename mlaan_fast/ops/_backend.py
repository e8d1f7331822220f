"""Backend discovery and selection shared by every fused op.

Backends: ``reference`` (plain PyTorch, the ground truth), ``cpu`` (C++ in ``mlaan_fast._C``),
``cuda`` (CUDA kernels in ``mlaan_fast._C``) and ``triton``. Selection is automatic per device and
can be forced with :func:`use_backend` or the ``MLAAN_FAST_BACKEND`` environment variable; forcing
a backend that cannot run here is an error, never a silent fallback.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "MLAAN_FAST_BACKEND"

# _UNSET: no use_backend block is active (the environment variable decides); None inside
# `use_backend(None)`: automatic selection even when the environment variable is set.
_UNSET = "<unset>"
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("mlaan_fast_backend", default=_UNSET)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run on this machine or on these tensors."""


@functools.cache
def load_extension():
    """Import ``mlaan_fast._C`` once; return ``(module or None, reason)``."""
    try:
        module = importlib.import_module("mlaan_fast._C")
    except Exception as exc:  # ImportError, or an undefined-symbol OSError from a stale build
        return None, (f"mlaan_fast._C did not load ({type(exc).__name__}: {exc}); rebuild with "
                      "`pip install --no-build-isolation -e .`")
    return module, "mlaan_fast._C loaded"


def extension_has_cuda() -> bool:
    """True when ``_C`` was compiled with the CUDA kernels."""
    module, _ = load_extension()
    if module is None:
        return False
    return bool(getattr(module, "with_cuda", 0))


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_import():
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every backend mapped to ``(usable, reason)`` on this machine."""
    # Cached per (interpreter mode, CUDA visible): every op call asks, and the probe costs far
    # more than a small kernel.
    return dict(_probe_backends(triton_interpreted(), torch.cuda.is_available()))


@functools.cache
def _probe_backends(interpreted: bool, cuda_visible: bool) -> tuple[tuple[str, tuple[bool, str]], ...]:
    out = {"reference": (True, "plain PyTorch, always available")}
    module, why = load_extension()
    out["cpu"] = (module is not None, "C++ kernels in mlaan_fast._C" if module is not None else why)
    if module is None:
        out["cuda"] = (False, why)
    elif not extension_has_cuda():
        out["cuda"] = (False, "mlaan_fast._C was built without CUDA kernels (no toolkit, a toolkit of "
                              "another CUDA major version than torch's, or MLAAN_FAST_SKIP_CUDA=1; the "
                              "build said which)")
    elif not cuda_visible:
        out["cuda"] = (False, "CUDA kernels are built but no CUDA device is visible")
    else:
        out["cuda"] = (True, f"CUDA kernels on {torch.cuda.get_device_name()}")
    ok, why = _triton_import()
    if not ok:
        out["triton"] = (False, why)
    elif interpreted:
        out["triton"] = (True, f"{why} in interpreter mode (TRITON_INTERPRET=1) on CPU tensors")
    elif cuda_visible:
        out["triton"] = (True, f"{why} on {torch.cuda.get_device_name()}")
    else:
        out["triton"] = (False, f"{why}, but no CUDA device and TRITON_INTERPRET is not 1")
    return tuple(out.items())


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force every fused op inside the block to run on backend ``name`` (None: automatic)."""
    if name is not None:
        _check_name(name, "use_backend")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``MLAAN_FAST_BACKEND``, or None."""
    name = _forced.get()
    if name is _UNSET:
        name = os.environ.get(ENV_VAR) or None
        if name is not None:
            _check_name(name, ENV_VAR)
    return name


def _check_name(name: str, where: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    return device.type == ("cpu" if triton_interpreted() else "cuda")


def select_backend(op: str, device: torch.device, gpu_order: tuple[str, ...] = ("cuda", "triton")) -> str:
    """The backend that runs ``op`` on tensors of ``device``: the forced one, else the fastest usable.

    ``gpu_order`` is the op's preference on CUDA tensors, from its benchmark.
    """
    device = torch.device(device)
    avail = available_backends()
    name = forced_backend()
    if name is not None:
        usable, why = avail[name]
        if not usable:
            raise BackendUnavailableError(f"{op}: backend {name!r} was forced but is unavailable: {why}")
        if not _runs_on(name, device):
            raise BackendUnavailableError(
                f"{op}: backend {name!r} was forced but cannot run on {device.type} tensors"
                + (" (Triton runs on CPU tensors only in interpreter mode)" if name == "triton" else "")
            )
        return name
    order = gpu_order if device.type == "cuda" else ("cpu",)
    for candidate in order:
        if avail[candidate][0] and _runs_on(candidate, device):
            return candidate
    return "reference"


_selected: dict = {}


@torch.compiler.assume_constant_result
def backend_for(op: str, device_type: str, device_index: int | None, gpu_order: tuple[str, ...]) -> str:
    """:func:`select_backend` for an op's call, remembered per (op, device, forced backend).

    Called once per call of a fused op, outside any traced graph: a compiled graph carries the
    name as a constant. (A replaced availability probe, as tests make, is a new key.)"""
    key = (op, device_type, device_index, gpu_order, forced_backend(), available_backends)
    if key not in _selected:
        _selected[key] = select_backend(op, torch.device(device_type, device_index), gpu_order=gpu_order)
    return _selected[key]
