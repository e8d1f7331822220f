"""Fused auxiliary-head loss: global-average-pool -> Linear -> softmax cross-entropy.

``aux_head_loss`` checks every argument (the one place its errors are worded, for every backend),
picks a backend once per call (outside any traced graph) and runs one of:

- ``reference``: the PyTorch composition :func:`aux_head_loss_reference`;
- ``cpu``/``cuda``: the C++ composite op ``mlaan_fast::aux_head_loss``, whose one autograd is a
  C++ Function registered at the Autograd key (``csrc/aux_head/``): it ties the kernel ops
  ``aux_head_loss_forward``, ``..._backward_input`` and ``..._backward_params`` with the batch
  reduction, in less host time than a Python autograd Function would take;
- ``triton``: the custom op ``mlaan_fast::aux_head_loss_forward_triton`` with one Python autograd
  that calls the backward ops ``..._backward_input_triton`` and ``..._backward_params_triton``.

Both fused paths keep logits [B,N], pooled [B,C] and log-sum-exp [B] for backward, are
differentiable once, and have fake kernels (below), so they run under ``torch.compile``.

Target range: checked (the default, see :func:`target_checks`), a target outside [0, N) raises
ValueError naming the first one before any kernel runs, at the cost of one host sync per forward
on a GPU (none on a CPU, none while a CUDA graph is being captured). Unchecked, nothing syncs and
such a target gives a NaN loss and NaN gradients, never a number.
"""

import contextlib
import contextvars
import functools
import numbers
from typing import List, Optional  # noqa: UP035 (torch 2.6 infers custom-op schemas from typing.List only)

import torch
import torch.nn.functional as F
from torch.overrides import has_torch_function

from mlaan_fast.ops._backend import backend_for, load_extension

GPU_ORDER = ("cuda", "triton")
REDUCTIONS = ("mean", "sum", "none")
_OP = "aux_head_loss"
# The same text as csrc/aux_head/aux_head_autograd.cpp (tests/test_aux_head.py holds them equal):
# the Triton backend works without the C++ library, so it cannot borrow the C++ one.
DOUBLE_BACKWARD_ERROR = ("aux_head_loss: the fused op is differentiable once; its backward cannot run with "
                         "create_graph=True (use the reference backend, or the unfused head, for higher "
                         "derivatives)")

# torch.library.custom_op reads the ops' schemas from their annotations; torch 2.6 knows Optional,
# not the `X | None` spelling.
OptionalTensor = Optional[torch.Tensor]  # noqa: UP045

_target_checks: contextvars.ContextVar[bool] = contextvars.ContextVar("mlaan_fast_target_checks",
                                                                      default=True)


@contextlib.contextmanager
def target_checks(enabled: bool):
    """Inside the block, ``aux_head_loss(..., check_target=None)`` checks the target range iff ``enabled``."""
    if not isinstance(enabled, bool):
        raise TypeError(f"target_checks: enabled must be True or False, got {type(enabled).__name__}")
    token = _target_checks.set(enabled)
    try:
        yield
    finally:
        _target_checks.reset(token)


def aux_head_loss(features, weight, bias, target, *, reduction="mean", label_smoothing=0.0,
                  return_logits=False, check_target=None):
    """features [B,C,H,W] (any strides) or [B,C], fp32/bf16/fp16/fp64; weight [N,C]; bias [N] or None;
    target int64 [B] -> loss (fp32, fp64 if an input is), or (loss, logits [B,N]) with ``return_logits``.

    ``check_target``: True raises ValueError for a target outside [0, N) (one host sync per call on
    a GPU, none while a CUDA graph is being captured); False never syncs, and such a target then
    gives a NaN loss (NaN per-sample loss with ``reduction="none"``) and NaN gradients; None (the
    default) follows :func:`target_checks` (checked unless told otherwise)."""
    _check_arguments(features, weight, bias, target, reduction, label_smoothing, return_logits, check_target)
    device = features.device
    backend = backend_for(_OP, device.type, device.index, GPU_ORDER)
    check = _default_target_check() if check_target is None else check_target
    label_smoothing = float(label_smoothing)
    if backend == "cpu" or backend == "cuda":
        # torch.compile and __torch_function__ overrides see the op through torch.ops; plain eager
        # calls take _C's direct entry into the dispatcher (the same op, less host time).
        direct = not (torch.compiler.is_compiling() or has_torch_function((features, weight, bias, target)))
        op = _CPP_DIRECT if direct else _CPP_LOSS
        if check and backend == "cuda" and direct:
            # Checked here (the same single host sync), so that a bad CUDA target is refused before
            # any kernel runs, in Python.
            if not _capturing(target):
                check_target_range(target, weight.shape[0])
            check = False
        loss, logits = op(features, weight, bias, target, reduction, label_smoothing, check)
    elif backend == "triton":
        losses, logits, _, _ = torch.ops.mlaan_fast.aux_head_loss_forward_triton(
            features, weight, bias, target, label_smoothing, check)
        loss = _reduce(losses, reduction)
    elif backend == "reference":
        check = check and not _capturing(target)
        if check and not torch.compiler.is_compiling():
            check_target_range(target, weight.shape[0])
        loss, logits = aux_head_loss_reference(features, weight, bias, target, reduction=reduction,
                                               label_smoothing=label_smoothing, return_logits=True,
                                               check_target=check)
    return (loss, logits) if return_logits else loss


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


def compute_dtype(features: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """float64 when features or weight is float64, else float32 (accumulators, logits, loss)."""
    return torch.float64 if torch.float64 in (features.dtype, weight.dtype) else torch.float32


def check_target_range(target: torch.Tensor, num_classes: int) -> None:
    """Raises ValueError naming the first target outside [0, num_classes); one host sync on a GPU."""
    lo, hi = torch.stack(torch.aminmax(target)).tolist()
    if lo < 0 or hi >= num_classes:
        i = int(((target < 0) | (target >= num_classes)).nonzero()[0, 0])
        raise ValueError(f"{_OP}: target[{i}] = {int(target[i])} is outside the class range "
                         f"[0, {num_classes})")


# --- argument checks: every user-facing error of the op, for every backend -------------------------

def _check_arguments(features, weight, bias, target, reduction, label_smoothing, return_logits, check_target):
    # Written out flat, not as loops over the arguments: this runs on every call, where a step of a
    # small head is host time.
    for name, t in (("features", features), ("weight", weight), ("target", target), ("bias", bias)):
        if not isinstance(t, torch.Tensor) and not (t is None and name == "bias"):
            kind = "a Tensor or None" if name == "bias" else "a Tensor"
            raise TypeError(f"{_OP}: {name} must be {kind}, got {type(t).__name__}")
        if t is not None and t.layout != torch.strided:
            raise TypeError(f"{_OP}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if features.dim() not in (2, 4):
        raise ValueError(f"{_OP}: features must be [B, C, H, W] or [B, C], got rank {features.dim()} "
                         f"(shape {tuple(features.shape)})")
    if not features.is_floating_point():
        raise TypeError(f"{_OP}: features must be floating point, got {features.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must be [N, C], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{_OP}: weight must be floating point, got {weight.dtype}")
    if target.dtype != torch.int64:
        raise TypeError(f"{_OP}: target must be int64 class indices, got {target.dtype}")
    B, C = features.shape[:2]
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
        if not bias.is_floating_point():
            raise TypeError(f"{_OP}: bias must be floating point, got {bias.dtype}")
    device = features.device
    if weight.device != device or target.device != device or (bias is not None and bias.device != device):
        name, t = next((n, t) for n, t in (("weight", weight), ("bias", bias), ("target", target))
                       if t is not None and t.device != device)
        raise ValueError(f"{_OP}: {name} is on {t.device} but features are on {device}")
    if reduction not in REDUCTIONS or not isinstance(reduction, str):
        raise ValueError(f"{_OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if type(label_smoothing) is not float and (isinstance(label_smoothing, bool)
                                               or not isinstance(label_smoothing, numbers.Real)):
        raise TypeError(f"{_OP}: label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{_OP}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if return_logits is not True and return_logits is not False:
        raise TypeError(f"{_OP}: return_logits must be True or False, got {type(return_logits).__name__}")
    if check_target is not None and check_target is not True and check_target is not False:
        raise TypeError(f"{_OP}: check_target must be True, False or None, got {type(check_target).__name__}")


# --- backend choice and the pieces of the reference composition -------------------------------------

@torch.compiler.assume_constant_result
def _default_target_check() -> bool:
    # Like the backend, a compiled graph carries the choice of the block it was traced in.
    return _target_checks.get()


def _capturing(t: torch.Tensor) -> bool:
    """True while the current CUDA stream captures a graph (a host sync would break it)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _unchecked_cross_entropy(logits, target, label_smoothing):
    """Per-sample cross-entropy [B], NaN (value and gradient) where target is outside [0, N)."""
    valid = (target >= 0) & (target < logits.shape[1])
    losses = F.cross_entropy(logits, torch.where(valid, target, 0), reduction="none",
                             label_smoothing=label_smoothing)
    return losses * torch.where(valid, 1.0, float("nan")).to(losses.dtype)


def _reduce(losses, reduction):
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _is_channels_last(features: torch.Tensor) -> bool:
    return (features.dim() == 4 and not features.is_contiguous()
            and features.is_contiguous(memory_format=torch.channels_last))


# --- fake kernels: one per schema, shared by the C++ ops and their Triton twins ---------------------

def _loss_fake(features, weight, bias, target, reduction, label_smoothing, check_target):
    cdt = compute_dtype(features, weight)
    B, N = features.shape[0], weight.shape[0]
    loss = features.new_empty((B,) if reduction == "none" else (), dtype=cdt)
    return loss, features.new_empty((B, N), dtype=cdt)


def _forward_fake(features, weight, bias, target, label_smoothing, check_target):
    cdt = compute_dtype(features, weight)
    B, C, N = features.shape[0], features.shape[1], weight.shape[0]
    return (features.new_empty((B,), dtype=cdt), features.new_empty((B, N), dtype=cdt),
            features.new_empty((B, C), dtype=cdt), features.new_empty((B,), dtype=cdt))


def _backward_input_fake(grad_losses, grad_logits, logits, lse, weight, target, label_smoothing,
                         features_shape, features_dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(features_shape, dtype=features_dtype, device=logits.device, memory_format=fmt)


def _backward_params_fake(grad_losses, grad_logits, logits, lse, pooled, target, label_smoothing):
    N, C = logits.shape[1], pooled.shape[1]
    return logits.new_empty((N, C)), logits.new_empty((N,))


# --- the C++ backends: the composite op (its autograd is C++) -------------------------------------

def _register_cpp():
    """Fake kernels of the C++ ops; returns the composite op's overload (cached: it is called per step)
    and _C's direct entry into it."""
    module = load_extension()[0]
    if module is None:
        return None, None
    fakes = {"aux_head_loss": _loss_fake, "aux_head_loss_forward": _forward_fake,
             "aux_head_loss_backward_input": _backward_input_fake,
             "aux_head_loss_backward_params": _backward_params_fake}
    for name, fake in fakes.items():
        torch.library.register_fake(f"mlaan_fast::{name}")(fake)
    return torch.ops.mlaan_fast.aux_head_loss.default, module.aux_head_loss


_CPP_LOSS, _CPP_DIRECT = _register_cpp()


# --- the Triton backend: its ops and their one (Python) autograd ------------------------------------

@functools.cache
def _kernels():
    from mlaan_fast.triton import aux_head

    return aux_head


# Custom ops, opaque to torch.compile, rather than torch.library.triton_op (whose body torch.compile
# traces, seeing the kernels): the forward's target-range check raises ValueError on the host, which
# a traced body cannot do, and under TRITON_INTERPRET=1 wrap_triton hands back the bare kernel, so a
# triton_op body cannot be traced on a machine without a GPU and could be neither opchecked nor
# compiled in this suite. Their fakes are those of the C++ ops.
@torch.library.custom_op("mlaan_fast::aux_head_loss_forward_triton", mutates_args=())
def _triton_forward(features: torch.Tensor, weight: torch.Tensor, bias: OptionalTensor,
                    target: torch.Tensor, label_smoothing: float, check_target: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract of mlaan_fast::aux_head_loss_forward on Triton kernels."""
    if check_target and not _capturing(target):
        check_target_range(target, weight.shape[0])
    cdt = compute_dtype(features, weight)
    return _kernels().forward(features, weight.to(cdt), None if bias is None else bias.to(cdt), target,
                              label_smoothing)


_triton_forward.register_fake(_forward_fake)


@torch.library.custom_op("mlaan_fast::aux_head_loss_backward_input_triton", mutates_args=())
def _triton_backward_input(grad_losses: torch.Tensor, grad_logits: OptionalTensor, logits: torch.Tensor,
                           lse: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                           label_smoothing: float, features_shape: List[int], features_dtype: torch.dtype,  # noqa: UP006
                           channels_last: bool) -> torch.Tensor:
    """The contract of mlaan_fast::aux_head_loss_backward_input on a Triton kernel."""
    return _kernels().backward_input(grad_losses, grad_logits, logits, lse, weight, target, label_smoothing,
                                     features_shape, features_dtype, channels_last)


@torch.library.custom_op("mlaan_fast::aux_head_loss_backward_params_triton", mutates_args=())
def _triton_backward_params(grad_losses: torch.Tensor, grad_logits: OptionalTensor, logits: torch.Tensor,
                            lse: torch.Tensor, pooled: torch.Tensor, target: torch.Tensor,
                            label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract of mlaan_fast::aux_head_loss_backward_params on a Triton kernel."""
    return _kernels().backward_params(grad_losses, grad_logits, logits, lse, pooled, target, label_smoothing)


_triton_backward_input.register_fake(_backward_input_fake)
_triton_backward_params.register_fake(_backward_params_fake)


def _setup_context(ctx, inputs, output):
    features, weight, bias, target, label_smoothing, _ = inputs
    _, logits, pooled, lse = output
    ctx.save_for_backward(logits, pooled, lse, weight, target)
    ctx.features_shape = list(features.shape)
    ctx.features_dtype = features.dtype
    ctx.channels_last = _is_channels_last(features)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.label_smoothing = label_smoothing
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_losses, grad_logits, grad_pooled, grad_lse):
    if torch.is_grad_enabled():  # create_graph=True: see DOUBLE_BACKWARD_ERROR
        raise NotImplementedError(DOUBLE_BACKWARD_ERROR)
    logits, pooled, lse, weight, target = ctx.saved_tensors
    need_features, need_weight, need_bias = ctx.needs_input_grad[:3]
    if grad_losses is None:
        grad_losses = logits.new_zeros(logits.shape[0])
    grad_losses = grad_losses.to(logits.dtype).contiguous()
    if grad_logits is not None:
        grad_logits = grad_logits.to(logits.dtype).contiguous()
    d_features = d_weight = d_bias = None
    if need_features:
        d_features = _triton_backward_input(grad_losses, grad_logits, logits, lse, weight, target,
                                            ctx.label_smoothing, ctx.features_shape, ctx.features_dtype,
                                            ctx.channels_last)
    if need_weight or need_bias:
        gw, gb = _triton_backward_params(grad_losses, grad_logits, logits, lse, pooled, target,
                                         ctx.label_smoothing)
        d_weight = gw.to(weight.dtype) if need_weight else None
        d_bias = gb.to(ctx.bias_dtype) if need_bias else None
    return d_features, d_weight, d_bias, None, None, None


_triton_forward.register_autograd(_backward, setup_context=_setup_context)
