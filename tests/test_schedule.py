"""The forward-once schedule gives exactly the gradients of the published (straightforward) schedule."""
import pytest
import torch
from tolerance import assert_all_close_scaled

from mlaan_fast.models import build_model
from mlaan_fast.profiling import ActivationMeter
from mlaan_fast.runtime import LocalStep

CASES = [
    ("resnet20", 3, "mlaan"),
    ("resnet20", 9, "mlaan"),
    ("resnet20", 4, "dgl+mlaan"),
    ("resnet20", 5, "infopro+mlaan"),
    ("resnet32", 8, "mlaan"),
    ("resnet32", 5, "dgl+mlaan"),
]


def _pair(arch, K, method, dtype, **options):
    models = []
    for schedule in ("straightforward", "once"):
        torch.manual_seed(0)
        models.append(build_model(arch, K=K, method=method, schedule=schedule, **options).to(dtype))
    return models


def _batch(dtype, n=4):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 32, 32, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def _assert_same_grads(a, b, rtol, atol):
    named_b = dict(b.named_parameters())
    bad = []
    for name, pa in a.named_parameters():
        ga, gb = pa.grad, named_b[name].grad
        assert (ga is None) == (gb is None), f"{name}: gradient present in one schedule only"
        if ga is not None and not torch.allclose(ga, gb, rtol=rtol, atol=atol):
            bad.append(f"{name}: max |diff| {(ga - gb).abs().max().item():.3e}, "
                       f"max |g| {ga.abs().max().item():.3e}")
    assert not bad, "gradients differ:\n" + "\n".join(bad[:10])


def _check_fp64(arch, K, method, overlap=False):
    a, b = _pair(arch, K, method, torch.float64)
    x, y = _batch(torch.float64)
    ra, rb = a.local_step(x, y), b.local_step(x, y, overlap=overlap)
    _assert_same_grads(a, b, rtol=1e-9, atol=1e-12)
    # Reported losses are fp32 (one rounding of the fp64 objective): equal to an ulp.
    torch.testing.assert_close(rb["loss"], ra["loss"], rtol=1e-6, atol=0)
    for la, lb in zip(ra["module_losses"], rb["module_losses"]):
        torch.testing.assert_close(lb, la, rtol=1e-6, atol=0)
    torch.testing.assert_close(rb["logits"], ra["logits"], rtol=1e-9, atol=0)


@pytest.mark.parametrize("arch,K,method", CASES)
def test_once_matches_straightforward_fp64(arch, K, method):
    _check_fp64(arch, K, method)


@pytest.mark.parametrize("arch,K,method", [("resnet20", 9, "mlaan"), ("resnet20", 4, "dgl+mlaan"),
                                           ("resnet20", 5, "infopro+mlaan"), ("resnet20", 4, "dgl")])
def test_once_overlap_matches_straightforward_fp64(arch, K, method):
    """overlap=True reorders the work (window j after module j+1's forward): same gradients."""
    _check_fp64(arch, K, method, overlap=True)


def test_overlap_needs_the_once_schedule():
    model = build_model("resnet20", K=3, method="mlaan", schedule="straightforward")
    with pytest.raises(ValueError, match="overlap needs schedule='once'"):
        LocalStep(model, overlap=True)
    with pytest.raises(ValueError, match="overlap needs schedule='once'"):
        model.local_step(*_batch(torch.float32), overlap=True)
    with pytest.raises(TypeError, match="overlap: expected true or false"):
        LocalStep(build_model("resnet20", K=3, method="mlaan"), overlap="maybe")


@pytest.mark.parametrize("method,options", [("mlaan", {}), ("dgl+mlaan", {}), ("mlaan", {"lam": False}),
                                            ("mlaan", {"mlm": False}), ("dgl", {}), ("infopro", {})])
def test_once_matches_straightforward_fp32(method, options):
    a, b = _pair("resnet20", 4, method, torch.float32, **options)
    x, y = _batch(torch.float32, n=8)
    a.local_step(x, y)
    b.local_step(x, y)
    # fp32: the schedules add the same terms in another order, so each gradient is compared to its
    # own magnitude. Conv weight gradients behind BatchNorm are sums whose terms cancel: their
    # rounding reaches several 1e-6 of the tensor's largest element, hence 3e-5 (a dropped or doubled
    # term, w_ind = 1e-3 included, moves a gradient by far more).
    assert_all_close_scaled(_grads(b), _grads(a), rtol=3e-5)


def _grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


def test_once_e2e_equals_plain_backprop():
    a, b = _pair("resnet20", 1, "e2e", torch.float64)
    x, y = _batch(torch.float64)
    b.local_step(x, y)
    loss = torch.nn.functional.cross_entropy(a(x), y)
    loss.backward()
    _assert_same_grads(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method,s", [("mlaan", 2), ("dgl+mlaan", 3)])
def test_once_forwards_each_module_once(method, s):
    counts = {}
    for schedule in ("straightforward", "once"):
        model = build_model("resnet20", K=6, method=method, schedule=schedule)
        calls = []
        for module in model.local_modules:
            module.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        model.local_step(*_batch(torch.float32))
        counts[schedule] = len(calls)
    M = model.num_modules
    assert counts["once"] == M
    # Published: every module once in the plain stream plus once per window that contains it.
    windows = [w for w in model.windows if w.start is not None]
    assert counts["straightforward"] == M + sum(w.index - w.start + 1 for w in windows)
    middle = [w for w in windows if w.index - w.start + 1 == s]
    assert len(middle) >= M - s  # so the published count is about (s+1)·M


@pytest.mark.parametrize("method,overlap", [("mlaan", False), ("dgl+mlaan", False), ("mlaan", True),
                                            ("dgl+mlaan", True)])
def test_once_memory_within_one_module_of_straightforward(method, overlap):
    x, y = _batch(torch.float32, n=4)
    peaks = {}
    for schedule in ("straightforward", "once"):
        torch.manual_seed(0)
        model = build_model("resnet20", K=9, method=method, schedule=schedule)
        with ActivationMeter() as meter:
            model.local_step(x, y, overlap=overlap and schedule == "once")
        peaks[schedule] = meter.peak_bytes
    # One module's saved activations: measured on the largest module (module 0: stem + first block).
    torch.manual_seed(0)
    model = build_model("resnet20", K=9, method=method)
    with ActivationMeter() as meter:
        model.local_modules[0](x).sum()
    one_module = meter.peak_bytes
    assert peaks["once"] <= peaks["straightforward"] + one_module, (peaks, one_module)


def test_once_with_grad_scaler_scales_gradients():
    a, b = _pair("resnet20", 4, "mlaan", torch.float64)
    x, y = _batch(torch.float64)

    class Scale:  # the part of GradScaler's interface local_step uses
        def scale(self, loss):
            return loss * 8.0

    a.local_step(x, y)
    b.local_step(x, y, grad_scaler=Scale())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, 8.0 * pa.grad, rtol=1e-9, atol=1e-12, msg=name)
