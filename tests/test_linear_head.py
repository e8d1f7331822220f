"""LinearAuxHead: the fused head against the plain modules, and its target-check setting."""
import pytest
import torch
from op_helpers import backends, make_features, with_bad_target

from mlaan_fast.nn import LinearAuxHead
from mlaan_fast.ops import target_checks, use_backend


@pytest.mark.parametrize("backend", backends("cpu", "triton"))
def test_linear_aux_head_check_target_option(backend):
    head = LinearAuxHead(8, 5, check_target=False)
    x, _, _, t = with_bad_target()
    with use_backend(backend):
        assert torch.isnan(head(x, t))
        with pytest.raises(ValueError, match=r"target\[2\] = 5"):
            head(x, t, check_target=True)
    assert "check_target=False" in repr(head)


@pytest.mark.parametrize("backend", backends("cpu", "triton"))
def test_linear_aux_head_follows_target_checks_by_default(backend):
    head = LinearAuxHead(8, 5)
    assert head.check_target is None and "check_target=None" in repr(head)
    x, _, _, t = with_bad_target()
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"target\[2\] = 5"):
            head(x, t)
        with target_checks(False):
            assert torch.isnan(head(x, t))
            with pytest.raises(ValueError, match=r"target\[2\] = 5"):
                LinearAuxHead(8, 5, check_target=True)(x, t)


@pytest.mark.parametrize("backend", backends("cpu", "triton"))
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
    for g, r in zip((gx, gw, gb), (rx, rw, rb), strict=True):
        torch.testing.assert_close(g, r)
    with use_backend(backend):
        per_sample = fused(x, t, reduction="none")
    assert per_sample.shape == (9,)
