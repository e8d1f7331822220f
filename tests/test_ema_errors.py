"""ema_update_ on hostile input: every bad argument gets the same one-line error on every backend
(shadows untouched), shadows that share memory with a shadow or a live tensor are refused, and the
C++ op's own guards refuse malformed tensors."""
import pytest
import torch
from op_helpers import CPU_BACKENDS, backends, needs_cpp, usable_on

from mlaan_fast.ops import ema_update_, use_backend

HERE = [b for b in CPU_BACKENDS if usable_on(b, "cpu")]


def _ok(*s):
    return torch.zeros(*s)


def _bad_inputs():
    """(name, shadow, live, decay, exception, pattern)."""
    ok = _ok
    buf = torch.zeros(10)
    return [
        ("length", [ok(3), ok(3)], [ok(3)], 0.5, ValueError, r"shadow has 2 tensors but live has 1"),
        ("shape", [ok(3), ok(2, 2), ok(4)], [ok(3), ok(4), ok(4)], 0.5, ValueError,
         r"shape mismatch at index 1.*\[2, 2\].*\[4\]"),
        ("device", [ok(3), ok(3)], [ok(3), torch.zeros(3, device="meta")], 0.5, ValueError,
         r"live\[1\] is on meta"),
        ("shadow device", [ok(3), torch.zeros(3, device="meta")], [ok(3), ok(3)], 0.5, ValueError,
         r"shadow\[1\] is on meta"),
        ("int-live", [ok(3), ok(3)], [ok(3), torch.zeros(3, dtype=torch.int64)], 0.5, TypeError,
         r"live\[1\] must be float32, bfloat16 or float16.*(Long|int64)"),
        ("fp64-live", [ok(3)], [torch.zeros(3, dtype=torch.float64)], 0.5, TypeError,
         r"live\[0\] must be float32"),
        ("int-shadow", [torch.zeros(3, dtype=torch.int32)], [ok(3)], 0.5, TypeError,
         r"shadow\[0\] must be float32.*(Int|int32)"),
        ("fp16-shadow", [ok(2), torch.zeros(3, dtype=torch.float16)], [ok(2), ok(3)], 0.5, TypeError,
         r"shadow\[1\] must be float32.*(Half|float16)"),
        ("decay<0", [ok(3)], [ok(3)], -0.01, ValueError, r"decay must be in \[0, 1\], got -0.01"),
        ("decay>1", [ok(3)], [ok(3)], 1.5, ValueError, r"decay must be in \[0, 1\], got 1.5"),
        ("decay-nan", [ok(3)], [ok(3)], float("nan"), ValueError, r"decay must be in \[0, 1\]"),
        ("decay-inf", [ok(3)], [ok(3)], float("inf"), ValueError, r"decay must be in \[0, 1\], got inf"),
        ("decay-str", [ok(3)], [ok(3)], "0.5", TypeError, "decay must be a float, got str"),
        ("decay-bool", [ok(3)], [ok(3)], True, TypeError, "decay must be a float, got bool"),
        ("decay-none", [ok(3)], [ok(3)], None, TypeError, "decay must be a float, got NoneType"),
        ("decay-tensor", [ok(3)], [ok(3)], torch.tensor(0.5), TypeError, "decay must be a float, got Tensor"),
        ("noncontig-shadow", [ok(3), ok(4, 6).t()], [ok(3), ok(6, 4)], 0.5, ValueError,
         r"shadow\[1\] must be contiguous"),
        ("shadow not a list", ok(3), [ok(3)], 0.5, TypeError,
         "shadow must be a list or tuple of tensors, got Tensor"),
        ("live a generator", [ok(3)], (t for t in [ok(3)]), 0.5, TypeError, "live must be a list or tuple"),
        ("live element", [ok(3), ok(3)], [ok(3), 3.0], 0.5, TypeError,
         r"live\[1\] must be a tensor, got float"),
        ("shadow element", [None], [ok(3)], 0.5, TypeError, r"shadow\[0\] must be a tensor, got NoneType"),
        ("sparse live", [ok(3)], [ok(3).to_sparse()], 0.5, TypeError, r"live\[0\] must be a dense"),
        ("same shadow twice", [buf, buf], [ok(10), ok(10)], 0.5, ValueError,
         r"shadow\[0\] and shadow\[1\] overlap in memory"),
        ("shadow is its live", [buf], [buf], 0.5, ValueError, r"shadow\[0\] and live\[0\] overlap in memory"),
        ("partial shadow/shadow", [buf[:6], buf[4:]], [ok(6), ok(6)], 0.5, ValueError,
         r"shadow\[0\] and shadow\[1\] overlap in memory"),
        ("shadow/other live", [ok(4), buf[:5]], [buf[3:7], ok(5)], 0.5, ValueError,
         r"shadow\[1\] and live\[0\] overlap in memory"),
        ("strided live over a shadow", [buf[4:6], ok(3)], [ok(2), buf.view(5, 2)[:3, 0]], 0.5, ValueError,
         r"shadow\[0\] and live\[1\] overlap in memory"),
    ]


@pytest.mark.parametrize("bad", _bad_inputs(), ids=lambda b: b[0])
@pytest.mark.parametrize("backend", backends(*CPU_BACKENDS))
def test_bad_inputs(backend, bad):
    _, shadow, live, decay, exc, pattern = bad
    before = [s.clone() if isinstance(s, torch.Tensor) else s for s in shadow] if isinstance(shadow, list) \
        else []
    with use_backend(backend), pytest.raises(exc, match=pattern):
        ema_update_(shadow, live, decay)
    for s, b in zip(shadow, before, strict=False):
        untouched = not isinstance(s, torch.Tensor) or s.is_meta or torch.equal(s, b)
        assert untouched, "a rejected call must not touch the shadows"


@pytest.mark.parametrize("bad", _bad_inputs(), ids=lambda b: b[0])
def test_every_backend_gives_the_same_one_line_error(bad):
    """Same exception type and message, one line, on every backend that runs here (the cuda backend
    shares them by construction: the arguments are checked before the backend is chosen)."""
    outcomes = {}
    for backend in HERE:
        _, shadow, live, decay, exc, _ = _bad_inputs()[[b[0] for b in _bad_inputs()].index(bad[0])]
        with use_backend(backend):
            try:
                ema_update_(shadow, live, decay)
                outcomes[backend] = (None, "no error")
            except Exception as e:  # the very exception is what is compared
                outcomes[backend] = (type(e), str(e))
    assert len(set(outcomes.values())) == 1, outcomes
    kind, message = next(iter(outcomes.values()))
    assert kind is bad[4] and "\n" not in message and message.startswith("ema_update_: "), message


@pytest.mark.parametrize("backend", backends(*CPU_BACKENDS))
def test_memory_that_may_be_shared(backend):
    """Live tensors may overlap each other (they are only read); empty tensors occupy nothing."""
    buf = torch.randn(10)
    shadow = [torch.zeros(4), torch.zeros(4), buf[:0], torch.zeros(0)]
    live = [buf[:4], buf[2:6], buf[:0], buf[:0]]
    with use_backend(backend):
        ema_update_(shadow, live, 0.5)
    torch.testing.assert_close(shadow[0], 0.5 * buf[:4])
    torch.testing.assert_close(shadow[1], 0.5 * buf[2:6])


def test_bad_argument_kinds():
    with pytest.raises(TypeError, match="shadow must be a list"):
        ema_update_(torch.zeros(3), [torch.zeros(3)], 0.5)
    with pytest.raises(TypeError, match=r"live\[1\] must be a tensor"):
        ema_update_([torch.zeros(3), torch.zeros(3)], [torch.zeros(3), 3.0], 0.5)
    with pytest.raises(TypeError, match="decay must be a float"):
        ema_update_([torch.zeros(3)], [torch.zeros(3)], torch.tensor(0.5))


@needs_cpp
@pytest.mark.parametrize("bad", [b for b in _bad_inputs() if b[0] in (
    "length", "shape", "int-live", "fp64-live", "int-shadow", "fp16-shadow",
    "noncontig-shadow")], ids=lambda b: b[0])
def test_cpp_op_guards(bad):
    """The C++ operator refuses, by itself, tensors its kernel could not read or write safely
    (short messages; the user-facing ones are ema_update_'s), and writes nothing. (Devices: a meta
    tensor sends the call to the fake kernel; test_cuda_bad_device_mix mixes real devices.)"""
    _, shadow, live, decay, exc, _ = bad
    before = [s.clone() for s in shadow]
    with pytest.raises(exc, match="ema_update_"):
        torch.ops.mlaan_fast.ema_update_(shadow, live, decay)
    for s, b in zip(shadow, before, strict=False):
        assert s.is_meta or torch.equal(s, b)


@pytest.mark.gpu
def test_cuda_bad_device_mix():
    with use_backend("cuda"), pytest.raises(ValueError, match=r"live\[0\] is on cpu"):
        ema_update_([torch.zeros(3, device="cuda")], [torch.zeros(3)], 0.5)
    with pytest.raises(ValueError, match=r"ema_update_: pair 0 is not on cuda"):
        torch.ops.mlaan_fast.ema_update_([torch.zeros(3, device="cuda")], [torch.zeros(3)], 0.5)
