"""The paper's module splits and LAM block lists, as data (method.md §3).

Positions are (stage, block): stages count from 1, blocks from 0. A split lists the last block of
each module; the stem always rides with module 0. ``lams[j]`` lists the blocks LAM_j copies, for
j = 0 .. M-2 (module M-1 is the last one and trains with the real classifier).

K is the paper's label for a setting. For the CIFAR "one block per module" presets it counts the
stem as a module of its own (ResNet-32 K=16 -> 15 modules, ResNet-110 K=55 -> 54 modules); for
every other preset, and for every K that is not a preset, K is the number of modules.
"""
from __future__ import annotations

from dataclasses import dataclass

Position = tuple[int, int]


@dataclass(frozen=True)
class Preset:
    """One paper setting: the last block of each module, and LAM lists (None: use the LAM rule)."""

    module_ends: tuple[Position, ...]
    lams: tuple[tuple[Position, ...], ...] | None


def _each_block(layers: tuple[int, ...]) -> tuple[Position, ...]:
    return tuple((s + 1, b) for s, n in enumerate(layers) for b in range(n))


def _runs(*runs: tuple[int, tuple[Position, ...]]) -> tuple[tuple[Position, ...], ...]:
    """Run-length form: (count, blocks) repeated count times."""
    return tuple(blocks for count, blocks in runs for _ in range(count))


# ResNet-32: LAM lists shared by several modules.
_R32_A = ((2, 0), (3, 0), (3, 2), (3, 4))
_R32_B = ((2, 0), (3, 0), (3, 3), (3, 4))
_R32_C = ((3, 0), (3, 2), (3, 3), (3, 4))

# ResNet-110: the stage-1 and stage-2 lists.
_R110_S1 = ((2, 0), (3, 0), (3, 2), (3, 17))
_R110_S2 = ((3, 0), (3, 2), (3, 3), (3, 17))
_R110_S2_LAST = ((3, 0), (3, 3), (3, 4), (3, 17))

PRESETS: dict[tuple[str, int], Preset] = {
    ("resnet32", 16): Preset(
        module_ends=_each_block((5, 5, 5)),
        lams=(_R32_A, _R32_A, _R32_B, _R32_A, _R32_B, _R32_C, _R32_C, _R32_C, _R32_C, _R32_C,
              ((3, 1), (3, 2), (3, 4)), ((3, 2), (3, 3), (3, 4)), ((3, 3), (3, 4)), ((3, 4),)),
    ),
    ("resnet32", 8): Preset(
        module_ends=((1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2), (3, 4)),
        lams=(_R32_A, _R32_A, _R32_B, _R32_C, _R32_C, ((3, 2), (3, 3), (3, 4)), ((3, 3), (3, 4))),
    ),
    ("resnet110", 55): Preset(
        module_ends=_each_block((18, 18, 18)),
        lams=_runs((18, _R110_S1), (17, _R110_S2), (1, _R110_S2_LAST),
                   (7, ((3, 8), (3, 17))), (4, ((3, 14), (3, 17))), (2, ((3, 15), (3, 17))),
                   (3, ((3, 16), (3, 17))), (1, ((3, 17),))),
    ),
    ("resnet110", 32): Preset(
        module_ends=((1, 1), (1, 2), (1, 4), (1, 5), (1, 7), (1, 9), (1, 11), (1, 13), (1, 14), (1, 16),
                     (1, 17), (2, 1), (2, 2), (2, 4), (2, 5), (2, 7), (2, 9), (2, 11), (2, 13), (2, 14),
                     (2, 16), (2, 17), (3, 1), (3, 3), (3, 4), (3, 6), (3, 7), (3, 9), (3, 11), (3, 13),
                     (3, 15), (3, 17)),
        lams=_runs((11, _R110_S1), (10, _R110_S2), (1, _R110_S2_LAST),
                   (4, ((3, 8), (3, 17))), (2, ((3, 14), (3, 17))), (1, ((3, 15), (3, 17))),
                   (1, ((3, 16), (3, 17))), (1, ((3, 17),))),
    ),
    # ImageNet settings of the paper: one block per module (the stem rides with the first block,
    # so K = number of blocks = number of modules); their LAM lists come from the LAM rule.
    ("resnet34", 16): Preset(module_ends=_each_block((3, 4, 6, 3)), lams=None),
    ("resnet101", 33): Preset(module_ends=_each_block((3, 4, 23, 3)), lams=None),
}

# The LAM depth the preset lists were made for; another lam_depth switches to the LAM rule.
PRESET_LAM_DEPTH = 4
