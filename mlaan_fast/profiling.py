"""Device-independent accounting of the memory that autograd keeps for backward.

:class:`ActivationMeter` answers "how many bytes does the autograd graph hold at its largest?"
the same way on CPU and GPU, by watching every tensor autograd saves for backward
(``torch.autograd.graph.saved_tensors_hooks``). On CUDA it also reports the caching allocator's
own peak, which additionally counts parameters, gradients, optimizer state, temporaries and
workspaces. The two numbers answer different questions; both are exposed, never mixed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["ActivationMeter"]

_ACTIVE: list[ActivationMeter] = []  # meters whose `with` block is open, outermost first
_ACTIVE_LOCK = threading.Lock()


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return str(t.device), s.data_ptr()


class _Saved:
    """What the graph holds instead of a saved tensor; un-counts its storage when the graph drops it.

    Holds a detached alias (same storage, same version counter, no ``grad_fn``): keeping the tensor
    itself would, for saved outputs, form a cycle output -> grad_fn -> _Saved -> output that only
    the garbage collector could break, so the bytes would look alive after the graph is gone.
    """

    __slots__ = ("tensor", "key", "meters")

    def __init__(self, tensor: torch.Tensor, key, meters):
        self.tensor = tensor
        self.key = key
        self.meters = meters

    def __del__(self):
        for meter in self.meters:
            meter._release(self.key)


class ActivationMeter:
    """Context manager measuring the peak bytes of tensors saved for backward inside its block.

    Numbers (all in bytes):

    * ``peak_bytes`` / ``current_bytes``: saved-for-backward memory, largest value reached while
      the block was open / value now. Each storage counts once with its full size, however many
      saved tensors (views, repeated saves such as ``x * x``) point into it, and stops counting
      when the last graph node holding it is freed (after ``backward()`` without ``retain_graph``,
      or when the output/loss is deleted). Graphs built inside the block keep being tracked after
      the block closes (``current_bytes`` keeps falling), but only the block's packing raises the
      peak. Device-independent: the same model gives the same number on CPU and GPU.
    * ``cuda_max_allocated`` (CUDA only, else ``None``): ``torch.cuda.max_memory_allocated`` over the
      block, the allocator's absolute peak (parameters, gradients, optimizer state, activations,
      temporaries and workspaces, everything live on the device). The allocator's peak counter is
      reset on entry and on :meth:`reset`.
    * ``cuda_max_allocated_delta`` (CUDA only): ``cuda_max_allocated`` minus the memory allocated at
      entry, i.e. how much the block added on top of what already existed.

    Parameters are not activations: by default ``nn.Parameter`` instances and leaf tensors that
    require grad (what an optimizer owns) are not counted even when autograd saves them (a conv
    saves its weight). ``include_parameters=True`` counts them too. ``exclude`` takes modules or
    tensors whose storages (parameters and buffers for a module, e.g. BatchNorm running statistics
    or frozen EMA shadows) are never counted.

    Meters nest: an inner meter's saved tensors count in every enclosing meter too (each with its
    own parameter and exclusion rules), and the CUDA
    peak of the outer meter survives the inner meter's reset. Another ``saved_tensors_hooks``
    context opened inside the block (activation checkpointing, ``save_on_cpu``) hides the tensors
    it packs from the meter.

    Example::

        with ActivationMeter(exclude=model) as meter:
            loss = model(x).sum()
            loss.backward()
        print(meter.peak_bytes, meter.cuda_max_allocated)
    """

    def __init__(
        self,
        *,
        include_parameters: bool = False,
        exclude: nn.Module | torch.Tensor | Iterable[nn.Module | torch.Tensor] | None = None,
        cuda_device: torch.device | int | str | None = None,
    ):
        """``cuda_device``: whose allocator peak to report (default: the current CUDA device if any;
        ``"cpu"`` turns the CUDA numbers off)."""
        self.include_parameters = include_parameters
        self._exclude_spec = exclude
        self._excluded: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._refs: dict[tuple[str, int], list[int]] = {}  # key -> [references, nbytes]
        self.current_bytes = 0
        self.peak_bytes = 0
        self.saved_tensors = 0  # pack calls that were counted (repeated saves included)
        self._hooks = None
        self._open = False
        self.cuda_device = _resolve_cuda_device(cuda_device)
        self.cuda_max_allocated: int | None = None
        self.cuda_max_allocated_delta: int | None = None
        self._cuda_base = 0
        self._cuda_seen = 0

    # ------------------------------------------------------------------ context protocol
    def __enter__(self) -> ActivationMeter:
        if self._open:
            raise RuntimeError("this ActivationMeter is already open; use a new instance to nest")
        self._excluded = set(self._collect_excluded(self._exclude_spec))
        with _ACTIVE_LOCK:
            _ACTIVE.append(self)
            meters = tuple(_ACTIVE)
        self._open = True
        self._start_cuda()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(t, meters), _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._stop_cuda()
        self._open = False
        with _ACTIVE_LOCK:
            _ACTIVE.remove(self)

    def reset(self) -> None:
        """Restart the peaks from the present: ``peak_bytes = current_bytes``, CUDA peak re-armed."""
        with self._lock:
            self.peak_bytes = self.current_bytes
        if self._open:
            self._start_cuda()

    # ------------------------------------------------------------------ accounting
    def _pack(self, tensor: torch.Tensor, meters):
        is_parameter = isinstance(tensor, nn.Parameter) or (tensor.is_leaf and tensor.requires_grad)
        key = _storage_key(tensor)
        counted = tuple(
            m for m in meters if key not in m._excluded and (m.include_parameters or not is_parameter)
        )
        if not counted:
            return tensor
        nbytes = tensor.untyped_storage().nbytes()
        for meter in counted:
            meter._acquire(key, nbytes)
        return _Saved(tensor.detach(), key, counted)

    def _acquire(self, key, nbytes: int) -> None:
        with self._lock:
            self.saved_tensors += 1
            entry = self._refs.get(key)
            if entry is None:
                self._refs[key] = [1, nbytes]
                self.current_bytes += nbytes
                # Only packing inside the open block raises the peak (see class docstring).
                if self._open and self.current_bytes > self.peak_bytes:
                    self.peak_bytes = self.current_bytes
            else:
                entry[0] += 1

    def _release(self, key) -> None:
        with self._lock:
            entry = self._refs.get(key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] == 0:
                del self._refs[key]
                self.current_bytes -= entry[1]

    @staticmethod
    def _collect_excluded(spec) -> Iterable[tuple[str, int]]:
        if spec is None:
            return
        items = [spec] if isinstance(spec, (nn.Module, torch.Tensor)) else list(spec)
        for item in items:
            if isinstance(item, nn.Module):
                for t in list(item.parameters()) + list(item.buffers()):
                    yield _storage_key(t)
            elif isinstance(item, torch.Tensor):
                yield _storage_key(item)
            else:
                raise TypeError(f"exclude: expected nn.Module or Tensor items, got {type(item).__name__}")

    # ------------------------------------------------------------------ CUDA allocator peak
    def _start_cuda(self) -> None:
        if self.cuda_device is None:
            return
        torch.cuda.synchronize(self.cuda_device)
        peak_now = torch.cuda.max_memory_allocated(self.cuda_device)
        with _ACTIVE_LOCK:
            # Enclosing meters keep the peak reached so far before the counter is reset.
            for meter in _ACTIVE:
                if meter is not self and meter.cuda_device == self.cuda_device:
                    meter._cuda_seen = max(meter._cuda_seen, peak_now)
        torch.cuda.reset_peak_memory_stats(self.cuda_device)
        self._cuda_base = torch.cuda.memory_allocated(self.cuda_device)
        self._cuda_seen = self._cuda_base

    def _stop_cuda(self) -> None:
        if self.cuda_device is None:
            return
        torch.cuda.synchronize(self.cuda_device)
        peak = max(self._cuda_seen, torch.cuda.max_memory_allocated(self.cuda_device))
        self.cuda_max_allocated = peak
        self.cuda_max_allocated_delta = peak - self._cuda_base

    def __repr__(self) -> str:
        mib = 2.0**20
        text = f"ActivationMeter(peak={self.peak_bytes / mib:.2f} MiB, "
        text += f"current={self.current_bytes / mib:.2f} MiB"
        if self.cuda_max_allocated is not None:
            text += f", cuda_max_allocated={self.cuda_max_allocated / mib:.2f} MiB"
        return text + ")"


def _resolve_cuda_device(spec) -> torch.device | None:
    """The CUDA device whose allocator peak is tracked: the current one by default, None on CPU."""
    if spec is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    device = torch.device("cuda", spec) if isinstance(spec, int) else torch.device(spec)
    if device.type != "cuda":
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _unpack(packed):
    return packed.tensor if isinstance(packed, _Saved) else packed
