"""mlaan_fast.ops.ema_update_ on every backend against torch._foreach_lerp_, its ops (opcheck,
torch.compile) and the GPU-only checks. Argument errors and memory overlap: test_ema_errors.py;
EMAShadow: test_ema_shadow.py."""
import random

import pytest
import torch
from op_helpers import AVAILABLE, usable_on

import mlaan_fast.ops.ema as ema_mod
from mlaan_fast.ops import ema_update_, use_backend


def _backends(device):
    marks = [pytest.mark.gpu] if device == "cuda" else []
    names = ("reference", "cuda", "triton") if device == "cuda" else ("reference", "cpu", "triton")
    return [pytest.param(b, marks=marks, id=f"{device}-{b}") for b in names]


def _need(backend, device):
    if not usable_on(backend, device):
        pytest.skip(f"backend {backend!r} cannot run on {device} tensors here: {AVAILABLE[backend][1]}")


def _shapes(n, rng, max_numel):
    """n shapes of 1..4 dims with odd sizes, 0-element and 1-element ones included."""
    shapes = []
    for i in range(n):
        if i % 11 == 3:
            shapes.append((0,) if i % 2 else (3, 0, 5))
        elif i % 11 == 7:
            shapes.append((1,) if i % 2 else (1, 1, 1))
        else:
            dims = rng.randint(1, 4)
            shape = [rng.choice([1, 2, 3, 5, 7, 9, 13, 17, 31, 33, 65]) for _ in range(dims)]
            while torch.Size(shape).numel() > max_numel:
                shape[shape.index(max(shape))] //= 2
            shapes.append(tuple(shape))
    return shapes


def _make(shapes, live_dtypes, device):
    shadow = [torch.randn(s, device=device) for s in shapes]
    live = [torch.randn(s, device=device).to(live_dtypes[i % len(live_dtypes)]) for i, s in enumerate(shapes)]
    return shadow, live


def _flat(tensors):
    return torch.cat([t.reshape(-1).float() for t in tensors]) if tensors else torch.zeros(0)


MIXED = (torch.float32, torch.bfloat16, torch.float16)
CASES = [
    # (tensors, live dtypes, decay, largest tensor)
    (1, (torch.float32,), 0.995, 5000),
    (7, MIXED, 0.0, 3000),
    (40, (torch.float32,), 1.0, 700),
    (40, MIXED, 0.37, 700),
    (300, (torch.float32,), 0.9, 200),
    (300, (torch.bfloat16,), "random", 200),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}-{'/'.join(str(d)[6:] for d in c[1])}-d{c[2]}")
@pytest.mark.parametrize("backend", _backends("cpu"))
def test_matches_reference_cpu(backend, case):
    _check_against_reference(backend, case, "cpu")


@pytest.mark.parametrize("case", CASES + [(100_000, MIXED, 0.995, 33)],
                         ids=lambda c: f"n{c[0]}-{'/'.join(str(d)[6:] for d in c[1])}-d{c[2]}")
@pytest.mark.parametrize("backend", _backends("cuda"))
def test_matches_reference_cuda(backend, case):
    _check_against_reference(backend, case, "cuda")


def _check_against_reference(backend, case, device):
    _need(backend, device)
    n, dtypes, decay, max_numel = case
    rng = random.Random(n * 7919 + len(dtypes))
    if decay == "random":
        decay = rng.random()
    shadow, live = _make(_shapes(n, rng, max_numel), dtypes, device)
    expected_ref = [s.clone() for s in shadow]
    ema_mod._reference(expected_ref, live, decay)
    exact = (decay * _flat(shadow).double() + (1 - decay) * _flat(live).double()).float()
    objects, ptrs = [id(s) for s in shadow], [s.data_ptr() for s in shadow]
    with use_backend(backend):
        ema_update_(shadow, live, decay)
    assert [id(s) for s in shadow] == objects and [s.data_ptr() for s in shadow] == ptrs
    assert all(got.dtype == torch.float32 and got.shape == ref.shape
               for got, ref in zip(shadow, expected_ref, strict=True))
    got, ref = _flat(shadow), _flat(expected_ref)
    try:
        if decay in (0.0, 1.0):
            # End points are exact in the lerp form: nothing computed, every element written.
            assert torch.equal(got, ref)
        else:
            torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)
            torch.testing.assert_close(got, exact, rtol=2e-6, atol=2e-6)
    except AssertionError:
        bad = [i for i, (g, r) in enumerate(zip(shadow, expected_ref, strict=True))
               if not torch.allclose(g, r, 2e-6, 2e-6)]
        raise AssertionError(f"{backend}: tensors {bad[:10]} differ from the reference") from None


@pytest.mark.parametrize("backend", _backends("cpu"))
def test_edge_lists(backend):
    _need(backend, "cpu")
    with use_backend(backend):
        ema_update_([], [], 0.5)  # no-op
        empty = [torch.zeros(0), torch.zeros(4, 0)]
        ema_update_(empty, [torch.zeros(0), torch.zeros(4, 0, dtype=torch.bfloat16)], 0.5)
        one = torch.tensor([2.0])
        ema_update_([one], [torch.tensor([4.0])], 0.25)
        assert one.item() == pytest.approx(3.5)
        # Strided live tensors are read correctly; tuples are accepted.
        shadow = torch.randn(6, 5)
        live = torch.randn(5, 6).t()
        want = 0.3 * shadow + 0.7 * live
        ema_update_((shadow,), (live,), 0.3)
        torch.testing.assert_close(shadow, want)


def test_cpu_backend_large_tensor_uses_all_threads_correctly():
    """Thread ranges cut through tensors: a list mixing big and tiny tensors must still match."""
    _need("cpu", "cpu")
    shapes = [(1 << 17,), (3,), (70_001,), (1,), (0,), (65_537,)]
    shadow, live = _make(shapes, MIXED, "cpu")
    ref = [s.clone() for s in shadow]
    ema_mod._reference(ref, live, 0.8)
    with use_backend("cpu"):
        ema_update_(shadow, live, 0.8)
    for got, want in zip(shadow, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend,op", [("cpu", "ema_update_"), ("triton", "ema_update_triton_")])
def test_opcheck(backend, op):
    _need(backend, "cpu")
    shadow = [torch.randn(5, 3), torch.randn(7), torch.randn(1)]
    live = [torch.randn(5, 3), torch.randn(7).bfloat16(), torch.randn(1).half()]
    overload = getattr(torch.ops.mlaan_fast, op).default
    torch.library.opcheck(overload, (shadow, live, 0.9))
    torch.library.opcheck(overload, ([torch.randn(9)], [torch.randn(9)], 0.5))


@pytest.mark.parametrize("backend,op", [("cpu", "ema_update_"), ("triton", "ema_update_triton_")])
def test_torch_compile_smoke(backend, op):
    _need(backend, "cpu")

    def step(shadow, live):
        getattr(torch.ops.mlaan_fast, op)(shadow, live, 0.75)
        return shadow[0] * 2

    shadow = [torch.randn(9), torch.randn(2, 3)]
    live = [torch.randn(9), torch.randn(2, 3)]
    want = [0.75 * s + 0.25 * t for s, t in zip(shadow, live, strict=True)]
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(shadow, live)
    torch.testing.assert_close(shadow, want)
    torch.testing.assert_close(out, 2 * want[0])


@pytest.mark.parametrize("backend", _backends("cpu"))
def test_public_op_under_torch_compile(backend):
    """ema_update_ itself compiles (fullgraph): the backend is chosen at trace time, the op is opaque."""
    _need(backend, "cpu")
    torch._dynamo.reset()

    def step(shadow, live):
        ema_update_(shadow, live, 0.75)
        return shadow[1] + 1

    shadow = [torch.randn(9), torch.randn(2, 3)]
    live = [torch.randn(9), torch.randn(2, 3).half()]
    want = [0.75 * s + 0.25 * t.float() for s, t in zip(shadow, live, strict=True)]
    with use_backend(backend):
        out = torch.compile(step, backend="aot_eager", fullgraph=True)(shadow, live)
    torch.testing.assert_close(shadow, want)
    torch.testing.assert_close(out, want[1] + 1)


# --- GPU only ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_one_launch_for_many_tensors(backend):
    _need(backend, "cuda")
    shadow, live = _make([(i % 97 + 1,) for i in range(1000)], MIXED, "cuda")
    with use_backend(backend):
        ema_update_(shadow, live, 0.9)  # warm-up: Triton compiles here
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ema_update_(shadow, live, 0.9)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    assert len(kernels) == 1, [e.name for e in kernels]
    assert "ema" in kernels[0].name


@pytest.mark.gpu
def test_cuda_flat_large_and_bf16():
    _need("cuda", "cuda")
    n = (1 << 22) + 3  # a tail that is not a multiple of the vector width
    shadow = torch.randn(n, device="cuda")
    live = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    want = (0.995 * shadow.double() + 0.005 * live.double()).float()
    for backend in ("cuda", "triton"):
        s = shadow.clone()
        with use_backend(backend):
            ema_update_([s], [live], 0.995)
        torch.testing.assert_close(s, want, rtol=2e-6, atol=2e-6)
    # Misaligned views (offset by one element) take the scalar path.
    s = shadow.clone()
    with use_backend("cuda"):
        ema_update_([s[1:]], [live[:-1]], 0.5)
    torch.testing.assert_close(s[1:], (0.5 * shadow[1:].double() + 0.5 * live[:-1].double()).float())
    torch.testing.assert_close(s[0], shadow[0])
