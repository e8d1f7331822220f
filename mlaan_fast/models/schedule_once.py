"""The forward-once schedule: every module runs forward once per iteration, exactly the published gradients.

Within one iteration the weights do not change, so every forward of module m in the published
schedule computes the same o_m; only the autograd graphs differ. Here module m runs once on a
detached leaf z_m = stopgrad(o_{m-1}) and its graph is kept until the last window that reaches it
has been back-propagated. Each objective term at module j is a *stream*: a cotangent at o_j that
must travel down to its window's first module and no further (the independent term stops at j,
the cascaded term at ``window.start``). Two facts make this cheap and exact:

* the vector-Jacobian product is linear, so the parameter gradient of module m is one backward of
  the sum of every stream that reaches o_m (done once, when the last stream has arrived);
* a stream that must go on below m needs only the input-gradient VJP of module m (no weight
  gradients), taken per distinct window start since streams stop at different modules.

Per middle module and s = 2 that is 1 forward + 1 parameter backward + 1 input-only backward,
instead of 3 forwards + 3 full backwards. BatchNorm running statistics are updated once per
module per iteration (the published schedule updates them s+1 times with identical batch
statistics).

Switch ``overlap`` (off by default) queues module j+1's forward before window j's heads and
backward; given a ``side_stream`` (a second CUDA stream, owned by the caller's runtime) the heads
run on it, so head work overlaps module work (inside a CUDA graph the two streams become parallel
branches). The gradients are the same; the saved-activation peak grows by at most one module
(o_{j+1}'s graph is alive during window j).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch


def _reach(windows, num_modules: int) -> tuple[list[int], list[bool]]:
    """For module m: the step (window index) after which no more gradient reaches it (-1: never), and
    whether some stream passes through m to module m-1 (then m's input leaf needs a gradient)."""
    done_at, passes = [-1] * num_modules, [False] * num_modules
    for w in windows:
        starts = ([w.index] if w.ind_weight is not None else []) + ([w.start] if w.start is not None else [])
        for start in starts:
            for m in range(start, w.index + 1):
                done_at[m] = max(done_at[m], w.index)
                passes[m] = passes[m] or start < m
    return done_at, passes


def once(model, images: torch.Tensor, targets: torch.Tensor, grad_scaler=None, *, overlap: bool = False,
         side_stream: torch.cuda.Stream | None = None) -> dict:
    """Forward each module once, back-propagate every window's objective exactly as far as it reaches.

    ``overlap``: window j after module j+1's forward (same maths); ``side_stream`` (CUDA batches,
    with ``overlap``): the stream that runs the heads."""
    modules = model.local_modules
    windows = {w.index: w for w in model.windows}
    done_at, passes = _reach(model.windows, len(modules))
    if side_stream is not None and not (overlap and images.is_cuda):
        raise ValueError("schedule 'once': side_stream needs overlap=True and a batch on a CUDA device")
    step = _Step(model, images, targets, grad_scaler, done_at, side_stream)
    defer = overlap
    h, behind = images, None  # behind: (j, o_j, ready) of the window deferred until module j+1 is queued
    with torch.enable_grad():
        for j, module in enumerate(modules):
            z = h.detach().requires_grad_(passes[j]) if j > 0 else h
            with torch.set_grad_enabled(done_at[j] >= 0):
                h = module(z)
            if done_at[j] >= 0:
                step.graphs[j] = (z, h)
            ready = step.mark() if defer and j in windows else None  # o_j done, before module j+1
            if behind is not None:
                step.window(*behind)
                behind = None
            if j in windows:
                if defer:
                    behind = (windows[j], h, ready)
                else:
                    step.window(windows[j], h)
        if behind is not None:
            step.window(*behind)
        step.join()
    if step.graphs:  # cannot happen for windows built by make_windows; guards hand-made window lists
        raise RuntimeError(f"schedule 'once': modules {sorted(step.graphs)} kept a graph past their last window")
    return {
        "loss": torch.stack(step.module_losses).sum(),
        "module_losses": step.module_losses,
        "logits": None if step.logits is None else step.logits.detach(),
    }


class _Step:
    """State of one iteration: the kept module graphs, the pending cotangents and the losses.

    With a side stream (``overlap``), the loop above queues module j+1's forward before window j,
    and window j's heads (forward and backward) run on the side stream, so they overlap with
    module work on the main stream; each cotangent crosses back with an explicit wait (autograd
    takes the calling stream as the producer of ``grad_outputs``) and ``record_stream`` (it was
    allocated on the side stream but is read on the main one).
    """

    def __init__(self, model, images, targets, grad_scaler, done_at, side):
        self.model, self.images, self.targets, self.grad_scaler = model, images, targets, grad_scaler
        self.done_at, self.side = done_at, side
        self.main = torch.cuda.current_stream(images.device) if side is not None else None
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # m -> (input leaf, output)
        self.pending: dict[int, torch.Tensor] = {}  # m -> sum of the cotangents that reached o_m so far
        self.module_losses = [images.new_zeros((), dtype=torch.float32) for _ in model.local_modules]
        self.logits = None

    def mark(self):
        """An event on the main stream at this point (None without a side stream)."""
        if self.side is None:
            return None
        event = torch.cuda.Event()
        event.record(self.main)
        return event

    def window(self, window, h, ready=None) -> None:
        """Both objective terms of ``window`` on its output h = o_j, each stream carried down at once.
        ``ready``: the event after o_j's forward (the side stream must not also wait for module j+1).

        The cascaded term goes first: its stream completes module ``start`` and frees that graph
        before the independent head (as heavy as the DGL head can be) is built."""
        model, j = self.model, window.index
        terms = []
        if window.start is not None:
            terms.append((window.start, window.casc_weight, model.cascade_loss))
        if window.ind_weight is not None:
            terms.append((j, window.ind_weight, model.independent_loss))
        if self.side is not None and ready is not None:
            self.side.wait_event(ready)
        elif self.side is not None:
            self.side.wait_stream(self.main)  # o_j (and everything before it) is ready
        objective = 0.0
        for n, (start, weight, loss_fn) in enumerate(terms):
            with torch.cuda.stream(self.side) if self.side is not None else nullcontext():
                leaf = h.detach().requires_grad_()
                loss, term_logits = loss_fn(j, leaf, self.images, self.targets)
                term = weight * loss
                (term if self.grad_scaler is None else self.grad_scaler.scale(term)).backward()
                objective = objective + term.detach().float()
                self.logits = term_logits if term_logits is not None else self.logits  # independent last
                cotangent = leaf.grad
                del leaf, loss, term
            if cotangent is None:
                continue
            if self.side is not None:
                self.main.wait_stream(self.side)
                cotangent.record_stream(self.main)
            _propagate(model.local_modules, self.graphs, self.pending, start, cotangent, j, self.done_at,
                       last_term=n + 1 == len(terms))
        self.module_losses[j] = objective

    def join(self) -> None:
        """Make the main stream wait for the side stream's last head (losses, head gradients)."""
        if self.side is not None:
            self.main.wait_stream(self.side)


def _propagate(modules, graphs, pending, start, cotangent, j, done_at, last_term) -> None:
    """Carry one stream (a cotangent at o_j that stops at module ``start``) down through modules
    j, j-1, ..., start; finish each module whose last stream has arrived with one parameter
    backward, which also frees its graph (module j itself only after the window's last term)."""
    for m in range(j, start - 1, -1):
        z, out = graphs[m]
        pending[m] = cotangent if m not in pending else pending[m] + cotangent
        if m > start:  # input-only VJP; the graph stays for the parameter backward
            (cotangent,) = torch.autograd.grad(out, z, grad_outputs=cotangent, retain_graph=True)
        if done_at[m] == j and (m < j or last_term):
            params = [p for p in modules[m].parameters() if p.requires_grad]
            torch.autograd.backward(out, grad_tensors=pending.pop(m), inputs=params)
            del graphs[m]
