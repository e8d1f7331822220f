"""One rank's part of a module pipeline: its stage's step in ``sync`` or ``async`` mode, the EMA
weight exchange after each optimizer step, inference through the stages, and the single-model
state gathered on rank 0.

**sync** (exact). The batch runs as n micro-batches. For each one the stage receives its input
activation, runs its modules forward once (``OnceStep``), sends its output on at once, runs the
windows that end in it and sends the gradient streams that go on below its first module back to
the previous stage. The streams the next stage sends back for micro-batch i are taken while the
stage works on micro-batch i+1, so stages work at the same time; the graphs of a stage's last
s-1 modules stay alive until those streams arrive. After the last micro-batch every rank holds
exactly the gradients a single process gets from ``local_step`` on the n micro-batches in turn
(each loss divided by n), in the same order of accumulation.

**async** (decoupled, one step of staleness). No micro-batches and no flush: each stage steps on
the newest batch whose activations it has, while its predecessor already works on the next one.
The streams of the windows that cross into it arrive one step late and are added to the next
step's gradient, back-propagated through its last modules recomputed on the stored input with
the current weights (their BatchNorm statistics untouched). EMA shadows on stage p follow stage
q's weights sent after q's step t - (q - p) - 1 (received without waiting), sync mode uses the
weights of the same step. Each epoch ends with ``drain``: the last batch's streams are dropped and
every stage is left as a run resumed from the epoch's checkpoint starts, so resuming is exact.

Messages of different kinds travel in different process groups (``PipelineGroups``) so each
group's order is simple and inference or weight exchange never interleaves with training traffic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mlaan_fast.models.schedule_once import OnceStep, Stream
from mlaan_fast.runtime.pipeline.comm import Link, PipelineError
from mlaan_fast.runtime.pipeline.partition import Partition
from mlaan_fast.runtime.pipeline.stage import (
    StageModel,
    layouts,
    optimizer_state_by_name,
    stage_optimizer_state,
    whole_model_state,
    whole_optimizer_state,
)
from mlaan_fast.runtime.step import MicroBatchScale, combine_microbatches

MODES = ("sync", "async")
# torch 2.6's gloo process group deadlocked in our tests when destroyed after the pipeline's
# point-to-point traffic (its destructor joins a worker thread that waits for the GIL).
MIN_TORCH = (2, 7)


def pipeline_supported() -> bool:
    """True when this torch release is at least MIN_TORCH."""
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= MIN_TORCH


def check_torch_release() -> None:
    """Refuse (ValueError) a torch older than MIN_TORCH for the module pipeline."""
    if not pipeline_supported():
        raise ValueError(f"the module pipeline needs torch >= {'.'.join(map(str, MIN_TORCH))}, this is torch "
                         f"{torch.__version__} (its gloo process group can hang at shutdown after "
                         "point-to-point traffic); upgrade torch or run without --pipeline-stages")


@dataclass(frozen=True)
class PipelineGroups:
    """Process groups of a P x D run (rank = replica * P + stage): point-to-point traffic of training,
    EMA weights and inference in their own groups; the data-parallel group of this rank's stage."""

    train: object
    weights: object
    infer: object
    data_parallel: object


def make_groups(num_stages: int, num_replicas: int, rank: int) -> PipelineGroups:
    """Create every group (all ranks call this in the same order) and return this rank's."""
    world = list(range(num_stages * num_replicas))
    train, weights, infer = (dist.new_group(world) for _ in range(3))
    data_parallel = None
    for p in range(num_stages):
        group = dist.new_group([d * num_stages + p for d in range(num_replicas)])
        if rank % num_stages == p:
            data_parallel = group
    return PipelineGroups(train, weights, infer, data_parallel)


class Pipeline:
    """This rank's stage of pipeline replica ``replica``: ``step``, ``update_shadows``, ``infer``."""

    def __init__(self, model, partition: Partition, *, stage: int, replica: int, device: torch.device,
                 groups: PipelineGroups, mode: str = "sync", microbatches: int = 1, timeout_s: float = 600.0,
                 template=None):
        if mode not in MODES:
            raise ValueError(f"pipeline_mode: unknown {mode!r}; choose one of {', '.join(MODES)}")
        check_torch_release()
        P = partition.num_stages
        every_layout = layouts(model, partition)
        self.layout = layout = every_layout[stage]
        if mode == "async" and microbatches != 1:
            raise ValueError("microbatches: the async pipeline steps on whole batches; use "
                             "--pipeline-mode sync")
        if mode == "async" and any(s < layout.first for _, s in layout.streams_in):
            held = layout.last - layout.first + 1
            raise ValueError(f"pipeline_mode async: stage {stage} holds {held} module(s), "
                             "fewer than a window spans; use fewer stages or the sync mode")
        self.model, self.partition, self.mode, self.n = model, partition, mode, microbatches
        self.template = template  # () -> a whole LocalModel on the CPU, for the gathered state (rank 0)
        self.stage_index, self.replica, self.device = stage, replica, device
        self.stage = StageModel(model, layout, device)
        self.windows = {w.index: w for w in model.windows if layout.first <= w.index <= layout.last}

        def link(q, group):
            return Link(stage, q, replica * P + q, device, timeout_s, group)

        self.prev = None if layout.is_first else link(stage - 1, groups.train)
        self.next = None if layout.is_last else link(stage + 1, groups.train)
        self.infer_prev = None if layout.is_first else link(stage - 1, groups.infer)
        self.infer_next = None if layout.is_last else link(stage + 1, groups.infer)
        self.weights_in = {q: link(q, groups.weights) for q in layout.live_in}
        self.weights_out = {q: link(q, groups.weights) for q in layout.live_out}
        # Shadows several stages hold (their LAMs read the same one): in async mode each copy follows the
        # live block with its own lag, so at the end of an epoch the copy of the last of them (the
        # nearest to the live block, the one a checkpoint keeps) replaces the others.
        holders: dict = {}
        for other in every_layout:
            for ref in other.shadows:
                holders.setdefault(ref, []).append(other.index)
        self._shared_shadows = [(ref, max(h), [p for p in h if p != max(h)]) for ref, h in holders.items()
                                if len(h) > 1 and stage in h]
        self.shadow_links = {q: link(q, groups.weights) for ref, last, others in self._shared_shadows
                             for q in ([last] if stage != last else others)}
        self.groups = groups
        # Streams the next stage sends back that go on below this stage (sync mode handles them).
        self._passing = any(s < layout.first for _, s in layout.streams_in)
        self._steps_done = 0
        self._stale = None  # async: the previous batch's input to this stage's last modules
        self._pending: list = []  # sends started and not yet waited for: (link, request, tensor)
        self._late: list = []  # async: the streams sent back in the last step, taken in the previous
        # stage's next step, so waited for one step later (see _async_step)
        self._weights_sent = 0  # updates of the shadows so far (one weight message per owner each)
        self._weight_sends: list = []  # (update count, link, request, tensor) not yet waited for

    # ------------------------------------------------------------------ training step
    def parameters(self) -> list[torch.nn.Parameter]:
        """This stage's trainable parameters (what its optimizer and data-parallel all-reduce see)."""
        return self.stage.parameters()

    def step(self, images: torch.Tensor, targets: torch.Tensor, grad_scaler=None) -> dict:
        """One training step of this stage; -> local_step's dict (module losses of other stages are 0,
        logits only on the last stage, else None). Every stage is given the same batch."""
        with torch.enable_grad():
            out = self._sync_step(images, targets, grad_scaler) if self.mode == "sync" else \
                self._async_step(images, targets, grad_scaler)
        self._steps_done += 1
        return out

    def _send(self, link: Link, tensors: list[torch.Tensor], header: bool) -> None:
        if header:
            self._pending += [(link, r, t) for r, t in link.send_tensors(tensors)]
        else:
            for t in tensors:
                t = t.detach().contiguous()
                self._pending.append((link, link.isend(t), t))

    def _wait_sends(self, keep_streams: bool = False) -> None:
        """Wait for the sends started so far; ``keep_streams`` (async): those of the streams sent back in
        this step wait until the end of the next one, those of the step before are waited for now."""
        now = self._late + [send for send in self._pending if not (keep_streams and send[0] is self.prev)]
        self._late = [send for send in self._pending if keep_streams and send[0] is self.prev]
        for link, request, _ in now:
            link.wait(request, "sending to")
        self._pending = []

    def _send_streams(self, streams: list[Stream]) -> None:
        got = tuple((s.window, s.start) for s in streams)
        if got != self.layout.streams_out:  # the plan and the schedule must agree; never a user error
            raise PipelineError(f"pipeline stage {self.stage_index}: streams {got} differ from the plan "
                                f"{self.layout.streams_out}")
        if streams:
            self._send(self.prev, [s.cotangent for s in streams], header=False)

    def _receive_streams(self, step: OnceStep, output: torch.Tensor) -> list[Stream]:
        buffers = [torch.empty_like(output) for _ in self.layout.streams_in]
        self.next.recv_into(buffers)
        streams = [Stream(j, s, self.layout.last, b) for (j, s), b in zip(self.layout.streams_in, buffers)]
        return step.receive(streams)

    def _run_stage(self, step: OnceStep, x: torch.Tensor, first: int, keep_at: int | None = None):
        """Forward modules first..last (sending o_last on as soon as it exists) and this stage's windows;
        -> (o_last, streams going below, the input of module ``keep_at`` if asked)."""
        layout, h, below, kept = self.layout, x, [], None
        for m in range(first, layout.last + 1):
            if m == keep_at:
                kept = h.detach()
            h = step.forward(m, h)
            if m == layout.last and self.next is not None:
                self._send(self.next, [h], header=True)
            if m in self.windows:
                below += step.window(self.windows[m], h)
        return h, below, kept

    def _sync_step(self, images, targets, grad_scaler) -> dict:
        layout, n = self.layout, self.n
        if n > images.shape[0]:
            raise ValueError(f"microbatches: {n} micro-batches of a batch of {images.shape[0]} images")
        scale = MicroBatchScale(grad_scaler, n)
        chunks = list(zip(images.tensor_split(n), targets.tensor_split(n)))
        steps, outputs, below = [], [], []
        takes_streams = self.next is not None and bool(layout.streams_in)
        for i, (x_i, t_i) in enumerate(chunks):
            x = x_i if layout.is_first else self.prev.recv_tensors(1)[0]
            step = OnceStep(self.model, x_i, t_i, scale, first=layout.first, last=layout.last)
            h, streams, _ = self._run_stage(step, x, layout.first)
            steps.append(step)
            outputs.append(h)
            below.append(streams)
            if not self._passing and self.prev is not None:
                self._send_streams(below[i])
            if takes_streams and i >= 1:
                self._finish_microbatch(steps, outputs, below, i - 1)
        if takes_streams:
            self._finish_microbatch(steps, outputs, below, n - 1)
        self._wait_sends()
        return combine_microbatches([s.result() for s in steps])

    def _finish_microbatch(self, steps, outputs, below, i) -> None:
        """Take micro-batch i's streams from the next stage; send on those that go below this stage."""
        below[i] += self._receive_streams(steps[i], outputs[i])
        outputs[i] = None
        if self._passing and self.prev is not None:
            self._send_streams(below[i])

    def _async_step(self, images, targets, grad_scaler) -> dict:
        layout = self.layout
        x = images if layout.is_first else self.prev.recv_tensors(1)[0]
        local = [w for w in self.model.windows if layout.first <= w.index <= layout.last]
        step = OnceStep(self.model, images, targets, grad_scaler, first=layout.first, last=layout.last,
                        windows=local)
        takes_streams = self.next is not None and bool(layout.streams_in)
        reach = max(layout.first, min((s for _, s in layout.streams_in), default=layout.last))
        h, below, kept = self._run_stage(step, x, layout.first, keep_at=reach if takes_streams else None)
        if self.prev is not None:
            self._send_streams(below)
        out = step.result()
        if takes_streams:
            if self._stale is not None:
                self._apply_stale_streams(*self._stale, grad_scaler)
            self._stale = (kept, images, targets, reach, torch.empty_like(h))
        # The previous stage takes this step's streams in its next step. Waiting for them here would
        # block on it while it waits in whatever comes between steps (the trainer's all-reduce of the
        # losses, a data-parallel reduction): a deadlock. They are waited for at the end of the next step.
        self._wait_sends(keep_streams=True)
        return out

    def _apply_stale_streams(self, kept, images, targets, reach, output_like, grad_scaler) -> None:
        """The previous batch's streams from the next stage, through modules reach..last recomputed on
        that batch's stored input with the current weights; BatchNorm statistics are left as they were."""
        layout, model = self.layout, self.model
        crossing = [w for w in model.windows if w.index > layout.last and w.start is not None
                    and w.start <= layout.last]
        modules = [model.local_modules[m] for m in range(reach, layout.last + 1)]
        saved = [b.clone() for mod in modules for b in mod.buffers()]
        redo = OnceStep(model, images, targets, grad_scaler, first=reach, last=layout.last, windows=crossing)
        h = kept
        for m in range(reach, layout.last + 1):
            h = redo.forward(m, h)
        self._receive_streams(redo, output_like)
        with torch.no_grad():
            for b, old in zip((b for mod in modules for b in mod.buffers()), saved):
                b.copy_(old)

    # ------------------------------------------------------------------ EMA shadows
    @torch.no_grad()
    def update_shadows(self) -> None:
        """After the optimizer step: send the live blocks other stages' shadows follow, receive the
        boundary copies this stage's shadows follow, then one fused EMA update of its shadows."""
        stage = self.stage
        self._weights_sent += 1
        for q, positions in self.layout.live_out.items():
            flat = torch.cat([p.detach().reshape(-1) for pos in positions
                              for p in stage.boundary_parameters(pos)])
            link = self.weights_out[q]
            self._weight_sends.append((self._weights_sent, link, link.isend(flat), flat))
        # A holder (stage q < this one) takes message c - lag at its c-th update and is never behind this
        # stage, so every message up to this count minus the lag has been taken: waiting cannot block.
        while self._weight_sends and (self.mode == "sync" or self._weight_sends[0][0] <= self._weights_sent
                                      - self._lag(self._weight_sends[0][1].peer_stage)):
            _, link, request, _ = self._weight_sends.pop(0)
            link.wait(request, "sending weights to")
        for q, positions in self.layout.live_in.items():
            if self._weights_sent <= self._lag(q):
                continue  # async: nothing sent early enough yet; the shadows follow the initial weights
            flat = self._weights_buffer(positions)
            self.weights_in[q].recv_into([flat])
            self._copy_boundary(positions, flat)
        self.model.update_shadows()

    def _share_shadows(self) -> None:
        """Async, end of an epoch: every shared shadow takes the value of its last holder's copy."""
        for ref, last, others in self._shared_shadows:
            shadow = self.stage.shadow(ref)
            if self.stage_index == last:
                flat = torch.cat([t.reshape(-1) for t in shadow.parameters()])
                for q in others:
                    self._pending.append((self.shadow_links[q], self.shadow_links[q].isend(flat), flat))
            else:
                flat = torch.cat([t.reshape(-1) for t in shadow.parameters()])
                self.shadow_links[last].recv_into([flat])
                offset = 0
                for t in shadow.parameters():
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()

    def _copy_boundary(self, positions, flat: torch.Tensor) -> None:
        offset = 0
        for p in (p for pos in positions for p in self.stage.boundary_parameters(pos)):
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def _weights_buffer(self, positions) -> torch.Tensor:
        params = [p for pos in positions for p in self.stage.boundary_parameters(pos)]
        return torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=self.device)

    def _lag(self, holder_or_owner: int) -> int:
        """Async: how many updates behind the weights exchanged between this stage and another are
        (q - p + 1 for owner q and holder p); sync: 0."""
        return 0 if self.mode == "sync" else abs(holder_or_owner - self.stage_index) + 1

    @torch.no_grad()
    def drain(self) -> None:
        """End of an epoch. Async: take the messages still under way so every send completes, and leave
        each stage as a run resumed from this epoch's checkpoint starts: the last batch's streams are
        dropped, the boundary copies hold their owners' newest weights, the weight lag starts again.
        Sync: nothing is ever left."""
        if self.mode == "async":
            if self._stale is not None and self.next is not None:
                output_like = self._stale[4]
                self.next.recv_into([torch.empty_like(output_like) for _ in self.layout.streams_in])
                self._stale = None
            for q, positions in self.layout.live_in.items():
                flat = self._weights_buffer(positions)
                pending = min(self._weights_sent, self._lag(q))
                for _ in range(pending):
                    self.weights_in[q].recv_into([flat])
                if pending:  # the last message: the owner's weights after its last step
                    self._copy_boundary(positions, flat)
            self._weights_sent = 0
            self._share_shadows()
        self._wait_sends()
        for _, link, request, _ in self._weight_sends:
            link.wait(request, "sending weights to")
        self._weight_sends = []

    # ------------------------------------------------------------------ inference and state
    @torch.no_grad()
    def infer(self, images: torch.Tensor) -> torch.Tensor | None:
        """The model's inference forward through the stages: logits [B,N] on the last stage, else None."""
        layout = self.layout
        h = images if layout.is_first else self.infer_prev.recv_tensors(1)[0]
        for m in range(layout.first, layout.last + 1):
            h = self.model.local_modules[m](h)
        if not layout.is_last:
            pending = self.infer_next.send_tensors([h])
            self.infer_next.finish(pending)
            return None
        return self.model.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1))

    def gather_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict] | None:
        """The whole model's state dict and the single-process optimizer state on rank 0 (None elsewhere),
        from replica 0's stages (every rank must call it)."""
        names = self.stage.parameter_names()
        mine = None
        if self.replica == 0:
            mine = (self.stage.owned_state(), optimizer_state_by_name(optimizer, names))
        rank = dist.get_rank()
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if rank != 0:
            return None
        parts = [g for g in gathered if g is not None]
        model_state = whole_model_state(self.template(), [part[0] for part in parts])
        by_name = {k: v for part in parts for k, v in part[1].items()}
        return model_state, whole_optimizer_state(optimizer, by_name, self.stage.all_parameter_names)

    def stage_optimizer_state(self, whole: dict) -> dict:
        """This stage's part of a single-process optimizer state dict (to load into its optimizer)."""
        return stage_optimizer_state(whole, self.stage.all_parameter_names, self.stage.parameter_names())

    def _links(self) -> list[Link]:
        links = [self.prev, self.next, self.infer_prev, self.infer_next, *self.weights_in.values(),
                 *self.weights_out.values(), *self.shadow_links.values()]
        return [link for link in links if link is not None]

    def bytes_sent(self) -> int:
        """Bytes this rank has sent to other stages so far (activations, gradient streams, weights)."""
        return sum(link.bytes_sent for link in self._links())

    def waited_s(self) -> float:
        """Seconds this rank has spent waiting for other stages so far (its share of the bubble)."""
        return sum(link.waited_s for link in self._links())
