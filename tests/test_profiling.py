"""ActivationMeter against byte counts worked out by hand from the shapes."""

import copy
import gc
import threading

import pytest
import torch
from torch import nn

from mlaan_fast.profiling import ActivationMeter

F32 = 4


@pytest.fixture
def no_gc():
    """Release must come from reference counting alone, never from a garbage-collector pass."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def _conv_relu(channels_in=3, channels_out=5):
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.ReLU())


def test_conv_relu_matches_hand_count(no_gc):
    model = _conv_relu()
    x = torch.randn(2, 3, 9, 7)
    with ActivationMeter() as meter:
        loss = model(x).sum()
    # conv keeps its input (2*3*9*7) and its weight (a parameter: not counted); ReLU keeps its
    # output (2*5*9*7); sum keeps nothing.
    expected = (2 * 3 * 9 * 7 + 2 * 5 * 9 * 7) * F32
    assert meter.peak_bytes == expected
    assert meter.current_bytes == expected
    loss.backward()
    assert meter.current_bytes == 0
    assert meter.peak_bytes == expected


def test_include_parameters_counts_the_conv_weight(no_gc):
    model = _conv_relu()
    x = torch.randn(2, 3, 9, 7)
    with ActivationMeter(include_parameters=True) as meter:
        model(x).sum().backward()
    assert meter.peak_bytes == (2 * 3 * 9 * 7 + 2 * 5 * 9 * 7 + 5 * 3 * 3 * 3) * F32
    assert meter.current_bytes == 0


def test_storage_saved_twice_counts_once(no_gc):
    a = torch.randn(1000, requires_grad=True)
    with ActivationMeter() as meter:
        b = a * 2.0  # a Python scalar factor: nothing saved
        loss = (b * b).sum()  # b saved as both operands
    assert meter.saved_tensors == 2
    assert meter.peak_bytes == 1000 * F32
    del b, loss
    assert meter.current_bytes == 0


def test_views_count_their_whole_storage_once(no_gc):
    a = torch.randn(10, 64, requires_grad=True)
    with ActivationMeter() as meter:
        b = a.exp()  # exp keeps its output b (10*64)
        loss = (b[:5] * b[5:]).sum()  # two views into b's storage
    assert meter.peak_bytes == 10 * 64 * F32
    loss.backward()
    assert meter.current_bytes == 0


def test_release_when_graph_is_dropped_without_backward(no_gc):
    model = _conv_relu()
    with ActivationMeter() as meter:
        out = model(torch.randn(4, 3, 8, 8))
        loss = out.square().sum()  # square keeps its input: the ReLU output, already counted
    held = (4 * 3 * 8 * 8 + 4 * 5 * 8 * 8) * F32
    assert meter.current_bytes == held
    del loss
    assert meter.current_bytes == held  # `out` still owns the ReLU node and the conv node
    del out
    assert meter.current_bytes == 0


def test_retain_graph_keeps_bytes_until_the_graph_goes(no_gc):
    model = _conv_relu()
    with ActivationMeter() as meter:
        loss = model(torch.randn(2, 3, 6, 6)).sum()
    loss.backward(retain_graph=True)
    assert meter.current_bytes == meter.peak_bytes > 0
    loss.backward()
    assert meter.current_bytes == 0


def test_peak_is_the_largest_live_set_not_the_sum(no_gc):
    model = _conv_relu()
    one = (2 * 3 * 8 * 8 + 2 * 5 * 8 * 8) * F32
    with ActivationMeter() as meter:
        for _ in range(3):  # windows freed one after another, as in local learning
            model(torch.randn(2, 3, 8, 8)).sum().backward()
        assert meter.peak_bytes == one
        first = model(torch.randn(2, 3, 8, 8)).sum()
        second = model(torch.randn(2, 3, 8, 8)).sum()  # two graphs alive at once
        assert meter.peak_bytes == 2 * one
        del first, second
    assert meter.current_bytes == 0


def test_reset_restarts_the_peak_from_the_present(no_gc):
    model = _conv_relu()
    with ActivationMeter() as meter:
        model(torch.randn(8, 3, 8, 8)).sum().backward()
        big = meter.peak_bytes
        meter.reset()
        assert meter.peak_bytes == 0
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert meter.peak_bytes == big // 4


def test_exclude_modules_and_tensors(no_gc):
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.full((16,), 0.5))

        def forward(self, x):
            return x.sin() * self.scale  # sin keeps x, the product keeps the buffer

    scale = Scale()
    x = torch.randn(8, 16, requires_grad=True)
    h = x + 1  # a non-leaf input, so it is not mistaken for a parameter
    with ActivationMeter() as everything:
        scale(h).sum()
    with ActivationMeter(exclude=scale) as no_buffer:
        scale(h).sum()
    with ActivationMeter(exclude=[scale, h]) as nothing:
        scale(h).sum()
    assert everything.peak_bytes == (8 * 16 + 16) * F32
    assert no_buffer.peak_bytes == 8 * 16 * F32
    assert nothing.peak_bytes == 0
    with pytest.raises(TypeError, match="exclude"):
        with ActivationMeter(exclude=[3]):
            pass


def test_meters_nest(no_gc):
    a = torch.randn(100, requires_grad=True)
    with ActivationMeter() as outer:
        keep = a.exp()  # 100 floats kept (exp keeps its output)
        with ActivationMeter() as inner:
            loss = keep.sin().sum()  # sin keeps its input: the same storage, counted once
            loss2 = (a * 3).exp().sum()  # another 100 floats
        assert inner.peak_bytes == 200 * F32
        assert outer.peak_bytes == 200 * F32
        del loss, loss2
        assert inner.current_bytes == 0
        assert outer.current_bytes == 100 * F32
    del keep
    assert outer.current_bytes == 0
    meter = ActivationMeter()
    with meter:
        with pytest.raises(RuntimeError, match="already open"):
            meter.__enter__()


def test_nested_meters_keep_their_own_rules(no_gc):
    model = _conv_relu()
    x = torch.randn(2, 3, 9, 7)
    with ActivationMeter(include_parameters=True) as outer:
        with ActivationMeter(exclude=[x]) as inner:
            model(x).sum()
    activations = (2 * 3 * 9 * 7 + 2 * 5 * 9 * 7) * F32
    assert outer.peak_bytes == activations + 5 * 3 * 3 * 3 * F32
    assert inner.peak_bytes == 2 * 5 * 9 * 7 * F32


def test_gradients_are_unchanged():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Tanh())
    x = torch.randn(3, 3, 10, 10, dtype=torch.float64)
    model.double()
    ref_model = copy.deepcopy(model)
    ref_model(x).pow(2).sum().backward()
    with ActivationMeter() as meter:
        model(x).pow(2).sum().backward()
    assert meter.peak_bytes > 0 and meter.current_bytes == 0
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_backward_on_other_threads_releases(no_gc):
    model = _conv_relu()
    with ActivationMeter() as meter:
        loss = model(torch.randn(2, 3, 8, 8)).sum()
    worker = threading.Thread(target=loss.backward)
    worker.start()
    worker.join()
    assert meter.current_bytes == 0


def test_cpu_only_reports_no_cuda_numbers():
    with ActivationMeter(cuda_device="cpu") as meter:
        pass
    assert meter.cuda_max_allocated is None
    assert meter.cuda_max_allocated_delta is None


@pytest.mark.gpu
def test_cuda_counts_match_cpu_and_allocator_peak_bounds_them(no_gc):
    model = _conv_relu(3, 32)
    x = torch.randn(64, 3, 32, 32)
    with ActivationMeter() as cpu_meter:
        model(x).sum().backward()
    model.cuda()
    xc = x.cuda()
    with ActivationMeter() as meter:
        loss = model(xc).sum()
        loss.backward()
        del loss
    assert meter.peak_bytes == cpu_meter.peak_bytes == (64 * 3 + 64 * 32) * 32 * 32 * F32
    assert meter.cuda_max_allocated_delta >= meter.peak_bytes
    assert meter.cuda_max_allocated >= meter.cuda_max_allocated_delta
    assert meter.current_bytes == 0


@pytest.mark.gpu
def test_cuda_peak_survives_a_nested_meter():
    big = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    with ActivationMeter() as outer:
        del big  # the outer peak includes these 64 MiB
        with ActivationMeter() as inner:
            torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    assert outer.cuda_max_allocated - inner.cuda_max_allocated >= (64 << 20) - (1 << 20)


# ---------------------------------------------------------------- local learning frees its windows
@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _step_peak(arch, K, method, batch=2, size=16):
    from mlaan_fast.models import build_model

    model = build_model(arch, num_classes=10, K=K, method=method).train()
    images, targets = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    with ActivationMeter(exclude=model) as meter:
        model.local_step(images, targets)
    assert meter.current_bytes == 0, (
        f"{arch} K={K} {method}: {meter.current_bytes} bytes still held after the step"
    )
    return meter.peak_bytes


def test_mlaan_step_peak_does_not_grow_with_K(one_thread, no_gc):
    e2e = _step_peak("resnet32", 1, "e2e")
    k8 = _step_peak("resnet32", 8, "mlaan")
    k16 = _step_peak("resnet32", 16, "mlaan")
    assert k16 <= k8 < e2e, (e2e, k8, k16)


def test_one_block_modules_peak_is_independent_of_depth(one_thread, no_gc):
    # One block per module: the largest window is the first one (stem + two blocks + LAM + head)
    # whatever follows it, so ResNet-20 K=9 and ResNet-32 K=16 hold the same bytes at their peak.
    assert _step_peak("resnet20", 9, "mlaan") == _step_peak("resnet32", 16, "mlaan")


@pytest.mark.parametrize("method", ["dgl", "infopro", "dgl+mlaan", "infopro+mlaan"])
def test_every_method_frees_all_windows(method, one_thread, no_gc):
    assert _step_peak("resnet20", 5, method) > 0
