"""Multi-tensor EMA update: shadow <- decay * shadow + (1 - decay) * live (MLAAN's leap parameters).

``ema_update_`` checks every argument (the one place its errors are worded, for every backend),
refuses shadows that share memory with each other or with a live tensor, and runs one of:
``reference`` (``torch._foreach_lerp_``), ``cpu``/``cuda`` (the C++ op ``mlaan_fast::ema_update_``,
one pass over a multi-tensor table; ``csrc/ema/``), ``triton`` (the custom op
``mlaan_fast::ema_update_triton_``, one launch). Both ops have a fake kernel for ``torch.compile``.
"""
import functools
import numbers
from itertools import repeat
from operator import attrgetter
from typing import List  # noqa: UP035 (torch 2.6 infers custom-op schemas from typing.List only)

import torch

from mlaan_fast.ops._backend import backend_for, load_extension

# On CUDA tensors the C++ pointer-table kernel goes first: it uses 16-byte vector accesses
# where pointers allow and builds its table without Python; the Triton list form cannot prove
# alignment of table-loaded pointers. The GPU benchmark (benchmarks/bench_ema.py) checks this.
GPU_ORDER = ("cuda", "triton")
_OP = "ema_update_"
_LIVE_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16))


def ema_update_(shadow: list[torch.Tensor], live: list[torch.Tensor], decay: float) -> None:
    """In place, for every i: shadow[i] (fp32) <- decay*shadow[i] + (1-decay)*live[i] (fp32/bf16/fp16)."""
    _check_arguments(shadow, live, decay)
    if not shadow:
        return
    decay = float(decay)
    device = shadow[0].device
    backend = backend_for(_OP, device.type, device.index, GPU_ORDER)
    with torch.no_grad():
        if backend == "reference":
            _reference(shadow, live, decay)
        elif backend == "triton":
            torch.ops.mlaan_fast.ema_update_triton_(shadow, live, decay)
        else:
            torch.ops.mlaan_fast.ema_update_(shadow, live, decay)


def _check_arguments(shadow, live, decay) -> None:
    # Each check first runs over whole lists in C-level loops (map, set); only when one fails does
    # _explain_* walk the lists to name the first offender. Per-tensor Python code here costs more
    # than the C++ kernel of a list of small tensors.
    for name, x in (("shadow", shadow), ("live", live)):
        if not isinstance(x, (list, tuple)):
            raise TypeError(f"{_OP}: {name} must be a list or tuple of tensors, got {type(x).__name__}")
    if type(decay) is not float and (isinstance(decay, bool) or not isinstance(decay, numbers.Real)):
        raise TypeError(f"{_OP}: decay must be a float, got {type(decay).__name__}")
    # torch.compile traces the walks themselves (it cannot trace attrgetter).
    compiling = torch.compiler.is_compiling()
    tensors = [*shadow, *live]
    if compiling or not all(map(isinstance, tensors, repeat(torch.Tensor))) \
            or set(map(_layout, tensors)) - {torch.strided}:
        _explain_kinds(shadow, live)
    if len(shadow) != len(live):
        raise ValueError(f"{_OP}: shadow has {len(shadow)} tensors but live has {len(live)}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"{_OP}: decay must be in [0, 1], got {decay}")
    if not shadow:
        return
    device = shadow[0].device
    if (compiling or set(map(_device, tensors)) != {device} or set(map(_dtype, shadow)) != {torch.float32}
            or set(map(_dtype, live)) - _LIVE_DTYPES or list(map(_shape, shadow)) != list(map(_shape, live))
            or not all(map(torch.Tensor.is_contiguous, shadow))):
        _explain_pairs(shadow, live, device)
    if device.type != "meta" and not compiling:  # no addresses to compare there
        _check_no_overlap(shadow, live)


_layout, _device, _dtype, _shape = (attrgetter(a) for a in ("layout", "device", "dtype", "shape"))


def _explain_kinds(shadow, live) -> None:
    for name, x in (("shadow", shadow), ("live", live)):
        for i, t in enumerate(x):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{_OP}: {name}[{i}] must be a tensor, got {type(t).__name__}")
            if t.layout != torch.strided:
                raise TypeError(f"{_OP}: {name}[{i}] must be a dense (strided) tensor, got layout {t.layout}")


def _explain_pairs(shadow, live, device) -> None:
    for i, (s, t) in enumerate(zip(shadow, live, strict=True)):
        if s.device != device:
            raise ValueError(f"{_OP}: shadow[{i}] is on {s.device} but shadow[0] is on {device} "
                             "(all tensors must be on one device)")
        if t.device != device:
            raise ValueError(f"{_OP}: live[{i}] is on {t.device} but shadow[0] is on {device} "
                             "(all tensors must be on one device)")
        if s.dtype != torch.float32:
            raise TypeError(f"{_OP}: shadow[{i}] must be float32, got {s.dtype}")
        if t.dtype not in _LIVE_DTYPES:
            raise TypeError(f"{_OP}: live[{i}] must be float32, bfloat16 or float16, got {t.dtype}")
        if s.shape != t.shape:
            raise ValueError(f"{_OP}: shape mismatch at index {i}: shadow[{i}] has shape "
                             f"{list(s.shape)} but live[{i}] has shape {list(t.shape)}")
        if not s.is_contiguous():
            raise ValueError(f"{_OP}: shadow[{i}] must be contiguous (it is updated in place)")


def _byte_spans(tensors, is_live: bool) -> list:
    """(first byte, end byte, is_live, index) of every non-empty tensor; a strided view spans all the
    bytes from its first element to its last, gaps included."""
    Tensor = torch.Tensor
    spans = [(p, p + n * size, is_live, i) for i, (p, n, size) in enumerate(zip(
        map(Tensor.data_ptr, tensors), map(Tensor.numel, tensors), map(Tensor.element_size, tensors),
        strict=True)) if n]
    if is_live and not all(map(Tensor.is_contiguous, tensors)):
        for k, (p, _, _, i) in enumerate(spans):
            t = tensors[i]
            last = sum((d - 1) * st for d, st in zip(t.shape, t.stride(), strict=True))
            spans[k] = (p, p + (last + 1) * t.element_size(), True, i)
    return spans


def _check_no_overlap(shadow, live) -> None:
    """ValueError naming two tensors if a shadow shares memory with another shadow or with a live
    tensor. Live tensors may overlap each other: they are only read."""
    spans = _byte_spans(shadow, False) + _byte_spans(live, True)
    spans.sort()
    shadow_reach = live_reach = (0, -1)  # the furthest end byte seen among shadows / live, and whose
    for start, end, is_live, i in spans:
        if shadow_reach[0] > start:
            other = f"shadow[{shadow_reach[1]}]"
        elif not is_live and live_reach[0] > start:
            other = f"live[{live_reach[1]}]"
        else:
            if is_live and end > live_reach[0]:
                live_reach = (end, i)
            elif not is_live and end > shadow_reach[0]:
                shadow_reach = (end, i)
            continue
        this = f"{'live' if is_live else 'shadow'}[{i}]"
        first, second = sorted((this, other), key=lambda name: (name[0] == "l", int(name[:-1].split("[")[1])))
        raise ValueError(f"{_OP}: {first} and {second} overlap in memory; a shadow may share memory with no "
                         "other shadow and no live tensor")


def _reference(shadow, live, decay: float) -> None:
    live = [t if t.dtype == s.dtype else t.to(s.dtype) for s, t in zip(shadow, live, strict=True)]
    torch._foreach_lerp_(shadow, live, 1.0 - decay)


def _update_fake(shadow, live, decay) -> None:
    return None


@torch.library.custom_op("mlaan_fast::ema_update_triton_", mutates_args=("shadow",))
def _triton_update(shadow: List[torch.Tensor], live: List[torch.Tensor], decay: float) -> None:  # noqa: UP006
    """The contract of mlaan_fast::ema_update_ in one Triton launch (opaque to torch.compile: it
    builds a table of raw addresses)."""
    kernels = _kernels()
    if len(shadow) == 1:
        kernels.ema_update_flat(shadow[0].view(-1), live[0].reshape(-1), decay)
    else:
        kernels.ema_update_list(shadow, live, decay)


_triton_update.register_fake(_update_fake)


@functools.cache
def _kernels():
    from mlaan_fast.triton import ema

    return ema


def _register_cpp() -> None:
    if load_extension()[0] is not None:
        torch.library.register_fake("mlaan_fast::ema_update_")(_update_fake)


_register_cpp()
