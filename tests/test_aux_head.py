"""Fused auxiliary-head loss: every backend against the plain-PyTorch reference."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from mlaan_fast.nn import LinearAuxHead
from mlaan_fast.ops import aux_head_loss, available_backends, use_backend
from mlaan_fast.ops.aux_head import aux_head_loss_reference
from tolerance import assert_close_scaled

AVAILABLE = available_backends()
HAS_CPP = AVAILABLE["cpu"][0]
TRITON_ON_CPU = AVAILABLE["triton"][0] and not torch.cuda.is_available()
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension unavailable: {AVAILABLE['cpu'][1]}")
needs_triton_cpu = pytest.mark.skipif(not TRITON_ON_CPU, reason=f"Triton interpreter unavailable: {AVAILABLE['triton'][1]}")
BACKEND_MARKS = {"cpu": needs_cpp, "triton": needs_triton_cpu, "reference": ()}


def _backends(*names):
    return [pytest.param(n, marks=BACKEND_MARKS[n]) for n in names]


def make_features(B, C, H, W, layout, dtype=torch.float32, device="cpu", scale=1.0):
    """Random features in the given layout: nchw, channels_last, noncontig (a strided view) or flat [B, C]."""
    if layout == "flat":
        return torch.randn(B, C, dtype=dtype, device=device) * scale
    if layout == "noncontig":
        base = torch.randn(B, C, 2 * H, W + 3, dtype=dtype, device=device) * scale
        x = base[:, :, ::2, 1:W + 1].transpose(2, 3).transpose(2, 3)
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        return x
    x = torch.randn(B, C, H, W, dtype=dtype, device=device) * scale
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def make_inputs(B, C, H, W, N, layout, *, bias=True, dtype=torch.float32, device="cpu"):
    x = make_features(B, C, H, W, layout, dtype, device).requires_grad_()
    w = (torch.randn(N, C, dtype=dtype, device=device) / C ** 0.5).requires_grad_()
    b = (torch.randn(N, dtype=dtype, device=device) * 0.1).requires_grad_() if bias else None
    t = torch.randint(0, N, (B,), device=device)
    return x, w, b, t


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
    for name, g, r in zip(("d_features", "d_weight", "d_bias"), grads, ref_grads):
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


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("backend", _backends("cpu", "triton"))
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


@pytest.mark.parametrize("backend", _backends("cpu", "triton"))
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


@pytest.mark.parametrize("backend", _backends("cpu", "triton"))
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


# The CPU kernels run the linear layer as GEMM from N*C = 4096 and B*N*C = 2**17 on (use_gemm in
# aux_head_cpu.cpp): a shape past that switch (N*C = 22400, B*N*C = 134400), so both paths are checked.
GEMM_SHAPE = dict(B=6, C=160, N=140)


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



@needs_cpp
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_eager_cpp_autograd_equals_the_custom_op(reduction):
    """Eager calls go through the C++ autograd Function; it gives bit for bit what the custom op
    (the torch.compile path) gives, gradients through loss and logits included."""
    x, w, b, t = make_inputs(5, 12, 3, 3, 7, "channels_last")
    with use_backend("cpu"):
        loss, logits = aux_head_loss(x, w, b, t, reduction=reduction, label_smoothing=0.1, return_logits=True)
    assert "AuxHeadLoss" in loss.grad_fn.name()
    losses, ref_logits, _, _ = torch.ops.mlaan_fast.aux_head_fused_forward(x, w, b, t, 0.1, "cpu", True)
    ref = {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]
    assert torch.equal(loss, ref) and torch.equal(logits, ref_logits)
    g_loss, g_logits = torch.randn_like(loss), torch.randn_like(logits)
    got = torch.autograd.grad((loss, logits), (x, w, b), (g_loss, g_logits))
    want = torch.autograd.grad((ref, ref_logits), (x, w, b), (g_loss, g_logits))
    for g, r in zip(got, want):
        assert torch.equal(g, r)


@needs_cpp
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True), (True, False, None), (False, True, None)])
def test_eager_cpp_autograd_computes_only_what_is_needed(needs):
    """Any subset of (features, weight, bias) requiring grad, bias absent (None) included."""
    torch.manual_seed(3)
    x, w, b, t = make_inputs(4, 6, 2, 2, 5, "nchw", dtype=torch.float64, bias=needs[2] is not None)
    leaves = [v.detach().requires_grad_(bool(n)) if v is not None else None for v, n in zip((x, w, b), needs)]
    wanted = [v for v, n in zip(leaves, needs) if n]
    with use_backend("cpu"):
        loss = aux_head_loss(*leaves, t, label_smoothing=0.1)
    got = torch.autograd.grad(loss, wanted)
    ref = torch.autograd.grad(aux_head_loss_reference(*leaves, t, label_smoothing=0.1), wanted)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("backend", _backends("cpu", "triton"))
def test_create_graph_is_refused_not_silently_zero(backend):
    """The fused op is differentiable once: a graph of its gradients is refused with a clear error
    (a second derivative would otherwise come out as zeros); the reference gives one."""
    x, w, _, t = make_inputs(3, 4, 2, 2, 5, "nchw", dtype=torch.float64, bias=False)
    with use_backend(backend):
        loss = aux_head_loss(x, w, None, t)
    with pytest.raises(NotImplementedError, match="differentiable once"):
        torch.autograd.grad(loss, x, create_graph=True)
    (gx,) = torch.autograd.grad(aux_head_loss_reference(x, w, None, t), x, create_graph=True)
    assert torch.autograd.grad(gx.pow(2).sum(), w)[0].abs().sum() > 0

@needs_cpp
def test_cpp_backward_reads_grad_losses_with_its_stride():
    """A mean or sum's gradient reaches the backward ops as one value expanded (stride 0); any
    stride gives what the contiguous copy gives."""
    x, w, b, t = (v.detach() for v in make_inputs(6, 8, 3, 3, 5, "nchw"))
    ops = torch.ops.mlaan_fast
    _, logits, pooled, lse = ops.aux_head_loss_forward(x, w, b, t, 0.1)
    for g in (torch.tensor(0.37).expand(6), torch.randn(12)[::2]):
        assert not g.is_contiguous()
        gx = ops.aux_head_loss_backward_input(g, None, logits, lse, w, t, 0.1, [6, 8, 3, 3], torch.float32, False)
        gw, gb = ops.aux_head_loss_backward_params(g, None, logits, lse, pooled, t, 0.1)
        c = g.contiguous()
        assert torch.equal(gx, ops.aux_head_loss_backward_input(c, None, logits, lse, w, t, 0.1, [6, 8, 3, 3],
                                                                torch.float32, False))
        rw, rb = ops.aux_head_loss_backward_params(c, None, logits, lse, pooled, t, 0.1)
        assert torch.equal(gw, rw) and torch.equal(gb, rb)


@needs_cpp
def test_opcheck_custom_ops_cpu():
    x, w, b, t = make_inputs(3, 6, 2, 2, 4, "channels_last")
    fwd = torch.ops.mlaan_fast.aux_head_fused_forward.default
    torch.library.opcheck(fwd, (x, w, b, t, 0.1, "cpu"))
    torch.library.opcheck(fwd, (x.detach()[:, :, 0, 0], w.detach(), None, t, 0.0, "cpu"))
    with torch.no_grad():
        _, logits, pooled, lse = fwd(x, w, b, t, 0.1, "cpu")
    g = torch.randn(3)
    gl = torch.randn(3, 4)
    torch.library.opcheck(torch.ops.mlaan_fast.aux_head_fused_backward_input.default,
                          (g, gl, logits, lse, w.detach(), t, 0.1, [3, 6, 2, 2], torch.float32, True, "cpu"))
    torch.library.opcheck(torch.ops.mlaan_fast.aux_head_fused_backward_params.default,
                          (g, None, logits, lse, pooled, t, 0.1, "cpu"))


@needs_triton_cpu
def test_opcheck_custom_op_triton():
    x, w, b, t = make_inputs(2, 5, 2, 2, 3, "nchw")
    torch.library.opcheck(torch.ops.mlaan_fast.aux_head_fused_forward.default, (x, w, b, t, 0.0, "triton"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_cpp
def test_opcheck_cpp_ops():
    x, w, b, t = make_inputs(3, 6, 2, 2, 4, "nchw")
    x, w, b = x.detach(), w.detach(), b.detach()
    ops = torch.ops.mlaan_fast
    torch.library.opcheck(ops.aux_head_loss_forward.default, (x, w, b, t, 0.1))
    losses, logits, pooled, lse = ops.aux_head_loss_forward(x, w, b, t, 0.1)
    outs = [torch.empty_like(v) for v in (losses, logits, pooled, lse)]
    torch.library.opcheck(ops.aux_head_loss_forward_out.default, (x, w, None, t, 0.0, *outs))
    g, gl = torch.randn(3), torch.randn(3, 4)
    torch.library.opcheck(ops.aux_head_loss_backward_input.default,
                          (g, gl, logits, lse, w, t, 0.1, [3, 6, 2, 2], torch.float32, False))
    torch.library.opcheck(ops.aux_head_loss_backward_params.default, (g, None, logits, lse, pooled, t, 0.1))
    unchecked = {"check_target": False}
    torch.library.opcheck(ops.aux_head_loss_forward.default, (x, w, b, t, 0.1), unchecked)
    torch.library.opcheck(ops.aux_head_loss_forward_out.default, (x, w, b, t, 0.1, *outs), unchecked)
    torch.library.opcheck(ops.aux_head_loss_backward_input.default,
                          (g, None, logits, lse, w, t, 0.0, [3, 6, 2, 2], torch.float32, True), unchecked)
    torch.library.opcheck(ops.aux_head_loss_backward_params.default, (g, gl, logits, lse, pooled, t, 0.1), unchecked)


@needs_cpp
def test_opcheck_custom_ops_unchecked_target_cpu():
    x, w, b, t = make_inputs(3, 6, 2, 2, 4, "nchw")
    fwd = torch.ops.mlaan_fast.aux_head_fused_forward.default
    torch.library.opcheck(fwd, (x, w, b, t, 0.1, "cpu", False))
    with torch.no_grad():
        _, logits, pooled, lse = fwd(x, w, b, t, 0.1, "cpu", False)
    g = torch.randn(3)
    torch.library.opcheck(torch.ops.mlaan_fast.aux_head_fused_backward_input.default,
                          (g, None, logits, lse, w.detach(), t, 0.1, [3, 6, 2, 2], torch.float32, False, "cpu", False))
    torch.library.opcheck(torch.ops.mlaan_fast.aux_head_fused_backward_params.default,
                          (g, None, logits, lse, pooled, t, 0.1, "cpu", False))


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


@needs_cpp
def test_cpp_forward_writes_every_output_element():
    x, w, b, t = make_inputs(5, 7, 3, 2, 6, "channels_last")
    x, w, b = x.detach(), w.detach(), b.detach()
    outs = [torch.full(s, float("nan")) for s in ((5,), (5, 6), (5, 7), (5,))]
    torch.ops.mlaan_fast.aux_head_loss_forward_out(x, w, b, t, 0.1, *outs)
    losses, logits, pooled, lse = outs
    ref_pooled = x.mean(dim=(2, 3))
    ref_logits = F.linear(ref_pooled, w, b)
    torch.testing.assert_close(pooled, ref_pooled)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(lse, torch.logsumexp(ref_logits, dim=1))
    torch.testing.assert_close(losses, F.cross_entropy(ref_logits, t, reduction="none", label_smoothing=0.1))


@needs_triton_cpu
def test_triton_forward_writes_every_output_element():
    from mlaan_fast.triton import aux_head as tk

    x = make_features(5, 7, 3, 2, "noncontig")
    w, b, t = torch.randn(6, 7), torch.randn(6), torch.randint(0, 6, (5,))
    outs = tuple(torch.full(s, float("nan")) for s in ((5,), (5, 6), (5, 7), (5,)))
    losses, logits, pooled, lse = tk.forward(x, w, b, t, 0.1, out=outs)
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
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(3)).all()
        with use_backend(backend):
            loss = aux_head_loss(x, w, b, t, label_smoothing=0.1)
        grads = torch.autograd.grad(loss, (x, w, b))
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.utils.deterministic.fill_uninitialized_memory = old[1]
    ref = torch.autograd.grad(aux_head_loss_reference(x, w, b, t, label_smoothing=0.1), (x, w, b))
    for g, r in zip(grads, ref):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g, r)


BOTH_PATHS = [pytest.param("reference", (4, 8, 6)), pytest.param("cpu", (4, 8, 6), marks=needs_cpp),
              pytest.param("cpu", tuple(GEMM_SHAPE.values()), marks=needs_cpp),
              pytest.param("triton", (4, 8, 6), marks=needs_triton_cpu)]


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


def _bad_inputs():
    x, w, b, t = (v.detach() if v is not None else v for v in make_inputs(3, 4, 2, 2, 5, "nchw"))
    return [
        ("target out of range", (x, w, b, torch.tensor([0, 5, 1])), ValueError, r"target\[1\] = 5"),
        ("negative target", (x, w, b, torch.tensor([0, 1, -1])), ValueError, r"target\[2\] = -1"),
        ("target dtype", (x, w, b, t.int()), TypeError, "int64"),
        ("float target", (x, w, b, t.float()), TypeError, "int64"),
        ("batch zero", (x[:0], w, b, t[:0]), ValueError, "batch size 0"),
        ("channel mismatch", (x, w[:, :3], b, t), ValueError, "input channels"),
        ("bias length", (x, w, b[:4], t), ValueError, "bias"),
        ("rank 3", (x[:, :, 0], w, b, t), ValueError, "rank 3"),
        ("rank 5", (x[..., None], w, b, t), ValueError, "rank 5"),
        ("target length", (x, w, b, t[:2]), ValueError, "target must be"),
        ("integer features", (x.long(), w, b, t), TypeError, "floating"),
        ("weight device", (x, w.to("meta"), b, t), ValueError, "device|meta"),
        ("target device", (x, w, b, t.to("meta")), ValueError, "meta"),
    ]


@pytest.mark.parametrize("backend", _backends("reference", "cpu", "triton"))
def test_bad_inputs_raise_clear_errors(backend):
    for name, args, exc, msg in _bad_inputs():
        with use_backend(backend), pytest.raises(exc, match=msg):
            aux_head_loss(*args)
    x, w, b, t = _bad_inputs()[0][1][:3] + (torch.tensor([0, 1, 2]),)
    with use_backend(backend):
        with pytest.raises(ValueError, match="reduction"):
            aux_head_loss(x, w, b, t, reduction="avg")
        with pytest.raises(ValueError, match="label_smoothing"):
            aux_head_loss(x, w, b, t, label_smoothing=1.5)


@needs_cpp
def test_cpp_ops_check_their_inputs():
    ops = torch.ops.mlaan_fast
    for name, args, exc, msg in _bad_inputs():
        if "device" in name:
            continue  # needs two real devices
        with pytest.raises(exc, match=msg):
            ops.aux_head_loss_forward(*args, 0.0)
    x, w, b, _ = _bad_inputs()[0][1]
    t = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.aux_head_loss_forward(x, w, b, t, -0.5)
    losses, logits, pooled, lse = ops.aux_head_loss_forward(x, w, b, t, 0.0)
    with pytest.raises(ValueError, match="logits"):
        ops.aux_head_loss_forward_out(x, w, b, t, 0.0, losses, logits[:, :2].clone(), pooled, lse)
    with pytest.raises(ValueError, match=r"target\[0\] = 7"):
        ops.aux_head_loss_backward_params(torch.ones(3), None, logits, lse, pooled, torch.tensor([7, 0, 0]), 0.0)
    with pytest.raises(ValueError, match="features_shape"):
        ops.aux_head_loss_backward_input(torch.ones(3), None, logits, lse, w, t, 0.0, [2, 4, 2, 2],
                                         torch.float32, False)


@needs_triton_cpu
def test_triton_kernel_checks_target_range():
    from mlaan_fast.triton import aux_head as tk

    with pytest.raises(ValueError, match=r"target\[2\] = 9"):
        tk.forward(torch.randn(3, 4, 2, 2), torch.randn(5, 4), None, torch.tensor([0, 1, 9]), 0.0)


def _with_bad_target(B=6, C=8, N=5, bad_index=2, bad_value=5):
    x, w, b, t = make_inputs(B, C, 3, 3, N, "channels_last")
    t = t.clone()
    t[bad_index] = bad_value
    return x, w, b, t


@pytest.mark.parametrize("backend,size", BOTH_PATHS)
@pytest.mark.parametrize("bad_value", ["N", -1, 1 << 40])
def test_unchecked_bad_target_gives_nan(backend, size, bad_value):
    """check_target=False: no error, a NaN loss (and NaN gradients) for the bad sample, the rest exact."""
    B, C, N = size
    x, w, b, t = _with_bad_target(B=B, C=C, N=N, bad_value=N if bad_value == "N" else bad_value)
    with use_backend(backend):
        per_sample = aux_head_loss(x, w, b, t, reduction="none", label_smoothing=0.1, check_target=False)
        mean = aux_head_loss(x, w, b, t, label_smoothing=0.1, check_target=False)
    good = torch.arange(B) != 2
    assert torch.isnan(per_sample[2]) and torch.isnan(mean)
    ref = aux_head_loss_reference(x[good], w, b, t[good], reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(per_sample[good], ref)
    gx, gw, gb = torch.autograd.grad(per_sample.sum(), (x, w, b))
    assert torch.isnan(gx[2]).all() and torch.isfinite(gx[good]).all()
    assert torch.isnan(gw).all() and torch.isnan(gb).all()


@pytest.mark.parametrize("backend", _backends("reference", "cpu", "triton"))
def test_unchecked_target_skips_the_python_check(backend, monkeypatch):
    """check_target=False never reaches the (host-syncing) range check."""
    import mlaan_fast.ops.aux_head as ah

    def forbidden(*args):
        raise AssertionError("check_target_range called with check_target=False")

    monkeypatch.setattr(ah, "check_target_range", forbidden)
    if TRITON_ON_CPU:
        from mlaan_fast.triton import aux_head as tk

        monkeypatch.setattr(tk, "check_target_range", forbidden)
    x, w, b, t = make_inputs(4, 8, 2, 2, 5, "nchw")
    with use_backend(backend):
        loss = aux_head_loss(x, w, b, t, check_target=False)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", _backends("reference", "cpu", "triton"))
def test_checked_bad_target_raises_first_index(backend):
    x, w, b, t = _with_bad_target()
    t[4] = -3
    with use_backend(backend), pytest.raises(ValueError, match=r"target\[2\] = 5 is outside the class range \[0, 5\)"):
        aux_head_loss(x, w, b, t, check_target=True)


@needs_cpp
def test_cpp_op_target_check_flag():
    """The C++ ops raise the clear error by default and give NaN (no error) with check_target=False."""
    x, w, b, t = (v.detach() for v in _with_bad_target())
    ops = torch.ops.mlaan_fast
    for kwargs in ({}, {"check_target": True}):
        with pytest.raises(ValueError, match=r"aux_head_loss_forward: target\[2\] = 5"):
            ops.aux_head_loss_forward(x, w, b, t, 0.0, **kwargs)
    outs = [torch.full(s, 7.0) for s in ((6,), (6, 5), (6, 8), (6,))]
    with pytest.raises(ValueError, match=r"target\[2\] = 5"):
        ops.aux_head_loss_forward_out(x, w, b, t, 0.0, *outs)
    assert (outs[0] == 7.0).all(), "the check runs before the kernel"
    losses, logits, pooled, lse = ops.aux_head_loss_forward(x, w, b, t, 0.0, check_target=False)
    assert torch.isnan(losses[2]) and torch.isfinite(losses[torch.arange(6) != 2]).all()
    ops.aux_head_loss_forward_out(x, w, b, t, 0.0, *outs, check_target=False)
    assert torch.equal(outs[0].isnan(), losses.isnan())
    g = torch.ones(6)
    gw, gb = ops.aux_head_loss_backward_params(g, None, logits, lse, pooled, t, 0.0, check_target=False)
    assert torch.isnan(gw).all() and torch.isnan(gb).all()
    gx = ops.aux_head_loss_backward_input(g, None, logits, lse, w, t, 0.0, [6, 8, 3, 3], torch.float32, False,
                                          check_target=False)
    assert torch.isnan(gx[2]).all() and torch.isfinite(gx[torch.arange(6) != 2]).all()


@needs_triton_cpu
def test_triton_forward_unchecked_gives_nan():
    from mlaan_fast.triton import aux_head as tk

    losses, *_ = tk.forward(torch.randn(3, 4, 2, 2), torch.randn(5, 4), None, torch.tensor([0, 1, 9]), 0.0,
                            check_target=False)
    assert torch.isnan(losses[2]) and torch.isfinite(losses[:2]).all()


@pytest.mark.parametrize("backend", _backends("cpu", "triton"))
def test_linear_aux_head_check_target_option(backend):
    head = LinearAuxHead(8, 5, check_target=False)
    x, _, _, t = _with_bad_target()
    with use_backend(backend):
        assert torch.isnan(head(x, t))
        with pytest.raises(ValueError, match=r"target\[2\] = 5"):
            head(x, t, check_target=True)
    assert "check_target=False" in repr(head)


@pytest.mark.parametrize("backend", _backends("cpu", "triton"))
def test_linear_aux_head_fused_matches_unfused(backend):
    torch.manual_seed(3)
    fused = LinearAuxHead(20, 10)
    plain = LinearAuxHead(20, 10, fused=False)
    plain.load_state_dict(fused.state_dict())
    assert list(fused.state_dict()) == ["fc.weight", "fc.bias"]
    x = make_features(9, 20, 4, 4, "channels_last").requires_grad_()
    t = torch.randint(0, 10, (9,))
    with use_backend(backend):
        loss, correct = fused(x, t, return_correct=True)
    gx, gw, gb = torch.autograd.grad(loss, (x, fused.fc.weight, fused.fc.bias))
    ref, ref_correct = plain(x, t, return_correct=True)
    rx, rw, rb = torch.autograd.grad(ref, (x, plain.fc.weight, plain.fc.bias))
    logits = plain.fc(x.mean(dim=(2, 3)))
    assert correct.dtype == torch.int64 and correct.dim() == 0
    assert int(correct) == int(ref_correct) == int((logits.argmax(1) == t).sum())
    torch.testing.assert_close(loss, ref)
    for g, r in zip((gx, gw, gb), (rx, rw, rb)):
        torch.testing.assert_close(g, r)
    with use_backend(backend):
        per_sample = fused(x, t, reduction="none")
    assert per_sample.shape == (9,)


# --- GPU (run on the lent GPU machine) ---------------------------------------------------------------

GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", SMALL_CASES + LARGE_CASES + [(256, 512, 7, 7, 1000, "nchw", "mean", 0.1, True),
                                                              (1024, 2048, 1, 1, 1000, "flat", "sum", 0.0, True),
                                                              (1000, 33, 3, 3, 10, "nchw", "none", 0.1, True),
                                                              (4099, 16, 2, 2, 2, "channels_last", "sum", 0.0, False)],
                         ids=lambda c: "-".join(map(str, c)))
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
    for g, tg, r in zip(grads, torch_grads, ref_grads):
        assert g.dtype == dtype
        assert err(g, r) <= 2 * err(tg, r) + floor


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backward_is_deterministic(backend):
    x, w, b, t = make_inputs(1024, 64, 8, 8, 10, "channels_last", device="cuda")
    with use_backend(backend):
        first = torch.autograd.grad(aux_head_loss(x, w, b, t), (x, w, b))
        second = torch.autograd.grad(aux_head_loss(x, w, b, t), (x, w, b))
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_bad_target_and_non_finite(backend):
    x, w, b, t = make_inputs(8, 16, 4, 4, 10, "nchw", device="cuda")
    bad_t = t.clone()
    bad_t[5] = 10
    with use_backend(backend), pytest.raises(ValueError, match=r"target\[5\] = 10"):
        aux_head_loss(x, w, b, bad_t)
    x = x.detach().clone()
    x[3, 2, 1, 1] = float("nan")
    with use_backend(backend):
        per_sample = aux_head_loss(x, w, b, t, reduction="none")
    assert torch.isnan(per_sample[3]) and torch.isfinite(per_sample[torch.arange(8) != 3]).all()


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
def test_gpu_cpp_op_bad_target_raises():
    """A direct CUDA op call with a bad target raises ValueError (and the process stays usable)."""
    x, w, b, t = (v.detach() for v in make_inputs(8, 16, 4, 4, 10, "nchw", device="cuda"))
    t[5] = 10
    ops = torch.ops.mlaan_fast
    with pytest.raises(ValueError, match=r"target\[5\] = 10"):
        ops.aux_head_loss_forward(x, w, b, t, 0.0)
    outs = [torch.empty(s, device="cuda") for s in ((8,), (8, 10), (8, 16), (8,))]
    with pytest.raises(ValueError, match=r"target\[5\] = 10"):
        ops.aux_head_loss_forward_out(x, w, b, t, 0.0, *outs)
    losses = ops.aux_head_loss_forward(x, w, b, t, 0.0, check_target=False)[0]
    assert torch.isnan(losses[5]) and torch.isfinite(losses[torch.arange(8, device="cuda") != 5]).all()
    torch.cuda.synchronize()


def _count_syncs(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(c.message) for c in caught)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_forward_syncs_once_when_checking_never_otherwise(backend):
    x, w, b, t = (v.detach() for v in make_inputs(64, 16, 4, 4, 10, "nchw", device="cuda"))
    with use_backend(backend):
        aux_head_loss(x, w, b, t)  # warm up: backend choice, compilation
        torch.cuda.synchronize()
        assert _count_syncs(lambda: aux_head_loss(x, w, b, t)) == 1
        assert _count_syncs(lambda: aux_head_loss(x, w, b, t, check_target=False)) == 0


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
