"""Fused auxiliary-head loss: values and gradients of every backend against the plain-PyTorch
reference, its ops (opcheck, poisoned outputs, strides), torch.compile, and the GPU-only checks.
Argument errors and target checks: test_aux_head_errors.py; LinearAuxHead: test_linear_head.py."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from op_helpers import GPU_BACKENDS, backends, make_features, make_inputs, needs_cpp, needs_triton_cpu
from tolerance import assert_close_scaled

from mlaan_fast.nn import LinearAuxHead
from mlaan_fast.ops import aux_head_loss, use_backend
from mlaan_fast.ops.aux_head import DOUBLE_BACKWARD_ERROR, aux_head_loss_reference

OPS = torch.ops.mlaan_fast


def run(backend, x, w, b, t, **kw):
    """Loss, logits and the gradients of (loss, logits) w.r.t. every input that requires grad."""
    inputs = [v for v in (x, w, b) if v is not None]
    with use_backend(backend):
        loss, logits = aux_head_loss(x, w, b, t, return_logits=True, **kw)
    g_loss = torch.randn_like(loss) if loss.dim() else torch.tensor(1.7, dtype=loss.dtype)
    g_logits = torch.randn_like(logits) * 0.3
    grads = torch.autograd.grad((loss, logits), inputs, (g_loss, g_logits))
    return loss, logits, grads, g_loss, g_logits


def assert_matches_reference(backend, x, w, b, t, rtol=1e-4, atol=1e-5, grad_rtol=None, **kw):
    torch.manual_seed(1)
    loss, logits, grads, _, _ = run(backend, x, w, b, t, **kw)
    torch.manual_seed(1)
    ref_loss, ref_logits, ref_grads, _, _ = run("reference", x, w, b, t, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(logits, ref_logits, rtol=rtol, atol=atol)
    # Gradients are sums over the batch or the classes, in another order than the reference's:
    # compared to each tensor's magnitude.
    for name, g, r in zip(("d_features", "d_weight", "d_bias"), grads, ref_grads, strict=False):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert_close_scaled(g, r, rtol=grad_rtol, name=name)
    if x.is_contiguous():
        assert grads[0].is_contiguous()
    elif x.is_contiguous(memory_format=torch.channels_last):
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


# (B, C, H, W, N, layout, reduction, label_smoothing, bias)
SMALL_CASES = [
    (1, 16, 1, 1, 2, "nchw", "mean", 0.0, True),
    (7, 33, 5, 5, 10, "channels_last", "sum", 0.1, True),
    (7, 33, 5, 5, 10, "noncontig", "none", 0.0, False),
    (3, 64, 8, 8, 100, "nchw", "mean", 0.1, False),
    (2, 512, 1, 1, 10, "flat", "none", 0.1, True),
    (2, 16, 32, 32, 10, "channels_last", "mean", 0.0, True),
    (1, 33, 5, 5, 1000, "nchw", "sum", 0.0, True),
]
LARGE_CASES = [
    (1024, 64, 8, 8, 10, "nchw", "mean", 0.1, True),
    (1024, 16, 5, 5, 1000, "channels_last", "none", 0.0, True),
    (7, 512, 8, 8, 1000, "noncontig", "mean", 0.1, False),
    (7, 512, 32, 32, 100, "channels_last", "sum", 0.0, True),
]
GPU_CASES = [
    (256, 512, 7, 7, 1000, "nchw", "mean", 0.1, True),
    (1024, 2048, 1, 1, 1000, "flat", "sum", 0.0, True),
    (1000, 33, 3, 3, 10, "nchw", "none", 0.1, True),
    (4099, 16, 2, 2, 2, "channels_last", "sum", 0.0, False),
]
# The CPU kernels run the linear layer as GEMM from N*C = 4096 and B*N*C = 2**17 on (use_gemm in
# csrc/aux_head/aux_head_cpu.cpp): a shape past that switch (N*C = 22400, B*N*C = 134400), so both
# paths are checked.
GEMM_SHAPE = dict(B=6, C=160, N=140)
BOTH_PATHS = [pytest.param("reference", (4, 8, 6)), pytest.param("cpu", (4, 8, 6), marks=needs_cpp),
              pytest.param("cpu", tuple(GEMM_SHAPE.values()), marks=needs_cpp),
              pytest.param("triton", (4, 8, 6), marks=needs_triton_cpu)]


# --- values and gradients against the reference --------------------------------------------------

@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("backend", backends("cpu", "triton"))
def test_small_shapes_match_reference(backend, case):
    B, C, H, W, N, layout, reduction, ls, bias = case
    x, w, b, t = make_inputs(B, C, H, W, N, layout, bias=bias)
    assert_matches_reference(backend, x, w, b, t, reduction=reduction, label_smoothing=ls)


@needs_cpp
@pytest.mark.parametrize("case", LARGE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_large_shapes_match_reference_cpu(case):
    B, C, H, W, N, layout, reduction, ls, bias = case
    x, w, b, t = make_inputs(B, C, H, W, N, layout, bias=bias)
    assert_matches_reference("cpu", x, w, b, t, rtol=2e-4, atol=2e-5, reduction=reduction, label_smoothing=ls)


@pytest.mark.parametrize("backend", backends("cpu", "triton"))
def test_low_precision_features_with_fp32_weights(backend):
    """bf16/fp16 features (autocast) with fp32 weights: fp32 accumulation, gradients in each input's dtype."""
    for dtype in (torch.bfloat16, torch.float16):
        x = make_features(5, 24, 3, 3, "channels_last", dtype).requires_grad_()
        w = torch.randn(7, 24, requires_grad=True)
        b = torch.randn(7, requires_grad=True)
        t = torch.randint(0, 7, (5,))
        with use_backend(backend):
            loss = aux_head_loss(x, w, b, t, label_smoothing=0.1)
        gx, gw, gb = torch.autograd.grad(loss, (x, w, b))
        assert loss.dtype == torch.float32 and gx.dtype == dtype and gw.dtype == gb.dtype == torch.float32
        assert gx.is_contiguous(memory_format=torch.channels_last)
        ref = aux_head_loss_reference(x, w, b, t, label_smoothing=0.1)
        rx, rw, rb = torch.autograd.grad(ref, (x, w, b))
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, rx)
        torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backends("cpu", "triton"))
def test_only_requested_gradients(backend):
    x, w, b, t = make_inputs(4, 8, 2, 2, 5, "nchw")
    w.requires_grad_(False)
    with use_backend(backend):
        loss = aux_head_loss(x, w, b, t)
    gx, gb = torch.autograd.grad(loss, (x, b))
    ref = aux_head_loss_reference(x, w, b, t)
    rx, rb = torch.autograd.grad(ref, (x, b))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gb, rb)
    x2 = x.detach()
    with use_backend(backend):
        loss = aux_head_loss(x2, w, b, t)
    (gb2,) = torch.autograd.grad(loss, (b,))
    torch.testing.assert_close(gb2, rb)


@pytest.mark.parametrize("backend", backends("cpu", "triton"))
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True), (True, False, None), (False, True, None)])
def test_computes_only_what_is_needed(backend, needs):
    """Any subset of (features, weight, bias) requiring grad, bias absent (None) included. (Triton
    without label smoothing: its kernels take the smoothing as an fp32 scalar, an fp64 error.)"""
    ls = 0.1 if backend == "cpu" else 0.0
    torch.manual_seed(3)
    x, w, b, t = make_inputs(4, 6, 2, 2, 5, "nchw", dtype=torch.float64, bias=needs[2] is not None)
    leaves = [v.detach().requires_grad_(bool(n)) if v is not None else None
              for v, n in zip((x, w, b), needs, strict=True)]
    wanted = [v for v, n in zip(leaves, needs, strict=True) if n]
    with use_backend(backend):
        loss = aux_head_loss(*leaves, t, label_smoothing=ls)
    got = torch.autograd.grad(loss, wanted)
    ref = torch.autograd.grad(aux_head_loss_reference(*leaves, t, label_smoothing=ls), wanted)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,reduction,ls", [
    pytest.param("reference", "mean", 0.1),
    pytest.param("cpu", "mean", 0.1, marks=needs_cpp),
    pytest.param("cpu", "none", 0.0, marks=needs_cpp),
    pytest.param("triton", "none", 0.1, marks=needs_triton_cpu),
])
def test_gradcheck_fp64(backend, reduction, ls):
    small = backend == "triton"  # the interpreter is slow: fewer inputs and the fast (projected) check
    x, w, b, t = make_inputs(2, 3, 1, 2, 3, "nchw", dtype=torch.float64) if small else \
        make_inputs(3, 5, 2, 3, 4, "channels_last", dtype=torch.float64)

    def f(x_, w_, b_):
        with use_backend(backend):
            return aux_head_loss(x_, w_, b_, t, reduction=reduction, label_smoothing=ls, return_logits=True)

    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=small)


@needs_cpp
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_fp64_cpu_gemm_path(bias):
    B, C, N = GEMM_SHAPE.values()
    x, w, b, t = make_inputs(B, C, 2, 1, N, "channels_last", dtype=torch.float64, bias=bias)
    inputs = (x, w, b) if bias else (x, w)

    def f(*args):
        with use_backend("cpu"):
            return aux_head_loss(args[0], args[1], args[2] if bias else None, t, reduction="none",
                                 label_smoothing=0.1, return_logits=True)

    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@needs_cpp
def test_gradcheck_fp64_flat_no_bias_cpu():
    x, w, _, t = make_inputs(4, 6, 1, 1, 3, "flat", dtype=torch.float64, bias=False)

    def f(x_, w_):
        with use_backend("cpu"):
            return aux_head_loss(x_, w_, None, t, reduction="sum")

    assert torch.autograd.gradcheck(f, (x, w))


@pytest.mark.parametrize("backend,size", BOTH_PATHS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_features_give_nan(backend, size, bad):
    B, C, N = size
    x, w, b, t = make_inputs(B, C, 3, 3, N, "nchw")
    x = x.detach().clone()
    x[2, 3, 1, 1] = bad
    with use_backend(backend):
        per_sample = aux_head_loss(x, w, b, t, reduction="none")
        mean = aux_head_loss(x, w, b, t)
    assert torch.isnan(per_sample[2]) and torch.isnan(mean)
    keep = torch.arange(B) != 2
    ref = aux_head_loss_reference(x[keep], w, b, t[keep], reduction="none")
    torch.testing.assert_close(per_sample[keep], ref)


@pytest.mark.parametrize("backend", backends("cpu", "triton"))
def test_create_graph_is_refused_not_silently_zero(backend):
    """The fused op is differentiable once: a graph of its gradients is refused with a clear error
    (a second derivative would otherwise come out as zeros); the reference gives one. The C++ and
    the Triton autograd word it alike (the text exists in both languages)."""
    x, w, _, t = make_inputs(3, 4, 2, 2, 5, "nchw", dtype=torch.float64, bias=False)
    with use_backend(backend):
        loss = aux_head_loss(x, w, None, t)
    with pytest.raises(NotImplementedError, match="differentiable once") as caught:
        torch.autograd.grad(loss, x, create_graph=True)
    assert str(caught.value) == DOUBLE_BACKWARD_ERROR
    (gx,) = torch.autograd.grad(aux_head_loss_reference(x, w, None, t), x, create_graph=True)
    assert torch.autograd.grad(gx.pow(2).sum(), w)[0].abs().sum() > 0


# --- the C++ ops: the composite and its kernel ops ------------------------------------------------

def _reduced(losses, reduction):
    return {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]


@needs_cpp
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_composite_op_equals_its_kernel_ops(reduction):
    """aux_head_loss (cpu) runs the composite op, whose C++ autograd ties the kernel ops: forward
    and gradients (through loss and logits) are bit for bit those of the kernel ops called by hand."""
    x, w, b, t = make_inputs(5, 12, 3, 3, 7, "channels_last")
    with use_backend("cpu"):
        loss, logits = aux_head_loss(x, w, b, t, reduction=reduction, label_smoothing=0.1, return_logits=True)
    assert "AuxHeadLoss" in loss.grad_fn.name()
    x_, w_, b_ = x.detach(), w.detach(), b.detach()
    losses, ref_logits, pooled, lse = OPS.aux_head_loss_forward(x_, w_, b_, t, 0.1, True)
    assert torch.equal(loss, _reduced(losses, reduction)) and torch.equal(logits, ref_logits)
    g_loss, g_logits = torch.randn_like(loss), torch.randn_like(logits)
    got = torch.autograd.grad((loss, logits), (x, w, b), (g_loss, g_logits))
    per_sample = {"none": g_loss, "mean": g_loss / 5, "sum": g_loss}[reduction]
    grad_losses = per_sample.expand(5)
    z = logits.detach()
    want_x = OPS.aux_head_loss_backward_input(grad_losses, g_logits, z, lse, w_, t, 0.1, list(x.shape),
                                              x.dtype, True)
    want_w, want_b = OPS.aux_head_loss_backward_params(grad_losses, g_logits, z, lse, pooled, t, 0.1)
    for g, r in zip(got, (want_x, want_w, want_b), strict=True):
        assert torch.equal(g, r)


@needs_cpp
def test_composite_op_below_autograd():
    """In inference mode the composite op runs its kernel below the Autograd key: same values."""
    x, w, b, t = (v.detach() for v in make_inputs(4, 6, 2, 2, 5, "nchw"))
    want = OPS.aux_head_loss(x, w, b, t, "sum", 0.1, True)
    with torch.inference_mode():
        got = OPS.aux_head_loss(x, w, b, t, "sum", 0.1, True)
    assert all(torch.equal(g, r) for g, r in zip(got, want, strict=True))


@needs_cpp
def test_cpp_backward_reads_grad_losses_with_its_stride():
    """A mean or sum's gradient reaches the backward ops as one value expanded (stride 0); any
    stride gives what the contiguous copy gives."""
    x, w, b, t = (v.detach() for v in make_inputs(6, 8, 3, 3, 5, "nchw"))
    _, logits, pooled, lse = OPS.aux_head_loss_forward(x, w, b, t, 0.1, True)
    for g in (torch.tensor(0.37).expand(6), torch.randn(12)[::2]):
        assert not g.is_contiguous()
        gx = OPS.aux_head_loss_backward_input(g, None, logits, lse, w, t, 0.1, [6, 8, 3, 3], torch.float32,
                                              False)
        gw, gb = OPS.aux_head_loss_backward_params(g, None, logits, lse, pooled, t, 0.1)
        c = g.contiguous()
        assert torch.equal(gx, OPS.aux_head_loss_backward_input(c, None, logits, lse, w, t, 0.1, [6, 8, 3, 3],
                                                                torch.float32, False))
        rw, rb = OPS.aux_head_loss_backward_params(c, None, logits, lse, pooled, t, 0.1)
        assert torch.equal(gw, rw) and torch.equal(gb, rb)


class _PoisonedEmpty:
    """Uninitialised memory (torch.empty, also from C++) is filled with NaN inside the block."""

    def __enter__(self):
        self.old = (torch.are_deterministic_algorithms_enabled(),
                    torch.utils.deterministic.fill_uninitialized_memory)
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        assert torch.isnan(torch.empty(3)).all()

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.old[0])
        torch.utils.deterministic.fill_uninitialized_memory = self.old[1]


@pytest.mark.parametrize("op", [pytest.param("aux_head_loss_forward", marks=needs_cpp),
                                pytest.param("aux_head_loss_forward_triton", marks=needs_triton_cpu)])
@pytest.mark.parametrize("layout", ["channels_last", "noncontig"])
def test_forward_writes_every_output_element(op, layout):
    """Uninitialised memory is filled with NaN here, so an output element left unwritten shows up."""
    x = make_features(5, 7, 3, 2, layout)
    w, b, t = torch.randn(6, 7), torch.randn(6), torch.randint(0, 6, (5,))
    with _PoisonedEmpty():
        losses, logits, pooled, lse = getattr(OPS, op)(x, w, b, t, 0.1, True)
    ref_pooled = x.mean(dim=(2, 3))
    ref_logits = F.linear(ref_pooled, w, b)
    torch.testing.assert_close(pooled, ref_pooled)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(lse, torch.logsumexp(ref_logits, dim=1))
    torch.testing.assert_close(losses, F.cross_entropy(ref_logits, t, reduction="none", label_smoothing=0.1))


@needs_triton_cpu
def test_triton_launcher_writes_every_element_of_given_outputs():
    from mlaan_fast.triton import aux_head as tk

    x = make_features(5, 7, 3, 2, "noncontig")
    w, b, t = torch.randn(6, 7), torch.randn(6), torch.randint(0, 6, (5,))
    outs = tuple(torch.full(s, float("nan")) for s in ((5,), (5, 6), (5, 7), (5,)))
    losses, logits, pooled, lse = tk.forward(x, w, b, t, 0.1, out=outs)
    assert all(o is r for o, r in zip(outs, (losses, logits, pooled, lse), strict=True))
    ref_logits = F.linear(x.mean(dim=(2, 3)), w, b)
    torch.testing.assert_close(pooled, x.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(lse, torch.logsumexp(ref_logits, dim=1))
    torch.testing.assert_close(losses, F.cross_entropy(ref_logits, t, reduction="none", label_smoothing=0.1))


@pytest.mark.parametrize("backend,size", [pytest.param("cpu", (6, 9, 5), marks=needs_cpp),
                                          pytest.param("cpu", tuple(GEMM_SHAPE.values()), marks=needs_cpp),
                                          pytest.param("triton", (6, 9, 5), marks=needs_triton_cpu)])
def test_backward_writes_every_output_element(backend, size):
    """Uninitialised memory is filled with NaN here, so a gradient element left unwritten shows up."""
    B, C, N = size
    x, w, b, t = make_inputs(B, C, 3, 3, N, "channels_last")
    with _PoisonedEmpty():
        with use_backend(backend):
            loss = aux_head_loss(x, w, b, t, label_smoothing=0.1)
        grads = torch.autograd.grad(loss, (x, w, b))
    ref = torch.autograd.grad(aux_head_loss_reference(x, w, b, t, label_smoothing=0.1), (x, w, b))
    for g, r in zip(grads, ref, strict=True):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g, r)


# --- opcheck: every op, C++ and Triton ------------------------------------------------------------

def _opcheck_kernel_ops(suffix, x, w, b, t, check_target):
    fwd = getattr(OPS, "aux_head_loss_forward" + suffix).default
    torch.library.opcheck(fwd, (x, w, b, t, 0.1, check_target))
    torch.library.opcheck(fwd, (x.detach()[:, :, 0, 0], w.detach(), None, t, 0.0, check_target))
    with torch.no_grad():
        _, logits, pooled, lse = fwd(x, w, b, t, 0.1, check_target)
    g, gl = torch.randn(3), torch.randn(3, 4)
    backward_input = getattr(OPS, "aux_head_loss_backward_input" + suffix).default
    backward_params = getattr(OPS, "aux_head_loss_backward_params" + suffix).default
    for channels_last, grad_logits in ((True, gl), (False, None)):
        torch.library.opcheck(backward_input, (g, grad_logits, logits, lse, w.detach(), t, 0.1, [3, 6, 2, 2],
                                               torch.float32, channels_last))
    torch.library.opcheck(backward_params, (g, None, logits, lse, pooled, t, 0.1))
    torch.library.opcheck(backward_params, (g, gl, logits, lse, pooled, t, 0.0))


@needs_cpp
@pytest.mark.parametrize("check_target", [True, False])
def test_opcheck_cpp_ops(check_target):
    x, w, b, t = make_inputs(3, 6, 2, 2, 4, "channels_last")
    for reduction in ("mean", "sum", "none"):
        torch.library.opcheck(OPS.aux_head_loss.default, (x, w, b, t, reduction, 0.1, check_target))
    flat = x.detach()[:, :, 0, 0].requires_grad_()
    torch.library.opcheck(OPS.aux_head_loss.default, (flat, w, None, t, "mean", 0.0, check_target))
    _opcheck_kernel_ops("", x.detach(), w.detach(), b.detach(), t, check_target)


@needs_triton_cpu
@pytest.mark.parametrize("check_target", [True, False])
def test_opcheck_triton_ops(check_target):
    x, w, b, t = make_inputs(3, 6, 2, 2, 4, "channels_last")
    _opcheck_kernel_ops("_triton", x, w, b, t, check_target)


# --- torch.compile ---------------------------------------------------------------------------------

def _step(x, w, b, t):
    loss, logits = aux_head_loss(x, w, b, t, label_smoothing=0.1, return_logits=True)
    return loss + 0.1 * logits.square().mean()


def _compiled_matches_eager(backend, compiler, *, dynamic=False, shapes=((4, 6, 3, 3),)):
    torch._dynamo.reset()
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(_step, backend=compiler, fullgraph=True, dynamic=dynamic)
    for shape in shapes:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, 5, (shape[0],))
        with use_backend(backend):
            got = compiled(x, w, b, t)
            got_grads = torch.autograd.grad(got, (x, w, b))
            want = _step(x, w, b, t)
            want_grads = torch.autograd.grad(want, (x, w, b))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for g, r in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
        bad_t = t.clone()
        bad_t[1] = 5
        with use_backend(backend), pytest.raises(ValueError, match=r"target\[1\] = 5 is outside"):
            compiled(x, w, b, bad_t)


@needs_cpp
def test_torch_compile_inductor_cpu_forward_and_backward():
    """AOTAutograd traces through the composite op's C++ autograd; inductor compiles the graph."""
    _compiled_matches_eager("cpu", "inductor")


@needs_cpp
def test_torch_compile_dynamic_shapes_cpu():
    """The C++ autograd keeps the features' shape as SymInts: one dynamic graph serves other shapes."""
    _compiled_matches_eager("cpu", "aot_eager", dynamic=True, shapes=((4, 6, 3, 3), (7, 6, 2, 5)))


@needs_triton_cpu
def test_torch_compile_triton():
    _compiled_matches_eager("triton", "aot_eager")


@needs_cpp
def test_torch_compile_fullgraph_cpu():
    head = LinearAuxHead(12, 5)
    x = make_features(4, 12, 3, 3, "nchw").requires_grad_()
    t = torch.randint(0, 5, (4,))

    def step(x_, t_):
        loss, correct = head(x_, t_, return_correct=True)
        return loss, correct

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with use_backend("cpu"):
        loss, correct = compiled(x, t)
        loss.backward()
    gx, gw = x.grad.clone(), head.fc.weight.grad.clone()
    x.grad = None
    head.zero_grad()
    head.fused = False
    ref_loss, ref_correct = head(x, t, return_correct=True)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    assert int(correct) == int(ref_correct)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, head.fc.weight.grad)
    bad_t = t.clone()
    bad_t[1] = 5
    head.fused = True
    with use_backend("cpu"), pytest.raises(ValueError, match=r"target\[1\] = 5"):
        compiled(x, bad_t)


# --- GPU (run on the lent GPU machine) ---------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", SMALL_CASES + LARGE_CASES + GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_matches_reference(backend, case):
    B, C, H, W, N, layout, reduction, ls, bias = case
    x, w, b, t = make_inputs(B, C, H, W, N, layout, bias=bias, device="cuda")
    assert_matches_reference(backend, x, w, b, t, rtol=2e-4, atol=5e-5, grad_rtol=5e-5, reduction=reduction,
                             label_smoothing=ls)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_low_precision_error_within_twice_pytorch(backend, dtype, layout):
    B, C, H, W, N = 256, 64, 8, 8, 10
    x64, w64, b64, t = make_inputs(B, C, H, W, N, layout, dtype=torch.float64, device="cuda")
    x_lp = x64.detach().to(dtype).requires_grad_()
    w_lp, b_lp = w64.detach().to(dtype).requires_grad_(), b64.detach().to(dtype).requires_grad_()

    def err(v, r):
        return ((v.double() - r).norm() / r.norm()).item()

    x_ref = x_lp.detach().double().requires_grad_()
    w_ref, b_ref = w_lp.detach().double().requires_grad_(), b_lp.detach().double().requires_grad_()
    ref = aux_head_loss_reference(x_ref, w_ref, b_ref, t, label_smoothing=0.1)
    ref_grads = torch.autograd.grad(ref, (x_ref, w_ref, b_ref))
    pooled = F.adaptive_avg_pool2d(x_lp, 1).flatten(1)
    torch_loss = F.cross_entropy(F.linear(pooled, w_lp, b_lp), t, label_smoothing=0.1)
    torch_grads = torch.autograd.grad(torch_loss, (x_lp, w_lp, b_lp))
    with use_backend(backend):
        loss = aux_head_loss(x_lp, w_lp, b_lp, t, label_smoothing=0.1)
    grads = torch.autograd.grad(loss, (x_lp, w_lp, b_lp))
    floor = 1e-7
    assert abs(loss.double() - ref).item() <= 2 * abs(torch_loss.double() - ref).item() + floor
    for g, tg, r in zip(grads, torch_grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert err(g, r) <= 2 * err(tg, r) + floor


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backward_is_deterministic(backend):
    x, w, b, t = make_inputs(1024, 64, 8, 8, 10, "channels_last", device="cuda")
    with use_backend(backend):
        first = torch.autograd.grad(aux_head_loss(x, w, b, t), (x, w, b))
        second = torch.autograd.grad(aux_head_loss(x, w, b, t), (x, w, b))
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_bad_target_raises(backend):
    x, w, b, t = make_inputs(8, 16, 4, 4, 10, "nchw", device="cuda")
    t[5] = 10
    with use_backend(backend), pytest.raises(ValueError, match=r"target\[5\] = 10"):
        aux_head_loss(x, w, b, t)


@pytest.mark.gpu
@pytest.mark.parametrize("entry", ["torch.ops", "_C"])
def test_gpu_cpp_composite_op_bad_target_raises(entry):
    """The C++ composite op's own range check on CUDA, through the dispatcher and through _C's entry."""
    from mlaan_fast._C import aux_head_loss as direct

    x, w, b, t = make_inputs(8, 16, 4, 4, 10, "nchw", device="cuda")
    t[5] = 10
    op = OPS.aux_head_loss.default if entry == "torch.ops" else direct
    with pytest.raises(ValueError, match=r"target\[5\] = 10"):
        op(x, w, b, t, "mean", 0.0, True)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_non_finite_features_give_nan(backend):
    x, w, b, t = make_inputs(8, 16, 4, 4, 10, "nchw", device="cuda")
    x = x.detach().clone()
    x[3, 2, 1, 1] = float("nan")
    with use_backend(backend):
        per_sample = aux_head_loss(x, w, b, t, reduction="none")
    others = torch.arange(8, device="cuda") != 3
    assert torch.isnan(per_sample[3]) and torch.isfinite(per_sample[others]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_compile_fullgraph(backend):
    head = LinearAuxHead(32, 10).cuda()
    x = make_features(64, 32, 8, 8, "channels_last", device="cuda").requires_grad_()
    t = torch.randint(0, 10, (64,), device="cuda")
    with use_backend(backend):
        loss = torch.compile(lambda a, b_: head(a, b_), fullgraph=True)(x, t)
        loss.backward()
    ref = aux_head_loss_reference(x, head.fc.weight, head.fc.bias, t)
    torch.testing.assert_close(loss, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["aux_head_loss_forward", "aux_head_loss_forward_triton"])
def test_gpu_forward_op_bad_target_raises(op):
    """A direct CUDA op call with a bad target raises ValueError (and the process stays usable)."""
    x, w, b, t = (v.detach() for v in make_inputs(8, 16, 4, 4, 10, "nchw", device="cuda"))
    t[5] = 10
    with pytest.raises(ValueError, match=r"target\[5\] = 10"):
        getattr(OPS, op)(x, w, b, t, 0.0, True)
    losses = getattr(OPS, op)(x, w, b, t, 0.0, False)[0]
    assert torch.isnan(losses[5]) and torch.isfinite(losses[torch.arange(8, device="cuda") != 5]).all()
    torch.cuda.synchronize()


def _syncs(fn) -> list[str]:
    """The synchronizing CUDA operations ``fn`` ran (torch's sync debug warnings, where they came from)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{c.filename}:{c.lineno}: {c.message}" for c in caught if "synchroniz" in str(c.message)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_forward_syncs_once_when_checking_never_otherwise(backend):
    x, w, b, t = (v.detach() for v in make_inputs(64, 16, 4, 4, 10, "nchw", device="cuda"))
    with use_backend(backend):
        aux_head_loss(x, w, b, t)  # warm up: backend choice, compilation
        torch.cuda.synchronize()
        checked = _syncs(lambda: aux_head_loss(x, w, b, t))
        assert len(checked) == 1, checked
        unchecked = _syncs(lambda: aux_head_loss(x, w, b, t, check_target=False))
        assert unchecked == []


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_forward_in_cuda_graph(backend):
    """check_target=True captures (no sync while capturing); replay equals eager; a bad target -> NaN."""
    x, w, b, t = (v.detach() for v in make_inputs(64, 16, 4, 4, 10, "nchw", device="cuda"))
    with use_backend(backend):
        eager = aux_head_loss(x, w, b, t, label_smoothing=0.1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            aux_head_loss(x, w, b, t, label_smoothing=0.1)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = aux_head_loss(x, w, b, t, label_smoothing=0.1, check_target=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_loss, eager)
    t[5] = 10
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isnan(static_loss)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_unchecked_bad_target_gives_nan(backend):
    x, w, b, t = make_inputs(1024, 16, 4, 4, 10, "nchw", device="cuda")
    t = t.clone()
    t[700] = -1
    with use_backend(backend):
        per_sample = aux_head_loss(x, w, b, t, reduction="none", check_target=False)
    good = torch.arange(1024, device="cuda") != 700
    assert torch.isnan(per_sample[700]) and torch.isfinite(per_sample[good]).all()
    gx, gw, gb = torch.autograd.grad(per_sample.sum(), (x, w, b))
    assert torch.isnan(gx[700]).all() and torch.isfinite(gx[good]).all()
    assert torch.isnan(gw).all() and torch.isnan(gb).all()
