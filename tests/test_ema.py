"""mlaan_fast.ops.ema_update_ on every backend against torch._foreach_lerp_, its input checks, and EMAShadow."""
import copy
import io
import random

import pytest
import torch
from torch import nn

import mlaan_fast.ops.ema as ema_mod
from mlaan_fast.nn import EMAShadow
from mlaan_fast.ops import available_backends, ema_update_, use_backend
from mlaan_fast.ops._backend import triton_interpreted

AVAIL = available_backends()
HAS_CUDA = torch.cuda.is_available()


def _usable_on(name, device):
    if not AVAIL[name][0]:
        return False
    if name in ("cpu", "cuda"):
        return name == device
    if name == "triton":
        return (device == "cpu") == triton_interpreted()
    return True


def _backends(device):
    marks = [pytest.mark.gpu] if device == "cuda" else []
    names = ("reference", "cuda", "triton") if device == "cuda" else ("reference", "cpu", "triton")
    return [pytest.param(b, marks=marks, id=f"{device}-{b}") for b in names]


def _need(backend, device):
    if not _usable_on(backend, device):
        pytest.skip(f"backend {backend!r} cannot run on {device} tensors here: {AVAIL[backend][1]}")


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
    assert all(got.dtype == torch.float32 and got.shape == ref.shape for got, ref in zip(shadow, expected_ref))
    got, ref = _flat(shadow), _flat(expected_ref)
    try:
        if decay in (0.0, 1.0):
            # End points are exact in the lerp form: nothing computed, every element written.
            assert torch.equal(got, ref)
        else:
            torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)
            torch.testing.assert_close(got, exact, rtol=2e-6, atol=2e-6)
    except AssertionError:
        bad = [i for i, (g, r) in enumerate(zip(shadow, expected_ref)) if not torch.allclose(g, r, 2e-6, 2e-6)]
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
    for got, want in zip(shadow, ref):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_opcheck():
    _need("cpu", "cpu")
    shadow = [torch.randn(5, 3), torch.randn(7), torch.randn(1)]
    live = [torch.randn(5, 3), torch.randn(7).bfloat16(), torch.randn(1).half()]
    torch.library.opcheck(torch.ops.mlaan_fast.ema_update_.default, (shadow, live, 0.9))


def test_torch_compile_smoke():
    _need("cpu", "cpu")

    def step(shadow, live):
        torch.ops.mlaan_fast.ema_update_(shadow, live, 0.75)
        return shadow[0] * 2

    shadow = [torch.randn(9), torch.randn(2, 3)]
    live = [torch.randn(9), torch.randn(2, 3)]
    want = [0.75 * s + 0.25 * t for s, t in zip(shadow, live)]
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(shadow, live)
    torch.testing.assert_close(shadow, want)
    torch.testing.assert_close(out, 2 * want[0])


def _bad_inputs():
    ok = lambda *s: torch.zeros(*s)  # noqa: E731
    return [
        ("length", [ok(3), ok(3)], [ok(3)], 0.5, ValueError, r"shadow has 2 tensors but live has 1"),
        ("shape", [ok(3), ok(2, 2), ok(4)], [ok(3), ok(4), ok(4)], 0.5, ValueError,
         r"shape mismatch at index 1.*\[2, 2\].*\[4\]"),
        ("device", [ok(3), ok(3)], [ok(3), torch.zeros(3, device="meta")], 0.5, ValueError,
         r"live\[1\] is on meta"),
        ("int-live", [ok(3), ok(3)], [ok(3), torch.zeros(3, dtype=torch.int64)], 0.5, TypeError,
         r"live\[1\] must be float32, bfloat16 or float16.*(Long|int64)"),
        ("int-shadow", [torch.zeros(3, dtype=torch.int32)], [ok(3)], 0.5, TypeError,
         r"shadow\[0\] must be float32.*(Int|int32)"),
        ("fp16-shadow", [ok(2), torch.zeros(3, dtype=torch.float16)], [ok(2), ok(3)], 0.5, TypeError,
         r"shadow\[1\] must be float32.*(Half|float16)"),
        ("decay<0", [ok(3)], [ok(3)], -0.01, ValueError, r"decay must be in \[0, 1\], got -0.01"),
        ("decay>1", [ok(3)], [ok(3)], 1.5, ValueError, r"decay must be in \[0, 1\], got 1.5"),
        ("decay-nan", [ok(3)], [ok(3)], float("nan"), ValueError, r"decay must be in \[0, 1\]"),
        ("noncontig-shadow", [ok(3), ok(4, 6).t()], [ok(3), ok(6, 4)], 0.5, ValueError,
         r"shadow\[1\] must be contiguous"),
    ]


@pytest.mark.parametrize("bad", _bad_inputs(), ids=lambda b: b[0])
@pytest.mark.parametrize("backend", _backends("cpu"))
def test_bad_inputs(backend, bad):
    _need(backend, "cpu")
    _, shadow, live, decay, exc, pattern = bad
    before = [s.clone() for s in shadow]
    with use_backend(backend), pytest.raises(exc, match=pattern):
        ema_update_(shadow, live, decay)
    for s, b in zip(shadow, before):
        assert torch.equal(s, b), "a rejected call must not touch the shadows"


@pytest.mark.parametrize("bad", _bad_inputs(), ids=lambda b: b[0])
def test_bad_inputs_cpp_op(bad):
    """The C++ operator checks by itself (no Python wrapper in between)."""
    _need("cpu", "cpu")
    _, shadow, live, decay, exc, pattern = bad
    with pytest.raises(exc, match=pattern):
        torch.ops.mlaan_fast.ema_update_(shadow, live, decay)


def test_bad_argument_kinds():
    with pytest.raises(TypeError, match="shadow must be a list"):
        ema_update_(torch.zeros(3), [torch.zeros(3)], 0.5)
    with pytest.raises(TypeError, match=r"live\[1\] must be a tensor"):
        ema_update_([torch.zeros(3), torch.zeros(3)], [torch.zeros(3), 3.0], 0.5)
    with pytest.raises(TypeError, match="decay must be a float"):
        ema_update_([torch.zeros(3)], [torch.zeros(3)], torch.tensor(0.5))


# ----------------------------------------------------------------------------- EMAShadow


def _blocks(live_dtype=torch.float32):
    torch.manual_seed(1)
    a = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU())
    b = nn.Sequential(nn.Linear(7, 4), nn.LayerNorm(4))
    for m in (a, b):
        m.to(live_dtype)
    return [a, b]


def _perturb(modules):
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.add_(torch.randn_like(p))


def test_ema_shadow_structure():
    live = _blocks()
    ema = EMAShadow(live, decay=0.9)
    assert ema.flat.dtype == torch.float32 and ema.flat.dim() == 1
    assert ema.flat.numel() == sum(p.numel() for m in live for p in m.parameters())
    assert all(lp is p for lp, p in zip(ema.live_parameters(), [p for m in live for p in m.parameters()]))
    # Live modules are referenced, not owned.
    assert not any(k.startswith("live") for k in ema.state_dict())
    assert sum(1 for _ in ema.parameters()) == len(ema.views())
    assert "flat" in dict(ema.named_buffers())
    for v, lp in zip(ema.views(), ema.live_parameters()):
        assert not v.requires_grad and v.shape == lp.shape
        assert v.untyped_storage().data_ptr() == ema.flat.untyped_storage().data_ptr()
        torch.testing.assert_close(v, lp.detach())
    # BN running statistics are copied, not shared.
    assert not ema.shadows[0][1].running_mean is live[0][1].running_mean
    with torch.no_grad():
        ema.flat.zero_()
    assert all(float(v.abs().sum()) == 0 for v in ema.views())


@pytest.mark.parametrize("live_dtype", [torch.float32, torch.bfloat16])
def test_ema_shadow_update(live_dtype):
    live = _blocks(live_dtype)
    ema = EMAShadow(live, decay=0.8)
    for _ in range(3):
        _perturb(live)
        old = [v.clone() for v in ema.views()]
        ptr = ema.flat.data_ptr()
        ema.update()
        assert ema.flat.data_ptr() == ptr
        for v, o, lp in zip(ema.views(), old, ema.live_parameters()):
            torch.testing.assert_close(v, 0.8 * o + 0.2 * lp.detach().float(), rtol=1e-6, atol=1e-6)
    # The shadow modules compute with the averaged weights.
    x = torch.randn(2, 7)
    manual = torch.nn.functional.linear(x, ema.views()[3], ema.views()[4])
    torch.testing.assert_close(ema.shadows[1][0](x), manual)


def test_ema_shadow_flat_live_takes_flat_path(monkeypatch):
    """Live parameters stored back to back in one buffer are updated as one flat pair."""
    live = _blocks()
    params = [p for m in live for p in m.parameters()]
    storage = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = storage[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    ema = EMAShadow(live, decay=0.5)
    calls = []
    real = ema_mod.ema_update_
    monkeypatch.setattr("mlaan_fast.nn.ema_shadow.ema_update_",
                        lambda s, t, d: (calls.append(len(s)), real(s, t, d)))
    with torch.no_grad():
        storage.add_(1.0)
    old = ema.flat.clone()
    ema.update()
    assert calls == [1]
    torch.testing.assert_close(ema.flat, 0.5 * old + 0.5 * storage)
    # Separate live storages go through the list form.
    ema2 = EMAShadow(_blocks(), decay=0.5)
    ema2.update()
    assert calls == [1, len(ema2.views())]


def test_ema_shadow_survives_conversions():
    live = _blocks()
    ema = EMAShadow(live, decay=0.9)
    ema.double()
    assert ema.flat.dtype == torch.float64
    for v in ema.views():
        assert v.dtype == torch.float64
        assert v.untyped_storage().data_ptr() == ema.flat.untyped_storage().data_ptr()
    _perturb(live)
    old = [v.clone() for v in ema.views()]
    ema.update()
    for v, o, lp in zip(ema.views(), old, ema.live_parameters()):
        torch.testing.assert_close(v, 0.9 * o + 0.1 * lp.detach().double())
    ema.to(torch.float32)
    ema.to("cpu")
    assert ema.flat.dtype == torch.float32
    with torch.no_grad():
        ema.flat.fill_(3.0)
    assert all(bool((v == 3.0).all()) for v in ema.views())
    ema.update()  # back on the fused fp32 path
    torch.testing.assert_close(ema.views()[0], 0.9 * 3.0 + 0.1 * ema.live_parameters()[0].detach())


@pytest.mark.gpu
def test_ema_shadow_cuda():
    live = [m.cuda() for m in _blocks()]
    ema = EMAShadow(live, decay=0.7).cuda()
    for v in ema.views():
        assert v.is_cuda and v.untyped_storage().data_ptr() == ema.flat.untyped_storage().data_ptr()
    _perturb(live)
    old = [v.clone() for v in ema.views()]
    ema.update()
    for v, o, lp in zip(ema.views(), old, ema.live_parameters()):
        torch.testing.assert_close(v, 0.7 * o + 0.3 * lp.detach())


def test_ema_shadow_state_dict_round_trip():
    live = _blocks()
    ema = EMAShadow(live, decay=0.9)
    _perturb(live)
    ema.update()
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    other = EMAShadow(_blocks(), decay=0.9)
    ptr = other.flat.data_ptr()
    other.load_state_dict(state)
    assert other.flat.data_ptr() == ptr
    torch.testing.assert_close(other.flat, ema.flat)
    for v, w in zip(other.views(), ema.views()):
        torch.testing.assert_close(v, w)
        assert v.untyped_storage().data_ptr() == other.flat.untyped_storage().data_ptr()
    # assign=True swaps in the loaded tensors; the views are re-bound to the new flat buffer.
    third = EMAShadow(_blocks(), decay=0.9)
    third.load_state_dict(copy.deepcopy(ema.state_dict()), assign=True)
    torch.testing.assert_close(third.flat, ema.flat)
    for v in third.views():
        assert v.untyped_storage().data_ptr() == third.flat.untyped_storage().data_ptr()
    with torch.no_grad():
        third.flat.zero_()
    assert all(float(v.abs().sum()) == 0 for v in third.views())


def test_ema_shadow_deepcopy_and_pickle_keep_sharing():
    ema = EMAShadow(_blocks(), decay=0.9)
    buf = io.BytesIO()
    torch.save(ema, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(ema), torch.load(buf, weights_only=False)):
        torch.testing.assert_close(clone.flat, ema.flat)
        for v in clone.views():
            assert v.untyped_storage().data_ptr() == clone.flat.untyped_storage().data_ptr()
        assert clone.flat.data_ptr() != ema.flat.data_ptr()


def test_ema_shadow_rejects_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMAShadow(_blocks(), decay=1.5)


# ----------------------------------------------------------------------------- GPU only


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


@pytest.mark.gpu
def test_cuda_bad_device_mix():
    _need("cuda", "cuda")
    with use_backend("cuda"), pytest.raises(ValueError, match=r"live\[0\] is on cpu"):
        ema_update_([torch.zeros(3, device="cuda")], [torch.zeros(3)], 0.5)
