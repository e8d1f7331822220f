"""The module splits and LAM lists of every preset equal method.md §3; the even split and LAM rule
elsewhere."""
import itertools

import pytest

from mlaan_fast.models import ARCHS, PRESETS, lam_lists, split
from mlaan_fast.models.plan import lam_rule


def every_block(layers):
    return [(s + 1, b) for s, n in enumerate(layers) for b in range(n)]


# ---- hand-copied from method.md §3 ------------------------------------------------------------
R32_A = [(2, 0), (3, 0), (3, 2), (3, 4)]
R32_B = [(2, 0), (3, 0), (3, 3), (3, 4)]
R32_C = [(3, 0), (3, 2), (3, 3), (3, 4)]
R32_K16_LAMS = ([R32_A, R32_A, R32_B, R32_A, R32_B] + [R32_C] * 5
                + [[(3, 1), (3, 2), (3, 4)], [(3, 2), (3, 3), (3, 4)], [(3, 3), (3, 4)], [(3, 4)]])
R32_K8_ENDS = [(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2), (3, 4)]
R32_K8_LAMS = [R32_A, R32_A, R32_B, R32_C, R32_C, [(3, 2), (3, 3), (3, 4)], [(3, 3), (3, 4)]]

R110_K55_LAMS = ([[(2, 0), (3, 0), (3, 2), (3, 17)]] * 18
                 + [[(3, 0), (3, 2), (3, 3), (3, 17)]] * 17 + [[(3, 0), (3, 3), (3, 4), (3, 17)]]
                 + [[(3, 8), (3, 17)]] * 7 + [[(3, 14), (3, 17)]] * 4 + [[(3, 15), (3, 17)]] * 2
                 + [[(3, 16), (3, 17)]] * 3 + [[(3, 17)]])
R110_K32_ENDS = [(1, 1), (1, 2), (1, 4), (1, 5), (1, 7), (1, 9), (1, 11), (1, 13), (1, 14), (1, 16),
                 (1, 17), (2, 1), (2, 2), (2, 4), (2, 5), (2, 7), (2, 9), (2, 11), (2, 13), (2, 14),
                 (2, 16), (2, 17), (3, 1), (3, 3), (3, 4), (3, 6), (3, 7), (3, 9), (3, 11), (3, 13),
                 (3, 15), (3, 17)]
R110_K32_LAMS = ([[(2, 0), (3, 0), (3, 2), (3, 17)]] * 11 + [[(3, 0), (3, 2), (3, 3), (3, 17)]] * 10
                 + [[(3, 0), (3, 3), (3, 4), (3, 17)]] + [[(3, 8), (3, 17)]] * 4 + [[(3, 14), (3, 17)]] * 2
                 + [[(3, 15), (3, 17)]] + [[(3, 16), (3, 17)]] + [[(3, 17)]])

EXPECTED = {
    # (arch, K): (module ends, number of modules, LAM lists or None for the rule)
    ("resnet32", 16): (every_block((5, 5, 5)), 15, R32_K16_LAMS),
    ("resnet32", 8): (R32_K8_ENDS, 8, R32_K8_LAMS),
    ("resnet110", 55): (every_block((18, 18, 18)), 54, R110_K55_LAMS),
    ("resnet110", 32): (R110_K32_ENDS, 32, R110_K32_LAMS),
    ("resnet34", 16): (every_block((3, 4, 6, 3)), 16, None),
    ("resnet101", 33): (every_block((3, 4, 23, 3)), 33, None),
}


def test_presets_are_exactly_the_expected_settings():
    assert set(PRESETS) == set(EXPECTED)


@pytest.mark.parametrize("arch,K", sorted(EXPECTED))
def test_preset_split_and_lams(arch, K):
    ends, num_modules, lams = EXPECTED[(arch, K)]
    plan = split(arch, K)
    assert plan.preset
    assert list(plan.module_ends) == ends
    assert plan.num_modules == num_modules
    got = [list(lam) for lam in lam_lists(arch, K, plan.module_ends)]
    assert len(got) == num_modules - 1
    if lams is not None:
        for j, (g, e) in enumerate(zip(got, lams)):
            assert g == e, f"{arch} K={K} LAM_{j}: got {g}, method.md says {e}"
        assert got == lams
    _check_lams_well_formed(ARCHS[arch].layers, plan.module_ends, got, rule=lams is None)


def _check_lams_well_formed(layers, ends, lams, rule, depth=4):
    """Every LAM is strictly after its module, increasing, keeps each later stage transition, ends with
    the final block (so widths and resolutions line up)."""
    final = (len(layers), layers[-1] - 1)
    for j, lam in enumerate(lams):
        end = ends[j]
        assert lam == sorted(set(lam)), (j, lam)
        assert all(p > end for p in lam), (j, end, lam)
        assert lam[-1] == final
        for stage in range(end[0] + 1, len(layers) + 1):
            assert (stage, 0) in lam, (j, end, lam)
        if rule:
            required = {(t, 0) for t in range(end[0] + 1, len(layers) + 1)} | {final}
            candidates = required | {p for p in every_block(layers) if p > end and p[0] == len(layers)}
            assert len(lam) == max(len(required), min(depth, len(candidates))), (j, end, lam)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_even_split_covers_every_block(arch):
    layers = ARCHS[arch].layers
    n = sum(layers)
    for K in sorted({1, 2, 3, min(7, n), n // 2, n - 1, n}):
        if (arch, K) in PRESETS:
            continue
        plan = split(arch, K)
        assert not plan.preset and plan.num_modules == K
        flat = every_block(layers)
        idx = [flat.index(e) for e in plan.module_ends]
        sizes = [idx[0] + 1] + [b - a for a, b in itertools.pairwise(idx)]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
        assert plan.module_ends[-1] == flat[-1]


def test_k_maps_to_module_count():
    # Preset labels: CIFAR one-block-per-module presets count the stem (K = blocks + 1).
    assert split("resnet32", 16).num_modules == 15
    assert split("resnet110", 55).num_modules == 54
    assert split("resnet32", 15).num_modules == 15
    assert split("resnet32", 15).module_ends == split("resnet32", 16).module_ends
    assert split("resnet34", 16).num_modules == 16
    assert split("resnet101", 33).num_modules == 33
    assert split("resnet20", 5).num_modules == 5


@pytest.mark.parametrize("arch,K", [("resnet32", 0), ("resnet32", 17), ("resnet32", -3), ("resnet110", 56),
                                    ("resnet34", 17), ("resnet20", 10)])
def test_impossible_k_is_a_clear_error(arch, K):
    with pytest.raises(ValueError) as err:
        split(arch, K)
    text = str(err.value)
    n = ARCHS[arch].num_blocks
    assert f"K={K}" in text and arch in text and f"1..{n}" in text
    for (a, k) in PRESETS:
        if a == arch:
            assert str(k) in text


def test_k_must_be_an_int():
    with pytest.raises(TypeError, match="K"):
        split("resnet32", 8.0)
    with pytest.raises(ValueError, match="unknown 'resnet33'"):
        split("resnet33", 4)


def test_lam_rule_for_non_presets():
    # ResNet-20 K=3 (ends [1,2] [2,2] [3,2]) at depth 4.
    plan = split("resnet20", 3)
    assert lam_lists("resnet20", 3, plan.module_ends) == (((2, 0), (3, 0), (3, 1), (3, 2)),
                                                          ((3, 0), (3, 1), (3, 2)))
    # Depth shrinks toward the output and never drops a stage transition.
    assert lam_rule((5, 5, 5), (3, 2), 4) == ((3, 3), (3, 4))
    assert lam_rule((5, 5, 5), (1, 0), 1) == ((2, 0), (3, 0), (3, 4))
    assert lam_rule((3, 4, 23, 3), (1, 0), 4) == ((2, 0), (3, 0), (4, 0), (4, 2))
    with pytest.raises(ValueError, match="last module"):
        lam_rule((5, 5, 5), (3, 4), 4)
    with pytest.raises(ValueError, match="lam_depth"):
        lam_lists("resnet20", 3, plan.module_ends, depth=0)


@pytest.mark.parametrize("arch,K", [("resnet20", 4), ("resnet56", 9), ("resnet110", 20), ("resnet34", 16),
                                    ("resnet101", 33), ("resnet152", 50), ("resnet18", 3)])
def test_rule_lams_are_well_formed(arch, K):
    plan = split(arch, K)
    lams = [list(lam) for lam in lam_lists(arch, K, plan.module_ends)]
    assert len(lams) == plan.num_modules - 1
    _check_lams_well_formed(ARCHS[arch].layers, plan.module_ends, lams, rule=True)


def test_other_depth_on_a_preset_uses_the_rule():
    plan = split("resnet32", 16)
    shallow = lam_lists("resnet32", 16, plan.module_ends, depth=2)
    assert shallow[0] == ((2, 0), (3, 0), (3, 4)) and shallow[5] == ((3, 0), (3, 4))
    assert shallow[13] == ((3, 4),)
