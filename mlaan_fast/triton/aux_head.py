"""Triton kernels of the fused auxiliary-head loss (GAP -> Linear -> softmax cross-entropy).

Forward: one program per sample (pool, logits in class blocks with an online log-sum-exp, loss).
Backward: one program per sample for d(features); d(weight), d(bias) from tiles of
(classes x channels) over batch splits, each split's partial summed in a fixed order.
The class dimension may be tiny (N = 2, 10), so products use broadcast-multiply + ``tl.sum``.
A target outside [0, N) that reaches a kernel gives a NaN loss and NaN gradients: the range
check, where wanted, is the caller's.
Loops run to runtime bounds (``range(0, HW, BLOCK_HW)``); under TRITON_INTERPRET=1 with triton <= 3.6
and numpy >= 2.4 that needs the interpreter-only fix in ``_interpreter.py`` (installed by the package).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 4096  # elements of one 2-D register tile
_NUM_WARPS = 4


@triton.jit
def _aux_head_forward_kernel(
    x_ptr, w_ptr, bias_ptr, target_ptr, loss_ptr, logit_ptr, pool_ptr, lse_ptr,
    C, N, W, HW, stride_b, stride_c, stride_h, stride_w, eps,
    HAS_BIAS: tl.constexpr, HW_DENSE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_rows = x_ptr + b * stride_b + offs_c[:, None] * stride_c
    acc = tl.zeros([BLOCK_C], dtype=ACC)
    if HW_DENSE:  # position p at p * stride_w (NCHW, channels_last)
        for p0 in range(0, HW, BLOCK_HW):
            offs_p = p0 + tl.arange(0, BLOCK_HW)
            v = tl.load(x_rows + (offs_p * stride_w)[None, :], mask=mask_c[:, None] & (offs_p < HW)[None, :],
                        other=0.0)
            acc += tl.sum(v.to(ACC), axis=1)
    else:  # any strides: rows of W positions
        for h in range(0, HW // W):
            for w0 in range(0, W, BLOCK_HW):
                offs_w = w0 + tl.arange(0, BLOCK_HW)
                v = tl.load(x_rows + (h * stride_h + offs_w * stride_w)[None, :],
                            mask=mask_c[:, None] & (offs_w < W)[None, :], other=0.0)
                acc += tl.sum(v.to(ACC), axis=1)
    pooled = acc / HW
    tl.store(pool_ptr + b * C + offs_c, pooled, mask=mask_c)

    t = tl.load(target_ptr + b)
    run_max = tl.full([BLOCK_N], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_N], dtype=ACC)
    z_sum = tl.zeros([BLOCK_N], dtype=ACC)
    z_t = tl.zeros([BLOCK_N], dtype=ACC)
    nonfinite = tl.zeros([BLOCK_N], dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        w = tl.load(w_ptr + offs_n[:, None] * C + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :],
                    other=0.0)
        z = tl.sum(w * pooled[None, :], axis=1)
        if HAS_BIAS:
            z += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        tl.store(logit_ptr + b * N + offs_n, z, mask=mask_n)
        # per-lane online log-sum-exp; lanes that have seen only masked entries stay at (-inf, 0)
        zm = tl.where(mask_n, z, float("-inf"))
        new_max = tl.maximum(run_max, zm)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe_max) + tl.exp(zm - safe_max)
        run_max = new_max
        z_sum += tl.where(mask_n, z, 0.0)
        z_t += tl.where(offs_n == t, z, 0.0)
        # not `~(finite)`: triton 3.2's interpreter cannot invert a boolean (no int1 type in its builder)
        nonfinite += tl.where(tl.abs(z) < float("inf"), 0, tl.where(mask_n, 1, 0))
    row_max = tl.max(run_max, axis=0)
    total = tl.sum(run_sum * tl.exp(run_max - row_max), axis=0)
    lse = row_max + tl.log(total)
    # Non-finite logits (from non-finite features or weights) give a NaN loss, never a number.
    lse = tl.where(tl.sum(nonfinite, axis=0) > 0, float("nan"), lse)
    tl.store(lse_ptr + b, lse)
    loss = lse - (1.0 - eps) * tl.sum(z_t, axis=0) - eps * tl.sum(z_sum, axis=0) / N
    tl.store(loss_ptr + b, tl.where((t < 0) | (t >= N), float("nan"), loss))


@triton.jit
def _dlogits(g, z, lse, is_target, eps, N):
    """g * (softmax - (1 - eps) onehot - eps / N) for one block of logits."""
    return g * (tl.exp(z - lse) - tl.where(is_target, 1.0 - eps, 0.0) - eps / N)


@triton.jit
def _sample_grad(g, t, N):
    """d(loss) scale of a sample: NaN when its target is outside [0, N), so its gradients are NaN."""
    return tl.where((t < 0) | (t >= N), float("nan"), g)


@triton.jit
def _aux_head_backward_input_kernel(
    grad_loss_ptr, grad_logit_ptr, logit_ptr, lse_ptr, w_ptr, target_ptr, out_ptr,
    C, N, HW, out_stride_c, out_stride_p, eps,
    HAS_GRAD_LOGITS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    t = tl.load(target_ptr + b)
    g = _sample_grad(tl.load(grad_loss_ptr + b).to(ACC), t, N)
    lse = tl.load(lse_ptr + b).to(ACC)
    dpooled = tl.zeros([BLOCK_C], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        z = tl.load(logit_ptr + b * N + offs_n, mask=mask_n, other=0.0).to(ACC)
        dl = _dlogits(g, z, lse, offs_n == t, eps, N)
        if HAS_GRAD_LOGITS:
            dl += tl.load(grad_logit_ptr + b * N + offs_n, mask=mask_n, other=0.0).to(ACC)
        dl = tl.where(mask_n, dl, 0.0)
        w = tl.load(w_ptr + offs_n[:, None] * C + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :],
                    other=0.0)
        dpooled += tl.sum(w.to(ACC) * dl[:, None], axis=0)
    value = (dpooled / HW).to(out_ptr.dtype.element_ty)
    tile = tl.broadcast_to(value[:, None], [BLOCK_C, BLOCK_HW])
    out_rows = out_ptr + b * C * HW + offs_c[:, None] * out_stride_c
    for p0 in range(0, HW, BLOCK_HW):
        offs_p = p0 + tl.arange(0, BLOCK_HW)
        tl.store(out_rows + (offs_p * out_stride_p)[None, :], tile,
                 mask=mask_c[:, None] & (offs_p < HW)[None, :])


@triton.jit
def _aux_head_backward_params_kernel(
    grad_loss_ptr, grad_logit_ptr, logit_ptr, lse_ptr, pool_ptr, target_ptr, part_ptr,
    B, C, N, b_per_split, eps,
    HAS_GRAD_LOGITS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Tile of classes x (channels + one virtual column of ones, which yields d(bias)).
    pid_n, pid_c, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    b_start = split * b_per_split
    b_stop = tl.minimum(b_start + b_per_split, B)
    for b0 in range(b_start, b_stop, BLOCK_B):
        offs_b = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        mask_b = offs_b < b_stop
        t = tl.load(target_ptr + offs_b, mask=mask_b, other=0)
        g = _sample_grad(tl.load(grad_loss_ptr + offs_b, mask=mask_b, other=0.0).to(ACC), t, N)
        lse = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0).to(ACC)
        mask_bn = mask_b[:, None] & mask_n[None, :]
        z = tl.load(logit_ptr + offs_b[:, None] * N + offs_n[None, :], mask=mask_bn, other=0.0).to(ACC)
        dl = _dlogits(g[:, None], z, lse[:, None], offs_n[None, :] == t[:, None], eps, N)
        if HAS_GRAD_LOGITS:
            dl += tl.load(grad_logit_ptr + offs_b[:, None] * N + offs_n[None, :], mask=mask_bn,
                          other=0.0).to(ACC)
        dl = tl.where(mask_bn, dl, 0.0)
        p = tl.load(pool_ptr + offs_b[:, None] * C + offs_c[None, :],
                    mask=mask_b[:, None] & (offs_c < C)[None, :], other=0.0).to(ACC)
        p = tl.where((offs_c == C)[None, :] & mask_b[:, None], 1.0, p)
        acc += tl.sum(dl[:, :, None] * p[:, None, :], axis=0)
    out = part_ptr + split * N * (C + 1) + offs_n[:, None] * (C + 1) + offs_c[None, :]
    tl.store(out, acc, mask=mask_n[:, None] & (offs_c <= C)[None, :])


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def forward(features, weight, bias, target, label_smoothing, out=None):
    """features [B,C,H,W] or [B,C]; weight/bias in the compute dtype -> (losses [B], logits [B,N],
    pooled [B,C], lse [B]).

    ``out``: the four outputs, written in place (every element), instead of new tensors."""
    cdt = weight.dtype
    x = features if features.dim() == 4 else features[:, :, None, None]
    if cdt == torch.float64:
        x = x.to(torch.float64)
    B, C, H, W = x.shape
    N = weight.shape[0]
    if out is None:
        out = (x.new_empty(B, dtype=cdt), x.new_empty(B, N, dtype=cdt),
               x.new_empty(B, C, dtype=cdt), x.new_empty(B, dtype=cdt))
    losses, logits, pooled, lse = out
    weight = weight.contiguous()
    target = target.contiguous()
    block_c = _pow2(C)
    sb, sc, sh, sw = x.stride()
    _aux_head_forward_kernel[(B,)](
        x, weight, bias if bias is not None else weight, target, losses, logits, pooled, lse,
        C, N, W, H * W, sb, sc, sh, sw, float(label_smoothing),
        HAS_BIAS=bias is not None, HW_DENSE=(sh == W * sw or H == 1), ACC=_acc_dtype(cdt),
        BLOCK_C=block_c, BLOCK_HW=min(_pow2(H * W), max(1, _TILE // block_c)),
        BLOCK_N=min(_pow2(N), max(1, _TILE // block_c)), num_warps=_NUM_WARPS,
    )
    return losses, logits, pooled, lse


def backward_input(grad_losses, grad_logits, logits, lse, weight, target, label_smoothing,
                   features_shape, features_dtype, channels_last):
    """d(features) in ``features_dtype`` and layout, from d(losses) [B] (+ d(logits) [B,N])."""
    B, N = logits.shape
    C = features_shape[1]
    HW = features_shape[2] * features_shape[3] if len(features_shape) == 4 else 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(features_shape, dtype=features_dtype, device=logits.device, memory_format=fmt)
    out_stride_c, out_stride_p = (1, C) if channels_last else (HW, 1)
    block_c = _pow2(C)
    _aux_head_backward_input_kernel[(B,)](
        grad_losses, grad_logits if grad_logits is not None else logits, logits, lse,
        weight.to(logits.dtype).contiguous(), target.contiguous(), out,
        C, N, HW, out_stride_c, out_stride_p, float(label_smoothing),
        HAS_GRAD_LOGITS=grad_logits is not None, ACC=_acc_dtype(logits.dtype),
        BLOCK_C=block_c, BLOCK_HW=min(_pow2(HW), max(1, _TILE // block_c)),
        BLOCK_N=min(_pow2(N), max(1, _TILE // block_c)), num_warps=_NUM_WARPS,
    )
    return out


def backward_params(grad_losses, grad_logits, logits, lse, pooled, target, label_smoothing, *,
                    max_splits=None):
    """(d(weight) [N,C], d(bias) [N]) in the logits dtype; fixed summation order (deterministic)."""
    B, N = logits.shape
    C = pooled.shape[1]
    block_n = min(16, _pow2(N))
    block_c = min(32, _pow2(C + 1))
    block_b = min(_pow2(B), max(1, 8192 // (block_n * block_c)), 64)
    tiles = triton.cdiv(N, block_n) * triton.cdiv(C + 1, block_c)
    if max_splits is None:
        on_gpu = logits.device.type == "cuda"
        sms = torch.cuda.get_device_properties(logits.device).multi_processor_count if on_gpu else 0
        max_splits = max(1, 4 * sms // tiles) if on_gpu else 2
    splits = max(1, min(max_splits, triton.cdiv(B, block_b)))
    b_per_split = triton.cdiv(triton.cdiv(B, splits), block_b) * block_b
    splits = triton.cdiv(B, b_per_split)
    part = torch.empty(splits, N, C + 1, dtype=logits.dtype, device=logits.device)
    grid = (triton.cdiv(N, block_n), triton.cdiv(C + 1, block_c), splits)
    _aux_head_backward_params_kernel[grid](
        grad_losses, grad_logits if grad_logits is not None else logits, logits, lse, pooled.contiguous(),
        target.contiguous(), part, B, C, N, b_per_split, float(label_smoothing),
        HAS_GRAD_LOGITS=grad_logits is not None, ACC=_acc_dtype(logits.dtype),
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )
    total = part[0] if splits == 1 else part.sum(dim=0)
    return total[:, :C].contiguous(), total[:, C].contiguous()
