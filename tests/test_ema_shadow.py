"""EMAShadow: frozen EMA copies of live modules in one flat fp32 buffer, updated by ema_update_."""
import copy
import io

import pytest
import torch
from torch import nn

import mlaan_fast.ops.ema as ema_mod
from mlaan_fast.nn import EMAShadow


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
    params = [p for m in live for p in m.parameters()]
    assert all(lp is p for lp, p in zip(ema.live_parameters(), params, strict=True))
    # Live modules are referenced, not owned.
    assert not any(k.startswith("live") for k in ema.state_dict())
    assert sum(1 for _ in ema.parameters()) == len(ema.views())
    assert "flat" in dict(ema.named_buffers())
    for v, lp in zip(ema.views(), ema.live_parameters(), strict=True):
        assert not v.requires_grad and v.shape == lp.shape
        assert v.untyped_storage().data_ptr() == ema.flat.untyped_storage().data_ptr()
        torch.testing.assert_close(v, lp.detach())
    # BN running statistics are copied, not shared.
    assert ema.shadows[0][1].running_mean is not live[0][1].running_mean
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
        for v, o, lp in zip(ema.views(), old, ema.live_parameters(), strict=True):
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
    for v, o, lp in zip(ema.views(), old, ema.live_parameters(), strict=True):
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
    for v, o, lp in zip(ema.views(), old, ema.live_parameters(), strict=True):
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
    for v, w in zip(other.views(), ema.views(), strict=True):
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
