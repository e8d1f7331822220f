"""Fused auxiliary-head loss: global-average-pool -> Linear -> softmax cross-entropy.

``aux_head_loss`` checks its inputs, picks a backend (outside any traced graph) and calls the
custom op ``mlaan_fast::aux_head_fused_forward``, whose autograd formula calls
``aux_head_fused_backward_input`` / ``aux_head_fused_backward_params`` only for the inputs that
need a gradient. The forward keeps logits [B,N], pooled [B,C] and log-sum-exp [B] for backward.
In eager mode the cpu and cuda backends skip the custom op's Python layers: the same C++
operators, tied with the batch reduction by a C++ autograd Function
(``mlaan_fast._C.aux_head_loss_autograd``), give the same values in less host time, which is
what this op's time on a GPU was made of at CIFAR sizes when measured (see bench_aux_head.py).

Target range: with ``check_target=True`` (default) a target outside [0, N) raises ValueError
before any kernel runs, at the cost of one host sync per forward on a GPU (none on a CPU, none
while a CUDA graph is being captured). With ``check_target=False`` nothing syncs and such a
target gives a NaN loss and NaN gradients, never a number.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from mlaan_fast.ops._backend import forced_backend, load_extension, select_backend

GPU_ORDER = ("cuda", "triton")
REDUCTIONS = ("mean", "sum", "none")
_OP = "aux_head_loss"


def compute_dtype(features: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """float64 when features or weight is float64, else float32 (accumulators, logits, loss)."""
    return torch.float64 if torch.float64 in (features.dtype, weight.dtype) else torch.float32


def aux_head_loss_reference(features, weight, bias, target, *, reduction="mean", label_smoothing=0.0,
                            return_logits=False, check_target=True):
    """Plain PyTorch composition, the ground truth: same arguments and results as :func:`aux_head_loss`.

    It does not check the target range itself: with ``check_target=False`` a target outside
    [0, N) gives NaN (loss and gradients, no host sync), else F.cross_entropy's own behaviour."""
    cdt = compute_dtype(features, weight)
    with torch.autocast(features.device.type, enabled=False):
        x = features.to(cdt)
        pooled = x.mean(dim=(2, 3)) if x.dim() == 4 else x
        logits = F.linear(pooled, weight.to(cdt), None if bias is None else bias.to(cdt))
        if check_target:
            loss = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=label_smoothing)
        else:
            loss = _reduce(_unchecked_cross_entropy(logits, target, label_smoothing), reduction)
    return (loss, logits) if return_logits else loss


def _unchecked_cross_entropy(logits, target, label_smoothing):
    """Per-sample cross-entropy [B], NaN (value and gradient) where target is outside [0, N)."""
    valid = (target >= 0) & (target < logits.shape[1])
    losses = F.cross_entropy(logits, torch.where(valid, target, 0), reduction="none", label_smoothing=label_smoothing)
    return losses * torch.where(valid, 1.0, float("nan")).to(losses.dtype)


def _reduce(losses, reduction):
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def aux_head_loss(features, weight, bias, target, *, reduction="mean", label_smoothing=0.0, return_logits=False,
                  check_target=True):
    """features [B,C,H,W] (any strides) or [B,C], fp32/bf16/fp16/fp64; weight [N,C]; bias [N] or None;
    target int64 [B] -> loss (fp32, fp64 if an input is), or (loss, logits [B,N]) with ``return_logits``.

    ``check_target=True`` raises ValueError for a target outside [0, N): one host sync per call on
    a GPU, none while a CUDA graph is being captured. ``check_target=False`` never syncs (for
    callers that validated the labels on the host); a target outside [0, N) then gives a NaN loss
    (NaN per-sample loss with ``reduction="none"``) and NaN gradients, never a silent number."""
    _check_inputs(features, weight, bias, target, reduction, label_smoothing)
    backend = _backend_for(features.device.type, features.device.index)
    eager = not torch.compiler.is_compiling()
    check_target = bool(check_target)
    if backend == "reference":
        checked = check_target and not _capturing(target)
        if checked and eager:
            check_target_range(target, weight.shape[0])
        return aux_head_loss_reference(features, weight, bias, target, reduction=reduction,
                                       label_smoothing=label_smoothing, return_logits=return_logits,
                                       check_target=checked)
    if eager and backend != "triton":
        # The same operators tied by a C++ autograd Function, reduction included: less host time
        # (fwd+bwd at B=2, 1 thread of the 2-core development CPU: 163 us, against 244 us through
        # the Python layers).
        loss, logits = load_extension()[0].aux_head_loss_autograd(features, weight, bias, target, reduction,
                                                                  float(label_smoothing), check_target)
        return (loss, logits) if return_logits else loss
    if eager:
        # Same kernels and formulas as the custom op, without its Python dispatch layers.
        losses, logits = _EagerAuxHead.apply(features, weight, bias, target, float(label_smoothing), backend,
                                             check_target)
    else:
        losses, logits, _, _ = torch.ops.mlaan_fast.aux_head_fused_forward(
            features, weight, bias, target, float(label_smoothing), backend, check_target)
    loss = _reduce(losses, reduction)
    return (loss, logits) if return_logits else loss


_selected: dict = {}


@torch.compiler.assume_constant_result
def _backend_for(device_type: str, device_index: Optional[int]) -> str:
    # Resolved once per trace: a compiled graph carries the backend name as a constant.
    key = (device_type, device_index, forced_backend())
    if key not in _selected:
        _selected[key] = select_backend(_OP, torch.device(device_type, device_index), gpu_order=GPU_ORDER)
    return _selected[key]


def _check_inputs(features, weight, bias, target, reduction, label_smoothing) -> None:
    for name, t in (("features", features), ("weight", weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{_OP}: bias must be a Tensor or None, got {type(bias).__name__}")
    if features.dim() not in (2, 4):
        raise ValueError(f"{_OP}: features must be [B, C, H, W] or [B, C], got rank {features.dim()} "
                         f"(shape {tuple(features.shape)})")
    if not features.dtype.is_floating_point:
        raise TypeError(f"{_OP}: features must be floating point, got {features.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must be [N, C], got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{_OP}: weight must be floating point, got {weight.dtype}")
    if target.dtype != torch.int64:
        raise TypeError(f"{_OP}: target must be int64 class indices, got {target.dtype}")
    B, C = features.shape[0], features.shape[1]
    N = weight.shape[0]
    if B == 0:
        raise ValueError(f"{_OP}: features has batch size 0 (B must be >= 1)")
    if features.numel() == 0:
        raise ValueError(f"{_OP}: features has an empty dimension, shape {tuple(features.shape)}")
    if N == 0:
        raise ValueError(f"{_OP}: weight has 0 classes")
    if weight.shape[1] != C:
        raise ValueError(f"{_OP}: weight has {weight.shape[1]} input channels but features have C = {C}")
    if target.dim() != 1 or target.shape[0] != B:
        raise ValueError(f"{_OP}: target must be [B] = [{B}], got shape {tuple(target.shape)}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != N:
            raise ValueError(f"{_OP}: bias must be [N] = [{N}], got shape {tuple(bias.shape)}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"{_OP}: bias must be floating point, got {bias.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("target", target)):
        if t is not None and t.device != features.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but features are on {features.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{_OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{_OP}: label_smoothing must be in [0, 1], got {label_smoothing}")


def check_target_range(target: torch.Tensor, num_classes: int) -> None:
    """Raises ValueError naming the first target outside [0, num_classes); one host sync on a GPU."""
    lo, hi = torch.stack(torch.aminmax(target)).tolist()
    if lo < 0 or hi >= num_classes:
        i = int(((target < 0) | (target >= num_classes)).nonzero()[0, 0])
        raise ValueError(f"{_OP}: target[{i}] = {int(target[i])} is outside the class range [0, {num_classes})")


def _capturing(t: torch.Tensor) -> bool:
    """True while the current CUDA stream captures a graph (a host sync would break it)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _is_channels_last(features: torch.Tensor) -> bool:
    return (features.dim() == 4 and not features.is_contiguous()
            and features.is_contiguous(memory_format=torch.channels_last))


def _triton():
    from mlaan_fast.triton import aux_head as kernels

    return kernels


def _check_backend(backend: str) -> None:
    if backend not in ("cpu", "cuda", "triton"):
        raise ValueError(f"{_OP}: the fused op runs on backend cpu, cuda or triton, got {backend!r}")


# --- custom ops: forward, and the two halves of backward ------------------------------------------

@torch.library.custom_op("mlaan_fast::aux_head_fused_forward", mutates_args=())
def _fused_forward(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   target: torch.Tensor, label_smoothing: float, backend: str, check_target: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (per-sample losses [B], logits [B,N], pooled [B,C], log-sum-exp [B]) in the compute dtype."""
    return _forward_impl(features, weight, bias, target, label_smoothing, backend, check_target)


def _forward_impl(features, weight, bias, target, label_smoothing, backend, check_target):
    # Each backend checks the target range itself, before its kernel (see aux_head_loss).
    _check_backend(backend)
    if backend == "triton":
        cdt = compute_dtype(features, weight)
        return _triton().forward(features, weight.to(cdt), None if bias is None else bias.to(cdt), target,
                                 label_smoothing, check_target=check_target)
    return torch.ops.mlaan_fast.aux_head_loss_forward(features, weight, bias, target, label_smoothing,
                                                      check_target=check_target)


@_fused_forward.register_fake
def _(features, weight, bias, target, label_smoothing, backend, check_target=True):
    return _forward_fake(features, weight, bias, target, label_smoothing)


def _forward_fake(features, weight, bias, target, label_smoothing, *, check_target=True):
    cdt = compute_dtype(features, weight)
    B, C, N = features.shape[0], features.shape[1], weight.shape[0]
    return (features.new_empty((B,), dtype=cdt), features.new_empty((B, N), dtype=cdt),
            features.new_empty((B, C), dtype=cdt), features.new_empty((B,), dtype=cdt))


@torch.library.custom_op("mlaan_fast::aux_head_fused_backward_input", mutates_args=())
def _fused_backward_input(grad_losses: torch.Tensor, grad_logits: Optional[torch.Tensor], logits: torch.Tensor,
                          lse: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, label_smoothing: float,
                          features_shape: List[int], features_dtype: torch.dtype, channels_last: bool,
                          backend: str, check_target: bool = True) -> torch.Tensor:
    """-> d(features) of shape ``features_shape`` in ``features_dtype`` (channels_last or contiguous)."""
    return _backward_input_impl(grad_losses, grad_logits, logits, lse, weight, target, label_smoothing,
                                features_shape, features_dtype, channels_last, backend, check_target)


def _backward_input_impl(grad_losses, grad_logits, logits, lse, weight, target, label_smoothing,
                         features_shape, features_dtype, channels_last, backend, check_target):
    _check_backend(backend)
    if backend == "triton":
        return _triton().backward_input(grad_losses, grad_logits, logits, lse, weight, target, label_smoothing,
                                        features_shape, features_dtype, channels_last)
    return torch.ops.mlaan_fast.aux_head_loss_backward_input(grad_losses, grad_logits, logits, lse, weight, target,
                                                             label_smoothing, features_shape, features_dtype,
                                                             channels_last, check_target=check_target)


@_fused_backward_input.register_fake
def _(grad_losses, grad_logits, logits, lse, weight, target, label_smoothing, features_shape, features_dtype,
      channels_last, backend, check_target=True):
    return _backward_input_fake(logits, features_shape, features_dtype, channels_last)


def _backward_input_fake(logits, features_shape, features_dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(features_shape, dtype=features_dtype, device=logits.device, memory_format=fmt)


@torch.library.custom_op("mlaan_fast::aux_head_fused_backward_params", mutates_args=())
def _fused_backward_params(grad_losses: torch.Tensor, grad_logits: Optional[torch.Tensor], logits: torch.Tensor,
                           lse: torch.Tensor, pooled: torch.Tensor, target: torch.Tensor, label_smoothing: float,
                           backend: str, check_target: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (d(weight) [N,C], d(bias) [N]) in the logits dtype, summed over the batch in a fixed order."""
    return _backward_params_impl(grad_losses, grad_logits, logits, lse, pooled, target, label_smoothing, backend,
                                 check_target)


def _backward_params_impl(grad_losses, grad_logits, logits, lse, pooled, target, label_smoothing, backend,
                          check_target):
    _check_backend(backend)
    if backend == "triton":
        return _triton().backward_params(grad_losses, grad_logits, logits, lse, pooled, target, label_smoothing)
    return torch.ops.mlaan_fast.aux_head_loss_backward_params(grad_losses, grad_logits, logits, lse, pooled, target,
                                                              label_smoothing, check_target=check_target)


@_fused_backward_params.register_fake
def _(grad_losses, grad_logits, logits, lse, pooled, target, label_smoothing, backend, check_target=True):
    return _backward_params_fake(logits, pooled)


def _backward_params_fake(logits, pooled):
    N, C = logits.shape[1], pooled.shape[1]
    return logits.new_empty((N, C)), logits.new_empty((N,))


def _setup_context(ctx, inputs, output):
    features, weight, bias, target, label_smoothing, backend, check_target = inputs
    _, logits, pooled, lse = output
    ctx.save_for_backward(logits, pooled, lse, weight, target)
    ctx.features_shape = list(features.shape)
    ctx.features_dtype = features.dtype
    ctx.channels_last = _is_channels_last(features)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.label_smoothing = label_smoothing
    ctx.backend = backend
    ctx.check_target = check_target
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_losses, grad_logits, grad_pooled=None, grad_lse=None, *, ops=None):
    backward_input, backward_params = ops or (_fused_backward_input, _fused_backward_params)
    logits, pooled, lse, weight, target = ctx.saved_tensors
    need_features, need_weight, need_bias = ctx.needs_input_grad[:3]
    if grad_losses is None:
        grad_losses = logits.new_zeros(logits.shape[0])
    grad_losses = grad_losses.to(logits.dtype).contiguous()
    if grad_logits is not None:
        grad_logits = grad_logits.to(logits.dtype).contiguous()
    d_features = d_weight = d_bias = None
    if need_features:
        d_features = backward_input(grad_losses, grad_logits, logits, lse, weight, target,
                                    ctx.label_smoothing, ctx.features_shape, ctx.features_dtype,
                                    ctx.channels_last, ctx.backend, ctx.check_target)
    if need_weight or need_bias:
        gw, gb = backward_params(grad_losses, grad_logits, logits, lse, pooled, target,
                                 ctx.label_smoothing, ctx.backend, ctx.check_target)
        d_weight = gw.to(weight.dtype) if need_weight else None
        d_bias = gb.to(ctx.bias_dtype) if need_bias else None
    return d_features, d_weight, d_bias, None, None, None, None


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerAuxHead(torch.autograd.Function):
    """The custom op's forward and backward called directly (eager mode): -> (losses, logits)."""

    @staticmethod
    def forward(ctx, features, weight, bias, target, label_smoothing, backend, check_target):
        output = _forward_impl(features, weight, bias, target, label_smoothing, backend, check_target)
        _setup_context(ctx, (features, weight, bias, target, label_smoothing, backend, check_target), output)
        return output[0], output[1]

    @staticmethod
    def backward(ctx, grad_losses, grad_logits):
        if torch.is_grad_enabled():  # create_graph=True: see DOUBLE_BACKWARD_ERROR
            raise NotImplementedError(DOUBLE_BACKWARD_ERROR)
        return _backward(ctx, grad_losses, grad_logits, ops=(_backward_input_impl, _backward_params_impl))


# The backward kernels have no derivative of their own: a graph of the gradients would give zero
# second derivatives, so building one is refused (same text as aux_head_autograd.cpp).
DOUBLE_BACKWARD_ERROR = ("aux_head_loss: the fused op is differentiable once; its backward cannot run with "
                         "create_graph=True (use the reference backend, or the unfused head, for higher derivatives)")


def _register_cpp_fakes() -> None:
    """Fake (meta) kernels of the C++ ops, so they can be traced and opchecked too."""
    if load_extension()[0] is None:
        return
    lib = "mlaan_fast::"
    torch.library.register_fake(lib + "aux_head_loss_forward")(_forward_fake)

    @torch.library.register_fake(lib + "aux_head_loss_forward_out")
    def _(features, weight, bias, target, label_smoothing, losses, logits, pooled, lse, *, check_target=True):
        return None

    @torch.library.register_fake(lib + "aux_head_loss_backward_input")
    def _(grad_losses, grad_logits, logits, lse, weight, target, label_smoothing, features_shape, features_dtype,
          channels_last, *, check_target=True):
        return _backward_input_fake(logits, features_shape, features_dtype, channels_last)

    @torch.library.register_fake(lib + "aux_head_loss_backward_params")
    def _(grad_losses, grad_logits, logits, lse, pooled, target, label_smoothing, *, check_target=True):
        return _backward_params_fake(logits, pooled)


_register_cpp_fakes()
