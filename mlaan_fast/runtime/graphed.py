"""``LocalModel.local_step`` captured once per batch shape in a CUDA graph and replayed.

A local-learning step launches thousands of small kernels from Python (every module, head, LAM
and their backward passes); at CIFAR sizes the GPU waits on the launches. With static shapes the
whole step can be recorded once and replayed with one launch. What the replay reads from device
memory at replay time, and is therefore current: the input batch (copied into static buffers),
the weights, BatchNorm buffers, EMA shadows and the grad scaler's scale. What it writes: the
same gradient tensors every time, re-attached to ``.grad`` after each replay, so
``optimizer.zero_grad(set_to_none=True)`` between steps is harmless and not needed (the graph's
first write to each gradient overwrites it).

Rules that keep the replay exact: the optimizer step and the EMA update stay outside (their
learning rate changes every step); autocast is applied here, with its weight-cast cache off (a
cached cast would freeze last step's weights into the graph); nothing in the step may read a
device value on the host (the fused aux-head op skips its target check while capturing, so
labels must be checked on the host, as the trainer does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mlaan_fast.runtime.step import check_overlap
from mlaan_fast.runtime.streams import side_stream


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    images: torch.Tensor
    targets: torch.Tensor
    out: dict
    grads: list  # (parameter, the gradient tensor the graph writes)


class GraphedLocalStep:
    """Callable like ``model.local_step(images, targets, grad_scaler)`` on CUDA, replaying a CUDA graph.

    ``amp_dtype``: None (fp32), torch.bfloat16 or torch.float16 (autocast inside the graph; call
    this outside any autocast). ``overlap``: as for :class:`LocalStep` (the heads' stream becomes a
    parallel branch of the graph). The first ``warmup`` calls of a new batch shape run eagerly (cuDNN
    and cuBLAS initialise lazily, optimizer state appears); the next one is captured and replayed.
    At most ``max_graphs`` shapes get a graph (e.g. full and last partial batch); others run eagerly.
    """

    def __init__(self, model, *, amp_dtype: torch.dtype | None = None, warmup: int = 2, max_graphs: int = 2,
                 overlap: bool = False):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedLocalStep: CUDA graphs need a CUDA device; none is available")
        if amp_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError("GraphedLocalStep: amp_dtype must be None, torch.bfloat16 or torch.float16, "
                             f"got {amp_dtype}")
        if warmup < 1:
            raise ValueError(f"GraphedLocalStep: warmup must be >= 1, got {warmup}")
        self.model, self.amp_dtype, self.warmup, self.max_graphs = model, amp_dtype, warmup, max_graphs
        self.overlap = check_overlap(model, overlap)
        self._graphs: dict[tuple, _Graph] = {}
        self._calls: dict[tuple, int] = {}
        self._pool = None  # one memory pool for every graph: they are replayed one after another
        self._stream = None

    @property
    def num_graphs(self) -> int:
        """How many batch shapes have been captured."""
        return len(self._graphs)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, grad_scaler=None,
                 on_grads_ready=None) -> dict:
        """images [B,3,H,W] and int64 targets [B] on the model's GPU -> local_step's dict (fresh tensors).
        ``on_grads_ready`` is not called: a replayed graph cannot call back; gradients are reduced after."""
        if not (images.is_cuda and targets.is_cuda):
            raise ValueError(f"GraphedLocalStep: images and targets must be on a CUDA device, got "
                             f"{images.device} and {targets.device}")
        if torch.is_autocast_enabled("cuda"):
            raise RuntimeError("GraphedLocalStep: call it outside torch.autocast; pass amp_dtype instead "
                               "(the graph applies autocast itself, without the weight-cast cache)")
        key = (tuple(images.shape), tuple(images.stride()), images.dtype, images.device, tuple(targets.shape),
               grad_scaler is not None)
        entry = self._graphs.get(key)
        if entry is None:
            seen = self._calls[key] = self._calls.get(key, 0) + 1
            if seen <= self.warmup or len(self._graphs) >= self.max_graphs:
                return self._eager(images, targets, grad_scaler)
            entry = self._graphs[key] = self._capture(images, targets, grad_scaler)
        entry.images.copy_(images)
        entry.targets.copy_(targets)
        entry.graph.replay()
        for p, g in entry.grads:
            p.grad = g
        return _fresh(entry.out)

    def _autocast(self):
        return torch.autocast("cuda", dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None,
                              cache_enabled=False)

    def _local_step(self, images, targets, grad_scaler) -> dict:
        heads = side_stream(images.device) if self.overlap else None
        return self.model.local_step(images, targets, grad_scaler, overlap=self.overlap, side_stream=heads)

    def _capture_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _eager(self, images, targets, grad_scaler) -> dict:
        # On a side stream, as capture will be: lazily created per-stream state exists before capture.
        side, main = self._capture_stream(), torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side), self._autocast():
            out = self._local_step(images, targets, grad_scaler)
        main.wait_stream(side)
        return out

    def _capture(self, images, targets, grad_scaler) -> _Graph:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = None  # the graph allocates the gradients in its pool and writes them on every replay
        static_images, static_targets = images.clone(), targets.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            # thread_local: a DataLoader's pin-memory thread may call CUDA while we capture.
            with torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream(),
                                  capture_error_mode="thread_local"):
                with self._autocast():
                    out = self._local_step(static_images, static_targets, grad_scaler)
        except RuntimeError as exc:
            raise RuntimeError("GraphedLocalStep: the step could not be captured in a CUDA graph (something "
                               "in it synchronises with the host or changes shape); run without CUDA graphs. "
                               f"Cause: {exc}"
                               ) from exc
        self._pool = graph.pool()
        grads = [(p, p.grad) for p in params if p.grad is not None]
        return _Graph(graph, static_images, static_targets, out, grads)


def _fresh(out: dict) -> dict:
    """Copies of the graph's static outputs, which the next replay overwrites."""
    return {"loss": out["loss"].clone(),
            "module_losses": [t.clone() if isinstance(t, torch.Tensor) else t for t in out["module_losses"]],
            "logits": None if out["logits"] is None else out["logits"].clone()}
