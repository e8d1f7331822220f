"""Frozen EMA shadows of live modules whose parameters live in one contiguous fp32 buffer."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mlaan_fast.ops.ema import ema_update_


class EMAShadow(nn.Module):
    """Frozen EMA copies of live modules, all parameters in one contiguous fp32 buffer.

    ``shadows[i]`` is a deep copy of ``live_modules[i]`` whose parameters (requires_grad=False) are
    views into ``flat``; BN running statistics are copied once and not averaged. The live modules
    are referenced, not owned: they are not submodules and stay out of ``state_dict``.
    ``update()`` applies ``shadow <- decay*shadow + (1-decay)*live`` to every parameter at once.
    """

    def __init__(self, live_modules: Sequence[nn.Module], decay: float = 0.995):
        super().__init__()
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"EMAShadow: decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        live_modules = list(live_modules)
        for i, m in enumerate(live_modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"EMAShadow: live_modules[{i}] must be an nn.Module, got {type(m).__name__}")
        # A plain list of Parameter objects (not registered): .to() on the live model keeps their identity.
        self._live: list[Tensor] = [p for m in live_modules for p in m.parameters()]
        self.shadows = nn.ModuleList(copy.deepcopy(m) for m in live_modules)
        self._params: list[nn.Parameter] = [p for s in self.shadows for p in s.parameters()]
        if len(self._params) != len(self._live):
            raise ValueError("EMAShadow: a deep copy changed the number of parameters "
                             f"({len(self._live)} live, {len(self._params)} copied)")
        device = self._params[0].device if self._params else torch.device("cpu")
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in self._params]) \
                if self._params else torch.zeros(0, device=device)
        self.register_buffer("flat", flat)
        for p in self._params:
            p.requires_grad_(False)
        self._rebind()
        self.register_load_state_dict_post_hook(EMAShadow._after_load)

    @staticmethod
    def _after_load(module: EMAShadow, _incompatible_keys) -> None:
        module._rebind()

    def _rebind(self) -> None:
        """Make every shadow parameter the view of ``flat`` at its slot (copying its value there first)."""
        # Re-collected: conversions or load_state_dict(assign=True) may have put new Parameter objects in.
        self._params = [p for s in self.shadows for p in s.parameters()]
        offset = 0
        with torch.no_grad():
            for p in self._params:
                n = p.numel()
                view = self.flat[offset:offset + n].view(p.shape)
                offset += n
                if p.data_ptr() != view.data_ptr() or p.dtype != view.dtype or p.device != view.device:
                    view.copy_(p.detach())
                p.data = view

    def _apply(self, fn, recurse=True):
        # nn.Module._apply converts each parameter on its own: afterwards they no longer alias the
        # converted `flat`. Re-bind them so the shadows keep sharing one buffer.
        super()._apply(fn, recurse)
        self._rebind()
        return self

    def __setstate__(self, state):
        # deepcopy and unpickling copy each Parameter on its own: share `flat` again.
        super().__setstate__(state)
        self._rebind()

    def views(self) -> list[Tensor]:
        """The shadow parameters, each a view into ``flat`` (in ``live_parameters()`` order)."""
        return list(self._params)

    def live_parameters(self) -> list[Tensor]:
        """The live parameters the shadows track (referenced, not owned)."""
        return list(self._live)

    def _live_flat(self) -> Tensor | None:
        """The live parameters as one 1-D tensor when they lie back to back in one buffer, else None."""
        live = self._live
        if not live:
            return None
        first, last = live[0], live[-1]
        dtype, elem = first.dtype, first.element_size()
        expected = first.data_ptr()
        for t in live:
            if t.dtype != dtype or t.data_ptr() != expected or not t.is_contiguous():
                return None
            expected += t.numel() * elem
        # Back-to-back addresses can also be neighbouring allocations: insist on one storage.
        if first.untyped_storage().data_ptr() != last.untyped_storage().data_ptr():
            return None
        return first.detach().as_strided((self.flat.numel(),), (1,), first.storage_offset())

    @torch.no_grad()
    def update(self) -> None:
        """One fused EMA step for every (shadow, live) parameter pair: shadow <- m*shadow + (1-m)*live."""
        if not self._params:
            return
        if self.flat.dtype != torch.float32:
            # After .double()/.half() the fused op (fp32 shadows only) does not apply.
            torch._foreach_lerp_(self._params, [t.to(self.flat.dtype) for t in self._live], 1.0 - self.decay)
            return
        live_flat = self._live_flat()
        if live_flat is not None:
            ema_update_([self.flat], [live_flat], self.decay)
        else:
            ema_update_(self._params, self._live, self.decay)

    def extra_repr(self) -> str:
        return f"decay={self.decay}, numel={self.flat.numel()}"
