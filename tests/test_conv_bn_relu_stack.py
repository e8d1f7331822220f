"""The memory-lean (1x1 conv, BN, ReLU) stack against the plain modules: values, gradients,
running statistics, saved bytes, autocast, and the DGL head that uses it."""
import copy

import pytest
import torch
from torch import nn

from mlaan_fast.models import build_model
from mlaan_fast.nn import DGLAuxHead
from mlaan_fast.nn.conv_bn_relu_stack import conv_bn_relu_stack
from mlaan_fast.profiling import ActivationMeter

pytestmark = pytest.mark.usefixtures("one_thread")


def make_stack(c_in, width=12, depth=3, dtype=torch.float64, momentum=0.1, seed=0):
    torch.manual_seed(seed)
    mods = []
    for i in range(depth):
        mods += [nn.Conv2d(c_in if i == 0 else width, width, 1, bias=False),
                 nn.BatchNorm2d(width, momentum=momentum), nn.ReLU(inplace=True)]
    stack = nn.Sequential(*mods).to(dtype)
    for m in stack.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial affine so every branch of the maths is used
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    return stack


def grads(out, inputs, cotangent):
    return torch.autograd.grad(out, inputs, cotangent, allow_unused=True)


@pytest.mark.parametrize("shape", [(7, 5, 6, 5), (1, 3, 4, 4), (16, 33, 1, 1)])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_plain_stack_fp64(shape, momentum, channels_last):
    plain = make_stack(shape[1], momentum=momentum)
    lean = copy.deepcopy(plain)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for _ in range(3):  # running statistics evolve identically over several steps
        x = torch.randn(shape, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
        want, got = plain(x), conv_bn_relu_stack(x, lean)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        cot = torch.randn_like(want)
        for g, w in zip(grads(got, [x, *lean.parameters()], cot), grads(want, [x, *plain.parameters()], cot)):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    for b, a in zip(lean.buffers(), plain.buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


class _Lean(nn.Module):
    def __init__(self, stack):
        super().__init__()
        self.stack = stack

    def forward(self, x):
        return conv_bn_relu_stack(x, self.stack)


def test_fp64_gradcheck_all_inputs():
    lean = _Lean(make_stack(4, width=3, depth=2))
    names = [n for n, _ in lean.named_parameters()]
    x = torch.randn(5, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in lean.parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(lean, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_saves_one_tensor_per_layer():
    plain = make_stack(16, width=8, dtype=torch.float32)
    lean = copy.deepcopy(plain)
    x = torch.randn(4, 16, 10, 10)  # no grad: an activation the meter counts as saved by conv 1
    layer_bytes = 4 * 8 * 10 * 10 * 4
    with ActivationMeter(exclude=plain) as m_plain:
        y = plain(x)
    with ActivationMeter(exclude=lean) as m_lean:
        y2 = conv_bn_relu_stack(x, lean)
    x_bytes, stats_bytes = x.numel() * 4, 3 * 2 * 8 * 4  # BN keeps batch mean and 1/std per layer
    # plain: x, then per layer the BN input and the ReLU output (the next conv shares the latter).
    assert m_plain.peak_bytes == x_bytes + 6 * layer_bytes + stats_bytes
    # lean: x, then per layer the BN input only.
    assert m_lean.peak_bytes == x_bytes + 3 * layer_bytes + stats_bytes
    del y, y2


def test_bf16_autocast_matches_plain():
    plain = make_stack(16, dtype=torch.float32)
    lean = copy.deepcopy(plain)
    x = torch.randn(8, 16, 9, 9).to(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = plain(x), conv_bn_relu_stack(x, lean)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    gw = grads(want.float().sum(), [x, *plain.parameters()], None)
    gg = grads(got.float().sum(), [x, *lean.parameters()], None)
    for g, w in zip(gg, gw):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_eval_and_no_grad_use_the_modules():
    stack = make_stack(5)
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    before = [b.clone() for b in stack.buffers()]
    with torch.no_grad():
        torch.testing.assert_close(conv_bn_relu_stack(x, stack), stack(copy.deepcopy(x)))
    stack.eval()
    out = conv_bn_relu_stack(x, stack)
    torch.testing.assert_close(out, stack(x))
    assert not any(torch.equal(a, b) for a, b in zip(stack.buffers(), before) if a.dtype.is_floating_point)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_stack_has_the_eager_gradients(backend):
    # torch 2.11 traced the forward's in-place ReLU on the batch-norm output so that the input's
    # gradient came out all zeros (and with it every gradient below a compiled DGL head)
    torch._dynamo.reset()
    eager = make_stack(5)
    compiled = copy.deepcopy(eager)
    x = torch.randn(4, 5, 3, 2, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(4, 12, 3, 2, dtype=torch.float64)
    run = torch.compile(lambda t: conv_bn_relu_stack(t, compiled), backend=backend, fullgraph=True)
    got, want = run(x), conv_bn_relu_stack(x, eager)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads(got, [x, *compiled.parameters()], cot), grads(want, [x, *eager.parameters()], cot)):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    for b, a in zip(compiled.buffers(), eager.buffers()):  # running statistics updated once, alike
        torch.testing.assert_close(b, a, rtol=1e-12, atol=0)


def test_rejects_other_layers():
    with pytest.raises(ValueError, match="1x1"):
        stack = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        conv_bn_relu_stack(torch.randn(2, 3, 4, 4), stack)
    with pytest.raises(ValueError, match="triples"):
        conv_bn_relu_stack(torch.randn(2, 3, 4, 4), nn.Sequential(nn.Conv2d(3, 4, 1, bias=False)))


def test_dgl_head_fused_equals_plain():
    torch.manual_seed(0)
    fused = DGLAuxHead(16, 10, fused=True).double()
    plain = copy.deepcopy(fused)
    plain.fused = False
    x = torch.randn(6, 16, 8, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 10, (6,))
    lf, lp = fused(x, t), plain(x, t)
    torch.testing.assert_close(lf, lp, rtol=1e-12, atol=0)
    for g, w in zip(grads(lf, [x, *fused.parameters()], None), grads(lp, [x, *plain.parameters()], None)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_dgl_mlaan_step_holds_less_than_end_to_end():
    """The issue's memory target: dgl+mlaan ResNet-32 K=16 saved-activation peak <= e2e's (batch 8 here)."""
    x, t = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    peaks = {}
    for method, K in (("e2e", None), ("dgl+mlaan", 16)):
        torch.manual_seed(0)
        model = build_model("resnet32", K=K, method=method)
        with ActivationMeter(exclude=model) as meter:
            model.local_step(x, t)
        peaks[method] = meter.peak_bytes
    assert peaks["dgl+mlaan"] <= peaks["e2e"]


def test_dgl_lean_option_same_gradients_less_memory():
    x, t = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    grads_by, peaks = {}, {}
    for lean in (True, False):
        torch.manual_seed(0)
        model = build_model("resnet32", K=16, method="dgl+mlaan", dgl_lean=lean).double()
        with ActivationMeter(exclude=model) as meter:
            model.local_step(x, t)
        peaks[lean] = meter.peak_bytes
        grads_by[lean] = [p.grad for p in model.parameters()]
    assert peaks[True] < peaks[False]
    for a, b in zip(grads_by[True], grads_by[False]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
