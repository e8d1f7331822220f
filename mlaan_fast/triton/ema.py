"""Triton EMA kernels: shadow <- decay*shadow + (1-decay)*live for a flat buffer pair or a tensor list.

The flat form is one launch over one contiguous fp32 shadow buffer and one contiguous live buffer.
The list form is also one launch: a table of (shadow address, live address, numel, live dtype) per
tensor and (tensor, chunk) per program; addresses are cast back to pointers inside the kernel, so
mixed live dtypes share the launch.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

_LIVE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_FLAT_BLOCK = 4096
_LIST_BLOCK = 2048


@triton.jit
def _lerp(s, x, w, omw, SMALL_W: tl.constexpr):
    # torch.lerp's two-sided form: exact at w = 0 (keeps s) and at w = 1 (gives x).
    if SMALL_W:
        out = s + w * (x - s)
    else:
        out = x - (x - s) * omw
    return out


@triton.jit
def _ema_flat_kernel(shadow_ptr, live_ptr, n, w, omw, SMALL_W: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(shadow_ptr + offs, mask=mask)
    x = tl.load(live_ptr + offs, mask=mask).to(tl.float32)
    tl.store(shadow_ptr + offs, _lerp(s, x, w, omw, SMALL_W), mask=mask)


@triton.jit
def _ema_list_kernel(entries_ptr, chunks_ptr, w, omw, SMALL_W: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(chunks_ptr + 2 * pid)
    chunk = tl.load(chunks_ptr + 2 * pid + 1)
    entry = entries_ptr + 4 * tensor
    shadow_ptr = tl.load(entry).to(tl.pointer_type(tl.float32))
    live_addr = tl.load(entry + 1)
    n = tl.load(entry + 2)
    code = tl.load(entry + 3)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(shadow_ptr + offs, mask=mask)
    # bf16/fp16 are widened to fp32 here: the arithmetic never runs in 16 bits.
    if code == 0:
        x = tl.load(live_addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask).to(tl.float32)
    elif code == 1:
        x = tl.load(live_addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask).to(tl.float32)
    else:
        x = tl.load(live_addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask).to(tl.float32)
    tl.store(shadow_ptr + offs, _lerp(s, x, w, omw, SMALL_W), mask=mask)


def _weights(decay: float) -> tuple[float, float, bool]:
    """(w, 1 - w, |w| < 0.5) for w = 1 - decay, rounded to fp32 exactly as torch.lerp does."""
    w = np.float32(1.0 - decay)
    return float(w), float(np.float32(1.0) - w), bool(abs(w) < 0.5)


def ema_update_flat(shadow: torch.Tensor, live: torch.Tensor, decay: float) -> None:
    """One launch: shadow (fp32, contiguous, [N]) <- decay*shadow + (1-decay)*live (fp32/bf16/fp16, [N])."""
    live = live.contiguous()
    n = shadow.numel()
    if n == 0:
        return
    w, omw, small_w = _weights(decay)
    grid = (triton.cdiv(n, _FLAT_BLOCK),)
    _ema_flat_kernel[grid](shadow, live, n, w, omw, SMALL_W=small_w, BLOCK=_FLAT_BLOCK, num_warps=8)


def ema_update_list(shadow: list[torch.Tensor], live: list[torch.Tensor], decay: float) -> None:
    """One launch for every pair: shadow[i] (fp32, contiguous) <- decay*shadow[i] + (1-decay)*live[i]."""
    live = [t.contiguous() for t in live]  # the copies stay referenced until the launch is queued
    numel = torch.tensor([s.numel() for s in shadow], dtype=torch.int64)
    entries = torch.tensor(
        [[s.data_ptr(), t.data_ptr(), s.numel(), _LIVE_CODES[t.dtype]] for s, t in zip(shadow, live)],
        dtype=torch.int64,
    ).reshape(-1)
    counts = (numel + _LIST_BLOCK - 1) // _LIST_BLOCK
    n_chunks = int(counts.sum())
    if n_chunks == 0:
        return
    first = torch.cumsum(counts, 0) - counts
    tensor_of_chunk = torch.repeat_interleave(torch.arange(len(shadow)), counts)
    chunk_in_tensor = torch.arange(n_chunks) - torch.repeat_interleave(first, counts)
    table = torch.cat([entries, torch.stack([tensor_of_chunk, chunk_in_tensor], 1).reshape(-1)])
    device = shadow[0].device
    if device.type != "cpu":
        # One async copy from pinned memory; torch keeps the pinned block until the copy is done.
        table = table.pin_memory().to(device, non_blocking=True)
    w, omw, small_w = _weights(decay)
    _ema_list_kernel[(n_chunks,)](table, table[entries.numel():], w, omw, SMALL_W=small_w,
                                  BLOCK=_LIST_BLOCK, num_warps=8)
