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
from dataclasses import dataclass

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


@dataclass
class Stream:
    """A cotangent at the output of module ``at``, of a term of window ``window`` that stops at ``start``."""

    window: int
    start: int
    at: int
    cotangent: torch.Tensor


def once(model, images: torch.Tensor, targets: torch.Tensor, grad_scaler=None, *, overlap: bool = False,
         side_stream: torch.cuda.Stream | None = None, on_grads_ready=None) -> dict:
    """Forward each module once, back-propagate every window's objective exactly as far as it reaches.

    ``overlap``: window j after module j+1's forward (same maths); ``side_stream`` (CUDA batches,
    with ``overlap``): the stream that runs the heads; ``on_grads_ready(params)``: see :class:`OnceStep`."""
    if side_stream is not None and not (overlap and images.is_cuda):
        raise ValueError("schedule 'once': side_stream needs overlap=True and a batch on a CUDA device")
    step = OnceStep(model, images, targets, grad_scaler, side_stream=side_stream,
                    on_grads_ready=on_grads_ready)
    windows = {w.index: w for w in model.windows}
    h, behind = images, None  # behind: (window, o_j, ready) of the window deferred until module j+1 is queued
    with torch.enable_grad():
        for j in range(model.num_modules):
            h = step.forward(j, h)
            ready = step.mark() if overlap and j in windows else None  # o_j done, before module j+1
            if behind is not None:
                step.window(*behind)
                behind = None
            if j in windows:
                if overlap:
                    behind = (windows[j], h, ready)
                else:
                    step.window(windows[j], h)
        if behind is not None:
            step.window(*behind)
        step.join()
    return step.result()


class OnceStep:
    """One iteration (one batch) of the forward-once schedule over the modules ``first..last``: the kept
    module graphs, the pending cotangents and the losses.

    ``forward(m, x)`` runs module m once; ``window(w, o_j)`` back-propagates both terms of window w
    and ``receive(streams)`` continues streams that arrive at o_last from modules above ``last``.
    Streams that must go on below ``first`` come back from both as :class:`Stream` objects (a
    module pipeline sends them to the stage that holds module first-1); with the whole model in
    range there are none. ``on_grads_ready(params)`` is called once the gradients of ``params``
    (a module's, or a window's heads and LAM) are complete for this batch.

    With a side stream (``overlap``), window j's heads (forward and backward) run on the side
    stream, so they overlap with module work on the main stream; each cotangent crosses back with
    an explicit wait (autograd takes the calling stream as the producer of ``grad_outputs``) and
    ``record_stream`` (it was allocated on the side stream but is read on the main one).
    """

    def __init__(self, model, images, targets, grad_scaler=None, *, first: int = 0, last: int | None = None,
                 windows=None, side_stream=None, on_grads_ready=None):
        self.model, self.images, self.targets, self.grad_scaler = model, images, targets, grad_scaler
        self.first, self.last = first, model.num_modules - 1 if last is None else last
        # ``windows``: the windows whose streams this step carries (default all), which decides when a
        # module's gradient is complete and whether its input needs one.
        self.done_at, self.passes = _reach(model.windows if windows is None else windows, model.num_modules)
        self.side = side_stream
        self.main = torch.cuda.current_stream(images.device) if side_stream is not None else None
        self.on_grads_ready = on_grads_ready
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # m -> (input leaf, output)
        self.pending: dict[int, torch.Tensor] = {}  # m -> sum of the cotangents that reached o_m so far
        self.module_losses = [images.new_zeros((), dtype=torch.float32) for _ in model.local_modules]
        self.logits = None

    def forward(self, m: int, x: torch.Tensor) -> torch.Tensor:
        """o_m = module m on stopgrad(x) (x itself for the images); its graph stays while windows need it."""
        z = x.detach().requires_grad_(self.passes[m]) if m > 0 else x
        with torch.set_grad_enabled(self.done_at[m] >= 0):
            h = self.model.local_modules[m](z)
        if self.done_at[m] >= 0:
            self.graphs[m] = (z, h)
        return h

    def mark(self):
        """An event on the main stream at this point (None without a side stream)."""
        if self.side is None:
            return None
        event = torch.cuda.Event()
        event.record(self.main)
        return event

    def window(self, window, h, ready=None) -> list[Stream]:
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
        objective, below = 0.0, []
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
            below += self._propagate(Stream(j, start, j, cotangent), last_term=n + 1 == len(terms))
        self.module_losses[j] = objective
        if self.on_grads_ready is not None:
            self.on_grads_ready(model.window_parameters(j))
        return below

    def receive(self, streams: list[Stream]) -> list[Stream]:
        """Continue streams that arrived at o_last from above; -> those that go on below ``first``."""
        below = []
        for stream in streams:
            below += self._propagate(stream, last_term=True)
        return below

    def _propagate(self, stream: Stream, last_term: bool) -> list[Stream]:
        """Carry one stream down through modules at, at-1, ..., max(start, first); finish each module
        whose last stream has arrived with one parameter backward, which also frees its graph (module j
        itself only after its window's last term). -> [the stream at o_{first-1}] if it goes on below."""
        j, cotangent = stream.window, stream.cotangent
        for m in range(stream.at, max(stream.start, self.first) - 1, -1):
            z, out = self.graphs[m]
            self.pending[m] = cotangent if m not in self.pending else self.pending[m] + cotangent
            if m > stream.start:  # input-only VJP; the graph stays for the parameter backward
                (cotangent,) = torch.autograd.grad(out, z, grad_outputs=cotangent, retain_graph=True)
            if self.done_at[m] == j and (m < j or last_term):
                params = [p for p in self.model.local_modules[m].parameters() if p.requires_grad]
                torch.autograd.backward(out, grad_tensors=self.pending.pop(m), inputs=params)
                del self.graphs[m]
                if self.on_grads_ready is not None:
                    self.on_grads_ready(params)
        if stream.start < self.first:
            return [Stream(j, stream.start, self.first - 1, cotangent)]
        return []

    def join(self) -> None:
        """Make the main stream wait for the side stream's last head (losses, head gradients)."""
        if self.side is not None:
            self.main.wait_stream(self.side)

    def result(self) -> dict:
        """local_step's dict: total loss, per-module losses and the final logits (detached)."""
        if self.graphs:  # cannot happen for windows built by make_windows; guards hand-made window lists
            raise RuntimeError(f"schedule 'once': modules {sorted(self.graphs)} kept a graph past their last "
                               "window")
        return {
            "loss": torch.stack(self.module_losses).sum(),
            "module_losses": self.module_losses,
            "logits": None if self.logits is None else self.logits.detach(),
        }
