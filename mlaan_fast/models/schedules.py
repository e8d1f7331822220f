"""Window schedules: how ``LocalModel.local_step`` runs the local forwards and backwards of one iteration.

A :class:`Window` is the objective attached to one module j (method.md §2):
``ind_weight * L_ind(j) + casc_weight * L_casc(j)`` where L_ind(j) is module j's head on
E_j(stopgrad o_{j-1}) and L_casc(j) runs modules ``start..j`` without stopgrad on
stopgrad(o_{start-1}) and then LAM_j and the cascade head (the real classifier for the last module).
A schedule is a function
``(model, images, targets, grad_scaler, *, overlap, side_stream, on_grads_ready) -> dict``
that accumulates the gradients of every window's objective in ``.grad`` and returns the losses and
final logits; ``overlap`` and ``side_stream`` are the runtime's switches (only ``once`` has them). It
uses only ``model.local_modules``, ``model.windows``, ``model.independent_loss(j, h, images,
targets)`` and ``model.cascade_loss(j, z, images, targets)`` (each -> (loss, logits or None)).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mlaan_fast.models.schedule_once import once


@dataclass(frozen=True)
class Window:
    """Objective of module ``index``; ``ind_weight``/``start`` None: no independent/cascaded term."""

    index: int
    ind_weight: float | None
    start: int | None = None
    casc_weight: float | None = None


def make_windows(num_modules: int, *, cascade: bool, span: int = 1, w_ind: float = 1.0,
                 w_casc: float = 0.0) -> tuple[Window, ...]:
    """Greedy (``cascade=False``): one plain loss per module. Cascaded (MLAAN): windows of ``span``
    modules for span-1 <= j <= M-2 plus the last module (its window clipped at module 0)."""
    last = num_modules - 1
    if not cascade:
        return tuple(Window(j, 1.0) for j in range(num_modules))
    windows = [Window(j, w_ind, j - span + 1, w_casc) for j in range(span - 1, last)]
    windows.append(Window(last, w_ind, max(0, last - span + 1), w_casc))
    return tuple(windows)


def backward(objective: torch.Tensor, grad_scaler=None) -> None:
    """One local backward (through ``grad_scaler.scale`` when given); frees the window's graph."""
    (objective if grad_scaler is None else grad_scaler.scale(objective)).backward()


def straightforward(model, images: torch.Tensor, targets: torch.Tensor, grad_scaler=None, *,
                    overlap: bool = False, side_stream=None, on_grads_ready=None) -> dict:
    """The published schedule: module j runs on stopgrad(o_{j-1}) and its independent loss is
    back-propagated at once; then window j runs its modules again from stopgrad(o_{start-1}) and its
    cascaded loss is back-propagated. Every module is forwarded s+1 times; at most one window's
    activations (or one module's, for the independent loss) are alive at a time. The two terms of a
    window's objective are back-propagated one after the other: the same gradient as their sum,
    with the independent graph freed before the window is built. (``on_grads_ready`` is never called:
    a module's gradient is complete only at the end.)"""
    if overlap or side_stream is not None:
        raise ValueError("overlap needs schedule='once' (the straightforward schedule runs window by window)")
    modules = model.local_modules
    windows = {w.index: w for w in model.windows}
    # o_k (k = -1 is the image) is kept until the last module that reads it has run.
    last_reader = {k: k + 1 for k in range(-1, len(modules) - 1)}
    for w in windows.values():
        if w.start is not None:
            last_reader[w.start - 1] = max(last_reader[w.start - 1], w.index)
    outputs = {-1: images}
    module_losses = [images.new_zeros((), dtype=torch.float32) for _ in modules]
    logits = None
    with torch.enable_grad():
        for j, module in enumerate(modules):
            window = windows.get(j)
            with torch.set_grad_enabled(window is not None and window.ind_weight is not None):
                h = module(outputs[j - 1])
            outputs[j] = h.detach()
            if window is not None and window.ind_weight is not None:
                loss, logits_j = model.independent_loss(j, h, images, targets)
                term = window.ind_weight * loss
                backward(term, grad_scaler)
                module_losses[j] = module_losses[j] + term.detach().float()
                logits = logits_j if logits_j is not None else logits
                del loss, term
            del h
            if window is not None and window.start is not None:
                z = outputs[window.start - 1]
                for i in range(window.start, j + 1):
                    z = modules[i](z)
                loss, logits_j = model.cascade_loss(j, z, images, targets)
                term = window.casc_weight * loss
                backward(term, grad_scaler)
                module_losses[j] = module_losses[j] + term.detach().float()
                logits = logits_j if logits is None else logits
                del z, loss, term
            for k in [k for k in outputs if last_reader.get(k, j) <= j]:
                del outputs[k]
    return {
        "loss": torch.stack(module_losses).sum(),
        "module_losses": module_losses,
        "logits": None if logits is None else logits.detach(),
    }

SCHEDULES: dict[str, Callable] = {"straightforward": straightforward, "once": once}


def get_schedule(name: str) -> Callable:
    if name not in SCHEDULES:
        raise ValueError(f"schedule: unknown {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]
