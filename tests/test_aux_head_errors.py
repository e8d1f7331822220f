"""aux_head_loss on hostile input: every bad argument gets the same one-line error on every backend;
targets outside [0, N) (checked: ValueError naming the first; unchecked: NaN, never a number); the
target_checks context; the C++ ops' own guards."""
import pytest
import torch
from op_helpers import (
    CPU_BACKENDS,
    backends,
    make_inputs,
    needs_cpp,
    needs_triton_cpu,
    usable_on,
    with_bad_target,
)

from mlaan_fast.ops import aux_head_loss, target_checks, use_backend
from mlaan_fast.ops.aux_head import aux_head_loss_reference

OPS = torch.ops.mlaan_fast
OUTSIDE = r"target\[2\] = 5 is outside the class range \[0, 5\)"
HERE = [b for b in CPU_BACKENDS if usable_on(b, "cpu")]


def _inputs():
    x, w, b, t = make_inputs(3, 4, 2, 2, 5, "nchw")
    return x.detach(), w.detach(), b.detach(), t


def _bad_calls():
    """(name, args, kwargs, exception, pattern): one bad argument each, the others valid."""
    x, w, b, t = _inputs()
    t3 = torch.tensor([0, 1, 2])
    return [
        ("target out of range", (x, w, b, torch.tensor([0, 5, 1])), {}, ValueError, r"target\[1\] = 5"),
        ("negative target", (x, w, b, torch.tensor([0, 1, -1])), {}, ValueError, r"target\[2\] = -1"),
        ("target dtype", (x, w, b, t.int()), {}, TypeError, "int64"),
        ("float target", (x, w, b, t.float()), {}, TypeError, "int64"),
        ("batch zero", (x[:0], w, b, t[:0]), {}, ValueError, "batch size 0"),
        ("empty channels", (x[:, :0], w[:, :0], b, t), {}, ValueError, "empty dimension"),
        ("no classes", (x, w[:0], None, t), {}, ValueError, "0 classes"),
        ("channel mismatch", (x, w[:, :3], b, t), {}, ValueError, "input channels"),
        ("bias length", (x, w, b[:4], t), {}, ValueError, "bias"),
        ("rank 3", (x[:, :, 0], w, b, t), {}, ValueError, "rank 3"),
        ("rank 5", (x[..., None], w, b, t), {}, ValueError, "rank 5"),
        ("weight rank", (x, w[None], b, t), {}, ValueError, r"weight must be \[N, C\]"),
        ("target length", (x, w, b, t[:2]), {}, ValueError, "target must be"),
        ("integer features", (x.long(), w, b, t), {}, TypeError, "floating"),
        ("bool features", (x > 0, w, b, t), {}, TypeError, "floating"),
        ("complex weight", (x, w.to(torch.complex64), b, t), {}, TypeError, "weight must be floating"),
        ("integer bias", (x, w, b.long(), t), {}, TypeError, "bias must be floating"),
        ("weight device", (x, w.to("meta"), b, t), {}, ValueError, "device|meta"),
        ("bias device", (x, w, b.to("meta"), t), {}, ValueError, "bias is on meta"),
        ("target device", (x, w, b, t.to("meta")), {}, ValueError, "meta"),
        ("sparse features", (x[:, :, 0, 0].to_sparse(), w, b, t), {}, TypeError, "dense"),
        ("features a list", (x.tolist(), w, b, t), {}, TypeError, "features must be a Tensor, got list"),
        ("weight None", (x, None, b, t), {}, TypeError, "weight must be a Tensor, got NoneType"),
        ("bias a float", (x, w, 0.5, t), {}, TypeError, "bias must be a Tensor or None, got float"),
        ("target a list", (x, w, b, [0, 1, 2]), {}, TypeError, "target must be a Tensor, got list"),
        ("reduction", (x, w, b, t3), {"reduction": "avg"}, ValueError, "reduction"),
        ("reduction None", (x, w, b, t3), {"reduction": None}, ValueError, "reduction must be one of"),
        ("reduction int", (x, w, b, t3), {"reduction": 1}, ValueError, "reduction must be one of"),
        ("smoothing > 1", (x, w, b, t3), {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ("smoothing < 0", (x, w, b, t3), {"label_smoothing": -0.1}, ValueError,
         r"label_smoothing must be in \[0, 1\]"),
        ("smoothing nan", (x, w, b, t3), {"label_smoothing": float("nan")}, ValueError, "label_smoothing"),
        ("smoothing inf", (x, w, b, t3), {"label_smoothing": float("inf")}, ValueError, "label_smoothing"),
        ("smoothing str", (x, w, b, t3), {"label_smoothing": "0.1"}, TypeError,
         "label_smoothing must be a float, got str"),
        ("smoothing bool", (x, w, b, t3), {"label_smoothing": True}, TypeError, "got bool"),
        ("smoothing None", (x, w, b, t3), {"label_smoothing": None}, TypeError, "got NoneType"),
        ("smoothing tensor", (x, w, b, t3), {"label_smoothing": torch.tensor(0.1)}, TypeError, "got Tensor"),
        ("return_logits str", (x, w, b, t3), {"return_logits": "yes"}, TypeError, "return_logits"),
        ("check_target str", (x, w, b, t3), {"check_target": "no"}, TypeError, "check_target"),
        ("check_target int", (x, w, b, t3), {"check_target": 0}, TypeError, "check_target"),
    ]


def _outcome(backend, args, kwargs):
    with use_backend(backend):
        try:
            aux_head_loss(*args, **kwargs)
        except Exception as exc:  # the very exception is what is compared
            return type(exc), str(exc)
    return None, "no error"


@pytest.mark.parametrize("bad", _bad_calls(), ids=lambda b: b[0])
@pytest.mark.parametrize("backend", backends(*CPU_BACKENDS))
def test_bad_arguments_raise_clear_errors(backend, bad):
    _, args, kwargs, exc, pattern = bad
    with use_backend(backend), pytest.raises(exc, match=pattern):
        aux_head_loss(*args, **kwargs)


@pytest.mark.parametrize("bad", _bad_calls(), ids=lambda b: b[0])
def test_every_backend_gives_the_same_one_line_error(bad):
    """Same exception type and message, one line, on every backend that runs here (the cuda
    backend shares them by construction: the arguments are checked before the backend is chosen)."""
    _, args, kwargs, exc, _ = bad
    outcomes = {backend: _outcome(backend, args, kwargs) for backend in HERE}
    assert len(set(outcomes.values())) == 1, outcomes
    kind, message = next(iter(outcomes.values()))
    assert kind is exc and "\n" not in message and message.startswith("aux_head_loss: "), message


def test_overlapping_inputs_are_harmless():
    """aux_head_loss writes only new tensors, so inputs that share memory (weight a view of the
    features) cannot corrupt anything: every backend gives what the reference gives on copies."""
    base = torch.randn(4 * 6 * 2 * 2)
    x = base.view(4, 6, 2, 2)
    w = base[:30].view(5, 6)
    t = torch.tensor([0, 4, 2, 1])
    want = aux_head_loss_reference(x.clone(), w.clone(), None, t)
    for backend in HERE:
        with use_backend(backend):
            torch.testing.assert_close(aux_head_loss(x, w, None, t), want)


# --- target range -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,size", [
    pytest.param("reference", (4, 8, 6)), pytest.param("cpu", (4, 8, 6), marks=needs_cpp),
    pytest.param("cpu", (6, 160, 140), marks=needs_cpp),  # the CPU kernels' GEMM path
    pytest.param("triton", (4, 8, 6), marks=needs_triton_cpu)])
@pytest.mark.parametrize("bad_value", ["N", -1, 1 << 40])
def test_unchecked_bad_target_gives_nan(backend, size, bad_value):
    """check_target=False: no error, a NaN loss (and NaN gradients) for the bad sample, the rest exact."""
    B, C, N = size
    x, w, b, t = with_bad_target(B=B, C=C, N=N, bad_value=N if bad_value == "N" else bad_value)
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


@pytest.mark.parametrize("backend", backends(*CPU_BACKENDS))
def test_unchecked_target_skips_the_python_check(backend, monkeypatch):
    """check_target=False never reaches the (host-syncing) range check."""
    import mlaan_fast.ops.aux_head as ah

    def forbidden(*args):
        raise AssertionError("check_target_range called with check_target=False")

    monkeypatch.setattr(ah, "check_target_range", forbidden)
    x, w, b, t = make_inputs(4, 8, 2, 2, 5, "nchw")
    with use_backend(backend):
        loss = aux_head_loss(x, w, b, t, check_target=False)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", backends(*CPU_BACKENDS))
def test_checked_bad_target_raises_first_index(backend):
    x, w, b, t = with_bad_target()
    t[4] = -3
    with use_backend(backend), pytest.raises(ValueError, match=OUTSIDE):
        aux_head_loss(x, w, b, t, check_target=True)


@pytest.mark.parametrize("backend", backends(*CPU_BACKENDS))
def test_target_checks_context(backend):
    """check_target=None follows target_checks (checked by default); an explicit True/False wins."""
    x, w, b, t = with_bad_target()
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"target\[2\] = 5"):
            aux_head_loss(x, w, b, t)
        with target_checks(False):
            assert torch.isnan(aux_head_loss(x, w, b, t))
            with target_checks(True), pytest.raises(ValueError, match=r"target\[2\] = 5"):
                aux_head_loss(x, w, b, t)
            assert torch.isnan(aux_head_loss(x, w, b, t, check_target=None))
            with pytest.raises(ValueError, match=r"target\[2\] = 5"):
                aux_head_loss(x, w, b, t, check_target=True)
        with target_checks(True):
            assert torch.isnan(aux_head_loss(x, w, b, t, check_target=False))
        with pytest.raises(ValueError, match=r"target\[2\] = 5"):
            aux_head_loss(x, w, b, t)


def test_target_checks_wants_a_bool():
    with pytest.raises(TypeError, match="target_checks: enabled must be True or False, got str"):
        with target_checks("off"):
            pass


@pytest.mark.parametrize("op", [pytest.param("aux_head_loss_forward", marks=needs_cpp),
                                pytest.param("aux_head_loss_forward_triton", marks=needs_triton_cpu)])
def test_forward_op_target_check_flag(op):
    """The forward ops raise the clear error when asked to check, and give NaN (no error) when not;
    the backward ops never check (NaN gradients for the bad sample's)."""
    x, w, b, t = (v.detach() for v in with_bad_target())
    with pytest.raises(ValueError, match=f"^aux_head_loss: {OUTSIDE}$"):
        getattr(OPS, op)(x, w, b, t, 0.0, True)
    losses, logits, pooled, lse = getattr(OPS, op)(x, w, b, t, 0.0, False)
    assert torch.isnan(losses[2]) and torch.isfinite(losses[torch.arange(6) != 2]).all()
    suffix = op[len("aux_head_loss_forward"):]
    g = torch.ones(6)
    gw, gb = getattr(OPS, "aux_head_loss_backward_params" + suffix)(g, None, logits, lse, pooled, t, 0.0)
    assert torch.isnan(gw).all() and torch.isnan(gb).all()
    gx = getattr(OPS, "aux_head_loss_backward_input" + suffix)(g, None, logits, lse, w, t, 0.0, [6, 8, 3, 3],
                                                               torch.float32, False)
    assert torch.isnan(gx[2]).all() and torch.isfinite(gx[torch.arange(6) != 2]).all()


@needs_triton_cpu
def test_triton_op_checks_before_the_kernel(monkeypatch):
    import mlaan_fast.ops.aux_head as ah

    monkeypatch.setattr(ah, "_kernels", lambda: pytest.fail("a kernel was reached"))
    x, w, b, t = (v.detach() for v in with_bad_target())
    with pytest.raises(ValueError, match=r"target\[2\] = 5"):
        OPS.aux_head_loss_forward_triton(x, w, b, t, 0.0, True)


@needs_triton_cpu
def test_triton_launcher_leaves_the_target_unchecked():
    """The kernels layer does not check: an out-of-range target gives a NaN loss."""
    from mlaan_fast.triton import aux_head as tk

    losses, *_ = tk.forward(torch.randn(3, 4, 2, 2), torch.randn(5, 4), None, torch.tensor([0, 1, 9]), 0.0)
    assert torch.isnan(losses[2]) and torch.isfinite(losses[:2]).all()


# --- the C++ ops' guards: a direct call with malformed tensors is refused, never run -------------------

@needs_cpp
def test_cpp_forward_op_guards():
    x, w, b, t = _inputs()
    for args in [(x[:0], w, b, t[:0]), (x, w[:, :3], b, t), (x, w, b[:4], t), (x[:, :, 0], w, b, t),
                 (x, w, b, t[:2]), (x.long(), w, b, t), (x, w, b, t.int()), (x, w[:0], None, t),
                 (x, w[None], b, t), (x, w, b.long(), t)]:
        with pytest.raises((ValueError, TypeError), match="aux_head_loss_forward"):
            OPS.aux_head_loss_forward(*args, 0.0, True)


@needs_cpp
def test_cpp_backward_op_guards():
    x, w, b, t = _inputs()
    t = torch.tensor([0, 1, 2])
    _, logits, pooled, lse = OPS.aux_head_loss_forward(x, w, b, t, 0.0, True)
    g = torch.ones(3)
    bad_input_calls = [
        (g, None, logits, lse, w, t, 0.0, [2, 4, 2, 2], torch.float32, False),  # batch of features_shape
        (g, None, logits, lse, w[:, :3], t, 0.0, [3, 4, 2, 2], torch.float32, False),  # weight [N, C]
        (g, None, logits, lse, w, t, 0.0, [3, 4, 2], torch.float32, False),  # rank 3
        (g, None, logits, lse, w, t, 0.0, [3, 4], torch.float32, True),  # channels_last 2-D
        (g, None, logits, lse, w, t, 0.0, [3, 4, 2, 2], torch.int64, False),  # dtype
        (g[:2], None, logits, lse, w, t, 0.0, [3, 4, 2, 2], torch.float32, False),  # grad_losses [B]
        (g.double(), None, logits, lse, w, t, 0.0, [3, 4, 2, 2], torch.float32, False),  # dtypes alike
        (g, logits[:, :2], logits, lse, w, t, 0.0, [3, 4, 2, 2], torch.float32, False),  # grad_logits [B, N]
        (g, None, logits, lse, w, t.int(), 0.0, [3, 4, 2, 2], torch.float32, False),  # target int64
    ]
    for args in bad_input_calls:
        with pytest.raises((ValueError, TypeError), match="aux_head_loss_backward_input"):
            OPS.aux_head_loss_backward_input(*args)
    for args in [(g, None, logits, lse, pooled[:2], t, 0.0), (g, None, logits, lse, pooled.double(), t, 0.0),
                 (g, None, logits, lse[:2], pooled, t, 0.0), (g, None, logits[:0], lse, pooled, t, 0.0)]:
        with pytest.raises((ValueError, TypeError), match="aux_head_loss_backward_params"):
            OPS.aux_head_loss_backward_params(*args)
    with pytest.raises(ValueError, match="reduction"):
        OPS.aux_head_loss(x, w, b, t, "avg", 0.0, True)
