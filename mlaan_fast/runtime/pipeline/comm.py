"""Point-to-point messages between pipeline stages (torch.distributed isend/irecv), with time limits.

Between two ranks the messages of each direction are sent and received in one program order
(NCCL matches them by order, gloo by order within a tag), so every call here is made by both
sides in the same sequence. A tensor whose shape the receiver cannot know (an activation: the
last batch of an epoch is smaller) travels after a small header. A peer that died or stopped
answering within ``timeout`` raises :class:`PipelineError` naming the stage.
"""
from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64]
_HEADER = 8  # dtype code, rank, then up to 6 sizes


class PipelineError(RuntimeError):
    """A pipeline peer died, stopped answering, or disagreed: the message names the stage."""


class Link:
    """Messages between this rank (stage ``stage``) and the rank of stage ``peer_stage``."""

    def __init__(self, stage: int, peer_stage: int, peer_rank: int, device: torch.device, timeout_s: float,
                 group=None):
        self.stage, self.peer_stage, self.peer, self.group = stage, peer_stage, peer_rank, group
        self.device, self.timeout = device, datetime.timedelta(seconds=timeout_s)
        self.bytes_sent = 0
        self.waited_s = 0.0  # time spent waiting for this link's messages (idle, for the benchmark)

    def _fail(self, what: str, exc: Exception) -> PipelineError:
        cause = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        peer = f"stage {self.peer_stage} (rank {self.peer})"
        return PipelineError(f"pipeline stage {self.stage}: {what} {peer} "
                             f"failed or timed out after {self.timeout.total_seconds():g}s: {cause}")

    def wait(self, work, what: str) -> None:
        """Wait for one request, turning a dead or silent peer into a PipelineError."""
        start = time.perf_counter()
        try:
            work.wait(self.timeout)
        except Exception as exc:  # gloo/NCCL raise RuntimeError (or DistBackendError) here
            raise self._fail(what, exc) from None
        finally:
            self.waited_s += time.perf_counter() - start

    def isend(self, tensor: torch.Tensor):
        """Start sending ``tensor`` (contiguous); the caller keeps it alive until :meth:`wait`."""
        self.bytes_sent += tensor.numel() * tensor.element_size()
        try:
            return dist.isend(tensor, self.peer, group=self.group)
        except Exception as exc:
            raise self._fail("sending to", exc) from None

    def irecv(self, tensor: torch.Tensor):
        """Start receiving into ``tensor``."""
        try:
            return dist.irecv(tensor, self.peer, group=self.group)
        except Exception as exc:
            raise self._fail("receiving from", exc) from None

    def send_tensors(self, tensors: list[torch.Tensor]) -> list:
        """Start sending each tensor after a header giving its dtype and shape; -> requests and buffers
        to keep alive until they are waited for."""
        keep = []
        for t in tensors:
            t = t.detach().contiguous()
            header = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
            header[0], header[1] = _DTYPES.index(t.dtype), t.dim()
            header[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
            keep += [(self.isend(header), header), (self.isend(t), t)]
        return keep

    def recv_tensors(self, count: int) -> list[torch.Tensor]:
        """Receive ``count`` tensors sent by :meth:`send_tensors` (blocking, with the time limit)."""
        out = []
        for _ in range(count):
            header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
            self.wait(self.irecv(header), "receiving from")
            code, ndim, *sizes = header.tolist()
            t = torch.empty(sizes[:ndim], dtype=_DTYPES[code], device=self.device)
            self.wait(self.irecv(t), "receiving from")
            out.append(t)
        return out

    def recv_into(self, tensors: list[torch.Tensor]) -> None:
        """Receive into tensors whose shapes both sides know (blocking, with the time limit)."""
        requests = [self.irecv(t) for t in tensors]
        for r in requests:
            self.wait(r, "receiving from")

    def finish(self, pending: list) -> None:
        """Wait for started sends."""
        for request, _ in pending:
            self.wait(request, "sending to")
