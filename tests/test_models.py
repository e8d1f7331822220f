"""LocalModel: backbones, gradient isolation, MLAAN step semantics, EMA shadows, fused heads, memory."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from tolerance import assert_all_close_scaled
from torch import nn

from mlaan_fast.models import ARCHS, build_backbone, build_model, schedules
from mlaan_fast.nn import LAM, DGLAuxHead, InfoProAuxHead, LinearAuxHead
from mlaan_fast.ops import target_checks
from mlaan_fast.profiling import ActivationMeter

MLAAN_METHODS = ("mlaan", "dgl+mlaan", "infopro+mlaan")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(n=3, size=32, classes=10, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g, dtype=dtype)
    return images, torch.randint(0, classes, (n,), generator=g)


def twin(arch, seed=0, dtype=torch.float64, **kw):
    """Build a model from a fixed seed (so two calls give identical weights)."""
    torch.manual_seed(seed)
    return build_model(arch, **kw).to(dtype)


def trainable_grads(model):
    return {n: (None if p.grad is None else p.grad.clone())
            for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(got, want, rtol, atol):
    assert got.keys() == want.keys()
    bad = []
    for name in want:
        g, w = got[name], want[name]
        if (g is None) != (w is None):
            bad.append(f"{name}: grad is None in one of them")
        elif g is not None and not torch.allclose(g, w, rtol=rtol, atol=atol):
            bad.append(f"{name}: max |diff| {(g - w).abs().max().item():.3e}, "
                       f"max |want| {w.abs().max().item():.3e}")
    assert not bad, "first mismatches:\n" + "\n".join(bad[:5])


def count(params):
    return sum(p.numel() for p in params)


# ------------------------------------------------------------------ backbones
@pytest.mark.parametrize("arch,expected", [("resnet32", 466_906), ("resnet110", 1_730_714),
                                           ("resnet20", 272_474), ("resnet56", 855_770)])
def test_cifar_parameter_counts(arch, expected):
    with torch.device("meta"):
        assert count(build_backbone(arch, 10).parameters()) == expected


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_imagenet_backbones_match_torchvision(arch):
    with torch.device("meta"):
        ours = build_backbone(arch, 1000)
        theirs = getattr(torchvision.models, arch)()
    assert count(ours.parameters()) == count(theirs.parameters())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    with torch.device("meta"):
        assert ours(torch.empty(2, 3, 224, 224)).shape == (2, 1000)


def test_model_inference_parameters_are_the_backbone():
    with torch.device("meta"):
        model = build_model("resnet32", K=16, method="mlaan")
        big = build_model("resnet101", num_classes=1000, K=33, method="mlaan")
        torchvision_count = count(torchvision.models.resnet101().parameters())
    assert count(model.inference_parameters()) == 466_906
    assert count(big.inference_parameters()) == torchvision_count
    aux = {id(p) for p in model.auxiliary_parameters()}
    inf = {id(p) for p in model.inference_parameters()}
    assert not aux & inf and aux | inf == {id(p) for p in model.parameters()}
    assert all(p.requires_grad for p in model.parameters())
    assert len(big.lams) == 31 and big.num_modules == 33  # s = 2: LAM_j for j = 1..31


def test_forward_is_backbone_plus_fc_and_touches_no_auxiliary_module():
    torch.manual_seed(0)
    plain = build_backbone("resnet20", 10).eval()
    model = twin("resnet20", dtype=torch.float32, K=4, method="dgl+mlaan").eval()
    x, _ = make_batch()
    called = []
    for part in (model.ind_heads, model.casc_heads, model.lams, model.shadow_bank):
        part.register_forward_pre_hook(lambda m, a: called.append(m))
        for sub in part.modules():
            sub.register_forward_pre_hook(lambda m, a: called.append(m))
    with torch.no_grad():
        out = model(x)
        assert out.shape == (3, 10)
        torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
    assert called == []


@pytest.mark.parametrize("arch,K", [("resnet18", 4), ("resnet50", 3)])
def test_imagenet_local_step_runs(arch, K):
    model = build_model(arch, num_classes=7, K=K, method="mlaan")
    assert len(model.lams) == K - 2
    x, y = make_batch(n=2, size=64, classes=7)
    out = model.local_step(x, y)
    assert out["logits"].shape == (2, 7) and len(out["module_losses"]) == K
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------ gradient isolation
ISOLATION_CASES = [
    ("e2e", 1, {}),
    ("dgl", 4, {}),
    ("infopro", 4, {"ixx_2": 1.0, "ixy_2": 0.25}),
    ("mlaan", 4, {}),
    ("dgl+mlaan", 4, {}),
    ("infopro+mlaan", 4, {"ixx_2": 1.0, "ixy_2": 0.25}),
    ("mlaan", 4, {"mlm": False}),
    ("mlaan", 4, {"lam": False}),
    ("dgl+mlaan", 2, {}),
]


def spec_windows(method, M, s):
    """(module j, first module its loss may reach) for every objective, from method.md §2."""
    if "mlaan" not in method:
        return [(j, j) for j in range(M)]
    return [(j, j - s + 1) for j in range(s - 1, M - 1)] + [(M - 1, max(0, M - s))]


@pytest.mark.parametrize("method,K,options", ISOLATION_CASES)
def test_gradient_isolation(method, K, options, monkeypatch):
    # One backward per objective term is the published schedule's structure; "once" is pinned to
    # it gradient for gradient in test_schedule.py.
    model = build_model("resnet20", K=K, method=method, schedule="straightforward", **options)
    M, s = model.num_modules, model.config["options"]["s"]
    owner = {}
    for i, m in enumerate(model.local_modules):
        owner.update({p: ("module", i) for p in m.parameters()})
    owner.update({p: ("fc", M - 1) for p in model.fc.parameters()})
    for kind, parts in (("ind", model.ind_heads), ("casc", model.casc_heads), ("lam", model.lams)):
        for j, part in parts.items():
            owner.update({p: (kind, int(j)) for p in part.parameters() if p.requires_grad})
    assert set(owner) == set(model.parameters())
    touched, per_backward = set(), []
    for p, tag in owner.items():
        p.register_hook(lambda g, tag=tag: touched.add(tag))
    real_backward = schedules.backward

    def recording_backward(objective, grad_scaler=None):
        touched.clear()
        real_backward(objective, grad_scaler)
        per_backward.append(set(touched))

    monkeypatch.setattr(schedules, "backward", recording_backward)
    x, y = make_batch()
    model.local_step(x, y)

    cascade, lam = "mlaan" in method, "mlaan" in method and options.get("lam", True)
    expected = []  # per backward call: the independent term of module j, then its window's cascaded term
    for j, first in spec_windows(method, M, s):
        last = j == M - 1
        expected.append({("module", j), ("fc", j) if last else ("ind", j)})
        if cascade:
            aux = {("fc", j)} if last else {("casc", j)} | ({("lam", j)} if lam else set())
            expected.append({("module", i) for i in range(first, j + 1)} | aux)
    assert len(per_backward) == len(expected)
    for got, want in zip(per_backward, expected):
        assert got == want, f"a backward reached {sorted(got)}, expected {sorted(want)}"
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), owner[p]
    for i, m in enumerate(model.local_modules):
        assert sum(p.grad.abs().sum() for p in m.parameters()) > 0, f"module {i} got only zero gradients"
    if model.shadow_bank is not None:
        assert all(p.grad is None for p in model.shadow_bank.parameters())


def test_forward_calls_per_module_follow_the_straightforward_schedule():
    model = build_model("resnet20", K=5, method="dgl+mlaan", schedule="straightforward")
    calls = [0] * model.num_modules
    for i, m in enumerate(model.local_modules):
        m.register_forward_pre_hook(lambda mod, args, i=i: calls.__setitem__(i, calls[i] + 1))
    model.local_step(*make_batch())
    windows = spec_windows("dgl+mlaan", 5, 3)
    assert calls == [1 + sum(first <= i <= j for j, first in windows) for i in range(5)]  # s+1 in the middle
    assert calls[2] == 4


# ------------------------------------------------------------------ MLAAN semantics
def reference_local_step(model, x, y, s, w_ind=0.001, w_casc=0.999):
    """method.md §2 written out: the independent stream, then window j = modules j-s+1..j on
    stopgrad(o_{j-s}) through LAM_j (first block + frozen shadow), one backward per window."""
    E, M = model.local_modules, model.num_modules

    def ce_linear(fc, features):
        return F.cross_entropy(fc(features.mean(dim=(2, 3))), y)

    def head(h, features):
        if isinstance(h, LinearAuxHead):
            return ce_linear(h.fc, features)
        return h(features, y, x) if isinstance(h, InfoProAuxHead) else h(features, y)

    def lam_forward(lam, z):
        out = lam.blocks[0](z) + lam.shadow(z)
        for block in lam.blocks[1:]:
            out = block(out)
        return out

    with torch.no_grad():
        o = [x]  # o[j + 1]: output of module j
        for module in E:
            o.append(module(o[-1]))
    for j in range(s - 1, M):
        first = max(0, j - s + 1)
        h = E[j](o[j])
        z = o[first]
        for i in range(first, j + 1):
            z = E[i](z)
        if j == M - 1:
            loss = w_ind * ce_linear(model.fc, h) + w_casc * ce_linear(model.fc, z)
        else:
            if model.use_lam:
                z = lam_forward(model.lams[str(j)], z)
            loss = w_ind * head(model.ind_heads[str(j)], h) + w_casc * head(model.casc_heads[str(j)], z)
        loss.backward()


@pytest.mark.parametrize("arch,K,method,options", [
    ("resnet20", 4, "mlaan", {}),
    ("resnet20", 5, "dgl+mlaan", {}),
    ("resnet32", 8, "mlaan", {}),
    ("resnet32", 4, "dgl+mlaan", {}),
    ("resnet20", 4, "infopro+mlaan", {}),
    ("resnet20", 4, "mlaan", {"lam": False}),
    ("resnet20", 3, "dgl+mlaan", {"mlm": False}),
])
def test_mlaan_step_matches_written_out_reference(arch, K, method, options):
    model = twin(arch, K=K, method=method, fused=False, **options)
    reference = twin(arch, K=K, method=method, fused=False, **options)
    assert len(model.casc_heads) >= 1 and len(model.lams) == (len(model.casc_heads) if model.use_lam else 0)
    x, y = make_batch(dtype=torch.float64)
    out = model.local_step(x, y)
    reference_local_step(reference, x, y, model.config["options"]["s"])
    assert_same_grads(trainable_grads(model), trainable_grads(reference), rtol=1e-10, atol=1e-13)
    assert out["loss"].shape == () and not out["loss"].requires_grad
    assert torch.allclose(out["loss"], torch.stack(out["module_losses"]).sum())


def test_logits_are_the_final_classifier_on_the_backbone():
    model = twin("resnet20", K=3, method="mlaan")
    x, y = make_batch(dtype=torch.float64)
    out = model.local_step(x, y)
    with torch.no_grad():
        want = model(x)  # train mode: batch statistics, same as inside the step
    torch.testing.assert_close(out["logits"], want, rtol=1e-10, atol=1e-12)
    assert out["module_losses"][0] == 0 and out["module_losses"][1] > 0  # s = 2: module 0 has no own loss


@pytest.mark.parametrize("method", MLAAN_METHODS + ("dgl", "infopro", "e2e"))
def test_fused_and_unfused_give_the_same_gradients(method):
    K = 1 if method == "e2e" else 4
    x, y = make_batch(dtype=torch.float64)
    grads = []
    for fused in (True, False):
        model = twin("resnet20", K=K, method=method, fused=fused)
        model.local_step(x, y)
        grads.append(trainable_grads(model))
    assert_same_grads(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_grad_scaler_scales_every_backward():
    class Scaler:
        def scale(self, loss):
            return loss * 8.0

    x, y = make_batch(dtype=torch.float64)
    plain, scaled = twin("resnet20", K=4, method="dgl+mlaan"), twin("resnet20", K=4, method="dgl+mlaan")
    plain.local_step(x, y)
    scaled.local_step(x, y, grad_scaler=Scaler())
    want = {n: None if g is None else 8.0 * g for n, g in trainable_grads(plain).items()}
    assert_same_grads(trainable_grads(scaled), want, rtol=1e-12, atol=1e-15)


def test_compile_modules_keeps_gradients():
    x, y = make_batch()
    eager, compiled = twin("resnet20", K=2, method="dgl", dtype=torch.float32), \
        twin("resnet20", K=2, method="dgl", dtype=torch.float32)
    compiled.compile_modules(backend="eager")
    eager.local_step(x, y)
    compiled.local_step(x, y)
    assert_all_close_scaled(trainable_grads(compiled), trainable_grads(eager))


# ------------------------------------------------------------------ LAM and EMA shadows
def test_lam_adds_the_frozen_shadow_to_its_first_block():
    from mlaan_fast.models.blocks import BasicBlock
    from mlaan_fast.nn import EMAShadow

    live = [BasicBlock(8, 16, stride=2), BasicBlock(16, 16)]
    bank = EMAShadow([live[0]], decay=0.9)
    lam = LAM([BasicBlock(8, 16, stride=2), BasicBlock(16, 16)], shadow_bank=bank, shadow_index=0)
    z = torch.randn(2, 8, 6, 6, requires_grad=True)
    out = lam(z)
    torch.testing.assert_close(out, lam.blocks[1](lam.blocks[0](z) + bank.shadows[0](z)))
    out.sum().backward()
    assert z.grad is not None and all(p.grad is None for p in bank.parameters())
    assert all(p.grad is not None for p in lam.parameters())
    assert not any(p is q for p in lam.parameters() for q in bank.parameters())  # the shadow is not owned
    assert "shadow" not in "".join(lam.state_dict())


def test_shadows_are_shared_one_per_live_block_in_one_buffer():
    model = build_model("resnet32", K=16, method="mlaan")  # LAMs for j = 1..13 (s = 2)
    bank = model.shadow_bank
    assert sorted(int(j) for j in model.lams) == list(range(1, 14))
    firsts = {model.lam_blocks[j][0] for j in range(1, 14)}
    assert firsts == {(2, 0), (3, 0), (3, 1), (3, 2), (3, 3), (3, 4)}
    assert len(bank.shadows) == 6 and sorted(model.shadow_positions) == sorted(firsts)
    for j, lam in model.lams.items():
        assert lam.shadow is bank.shadows[model.shadow_positions.index(model.lam_blocks[int(j)][0])]
    flat_storage = bank.flat.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == flat_storage for p in bank.parameters())
    assert count(bank.parameters()) == bank.flat.numel()
    unshared = build_model("resnet32", K=16, method="mlaan", share_shadows=False)
    assert len(unshared.shadow_bank.shadows) == 13


@pytest.mark.parametrize("share", [True, False])
def test_update_shadows_is_the_ema_of_the_live_blocks(share):
    m = 0.9
    model = build_model("resnet20", K=4, method="mlaan", ema_decay=m, share_shadows=share)
    model.local_step(*make_batch())
    with torch.no_grad():  # stand-in for an optimizer step
        for p in model.inference_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    bank = model.shadow_bank
    old = [[p.clone() for p in s.parameters()] for s in bank.shadows]
    old_buffers = [[b.clone() for b in s.buffers()] for s in bank.shadows]
    model.update_shadows()
    positions = model.shadow_positions if share else [model.lam_blocks[int(j)][0] for j in model.lams]
    for shadow, before, buffers, position in zip(bank.shadows, old, old_buffers, positions):
        live = model.live_block(position)
        for s, o, q in zip(shadow.parameters(), before, live.parameters()):
            torch.testing.assert_close(s, m * o + (1 - m) * q, rtol=1e-6, atol=1e-7)
        for b, ob in zip(shadow.buffers(), buffers):
            assert torch.equal(b, ob)  # BN statistics are not averaged


def test_shared_shadows_are_exact():
    """Two steps with an SGD update and an EMA update between them: shared == one shadow per LAM."""
    x, y = make_batch(dtype=torch.float64)
    runs = []
    for share in (True, False):
        model = twin("resnet20", K=4, method="mlaan", share_shadows=share, ema_decay=0.5)
        model.local_step(x, y)
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.5 * p.grad)
                p.grad = None
        model.update_shadows()
        model.local_step(x, y)
        runs.append(trainable_grads(model))
    assert_same_grads(runs[0], runs[1], rtol=1e-10, atol=1e-13)


def test_last_only_updates_only_the_last_lams_shadow():
    model = build_model("resnet32", K=16, method="mlaan", shadow_update="last_only")
    assert len(model.shadow_bank.shadows) == 1 and model.shadow_positions == [(3, 4)]
    assert model.lams["13"].shadow is model.shadow_bank.shadows[0]
    assert len(model.frozen_shadow_bank.shadows) == 5
    with torch.no_grad():
        for p in model.inference_parameters():
            p.add_(1.0)
    frozen, tracked = model.frozen_shadow_bank.flat.clone(), model.shadow_bank.flat.clone()
    model.update_shadows()
    assert torch.equal(model.frozen_shadow_bank.flat, frozen)
    assert not torch.equal(model.shadow_bank.flat, tracked)


def test_state_dict_round_trip():
    a = twin("resnet20", seed=0, K=4, method="mlaan", dtype=torch.float32)
    b = twin("resnet20", seed=1, K=4, method="mlaan", dtype=torch.float32)
    a.update_shadows()
    b.load_state_dict(a.state_dict())
    assert b.config == a.config
    x, _ = make_batch()
    torch.testing.assert_close(b.eval()(x), a.eval()(x))
    assert torch.equal(b.shadow_bank.flat, a.shadow_bank.flat)
    flat = b.shadow_bank.flat.untyped_storage().data_ptr()
    assert all(lam.shadow.conv1.weight.untyped_storage().data_ptr() == flat for lam in b.lams.values())


# ------------------------------------------------------------------ heads
def test_dgl_head_layout():
    head = DGLAuxHead(32, 10)
    convs = [m for m in head.convs if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (32, 128, (1, 1)), (128, 128, (1, 1)), (128, 128, (1, 1))]
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)] + [head.fc]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (128, 512), (512, 512), (512, 512), (512, 10)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.mlp) == 3


def test_infopro_head_loss_is_weighted_bce_plus_ce():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    head = InfoProAuxHead(16, 10, image_mean=mean, image_std=std, ixx=2.0, ixy=0.5).double()
    feats = torch.randn(3, 16, 8, 8, dtype=torch.float64)
    pixels = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    image = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    target = torch.tensor([1, 4, 9])
    conv = head.classifier[0]
    assert conv.stride == (2, 2) and conv.out_channels == 32
    logits = head.fc(F.relu(head.hidden(head.classifier(feats).mean(dim=(2, 3)))))
    upsampled = F.interpolate(feats, size=(32, 32), mode="bilinear", align_corners=True)
    recon = torch.sigmoid(head.decoder(upsampled))
    want = 2.0 * F.binary_cross_entropy(recon, pixels) + 0.5 * F.cross_entropy(logits, target)
    torch.testing.assert_close(head(feats, target, image), want, rtol=1e-10, atol=1e-12)
    assert InfoProAuxHead(64, 10, image_mean=mean, image_std=std, ixx=1, ixy=1).classifier[0].stride == (1, 1)


def test_infopro_weights_follow_the_module_index():
    model = build_model("resnet20", K=5, method="infopro", ixx_1=5.0, ixy_1=0.5, ixx_2=1.0, ixy_2=0.1)
    got = [(model.ind_heads[str(j)].ixx, model.ind_heads[str(j)].ixy) for j in range(4)]
    want = [(5 + (1 - 5) * r, 0.5 + (0.1 - 0.5) * r) for r in (0, 1 / 3, 2 / 3, 1)]
    for g, w in zip(got, want):
        assert g == pytest.approx(w)


# ------------------------------------------------------------------ memory
def test_mlaan_saves_far_fewer_activations_than_e2e():
    x, y = make_batch(n=8)
    peaks = {}
    for method, K in (("e2e", 1), ("mlaan", 16)):
        model = build_model("resnet32", K=K, method=method)
        with ActivationMeter(exclude=model) as meter:
            model.local_step(x, y)
        peaks[method] = meter.peak_bytes
        assert meter.current_bytes == 0  # every window's graph was freed
    ratio = peaks["mlaan"] / peaks["e2e"]
    print(f"saved-activation peak, ResNet-32 batch 8: mlaan K=16 {peaks['mlaan']} B, e2e {peaks['e2e']} B, "
          f"ratio {ratio:.3f}")
    assert ratio < 0.6


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(arch="resnet32", K=17, method="mlaan"), ValueError, r"K=17 is impossible.*1\.\.15.*\[8, 16\]"),
    (dict(arch="resnet32", K=0, method="dgl"), ValueError, "1..15"),
    (dict(arch="resnet32", K=4, method="e2e"), ValueError, "e2e"),
    (dict(arch="resnet32", method="mlaan"), ValueError, "K is required"),
    (dict(arch="resnet33", K=4, method="mlaan"), ValueError, "arch"),
    (dict(arch="resnet32", K=4, method="mlan"), ValueError, "method"),
    (dict(arch="resnet32", K=4, method="mlaan", bogus=1), TypeError, "bogus"),
    (dict(arch="resnet32", K=4, method="mlaan", s=0), ValueError, "s: must"),
    (dict(arch="resnet32", K=4, method="mlaan", mlm=False, s=2), ValueError, "mlm=False"),
    (dict(arch="resnet32", K=4, method="mlaan", shadow_update="first"), ValueError, "shadow_update"),
    (dict(arch="resnet32", K=4, method="mlaan", schedule="sometimes"), ValueError, "schedule"),
    (dict(arch="resnet32", K=4, method="mlaan", ema_decay=1.5), ValueError, "ema_decay"),
])
def test_bad_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_model(**kwargs)


def test_config_records_the_resolved_settings():
    model = build_model("resnet32", K=16, method="dgl+mlaan")
    cfg = model.config
    assert (cfg["arch"], cfg["method"], cfg["K"], cfg["num_classes"], cfg["num_modules"]) == \
        ("resnet32", "dgl+mlaan", 16, 10, 15)
    opts = cfg["options"]
    assert (opts["s"], opts["w_ind"], opts["w_casc"], opts["ema_decay"], opts["lam_depth"]) == (
        3, 0.001, 0.999, 0.995, 4)
    assert set(ARCHS) >= {"resnet20", "resnet32", "resnet56", "resnet110", "resnet34", "resnet101",
                          "resnet152"}


@pytest.mark.parametrize("method", ["mlaan", "dgl+mlaan", "infopro+mlaan"])
def test_target_checks_raise_or_give_nan(method):
    """Checked (default): a label out of range raises. Unchecked (labels validated on the host):
    no error and no silent number, the losses that read it are NaN."""
    model = build_model("resnet20", K=3, method=method)
    x, y = make_batch(n=4)
    y[2] = 10
    with pytest.raises(ValueError, match="outside the class range"):
        model.local_step(x, y)
    with target_checks(False):
        out = model.local_step(x, y)
    assert torch.isnan(out["loss"])
