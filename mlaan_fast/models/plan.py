"""From (arch, K) to module boundaries and LAM block lists: the presets, else an even split and the
LAM rule."""
from __future__ import annotations

from dataclasses import dataclass

from mlaan_fast.models.archs import get_arch
from mlaan_fast.models.presets import PRESET_LAM_DEPTH, PRESETS, Position


@dataclass(frozen=True)
class Split:
    """``module_ends[j]``: last block of module j (module 0 also holds the stem); ``preset``: from PRESETS."""

    module_ends: tuple[Position, ...]
    preset: bool

    @property
    def num_modules(self) -> int:
        return len(self.module_ends)


def valid_ks(arch: str) -> str:
    """Human-readable list of the K accepted for ``arch``."""
    n = get_arch(arch).num_blocks
    presets = sorted(k for a, k in PRESETS if a == arch)
    text = f"1..{n} (an even split of its {n} blocks)"
    return text + (f" or the presets {presets}" if presets else "")


def split(arch: str, K: int) -> Split:
    """The preset split of (arch, K) if there is one, else K modules of as equal a size as possible."""
    spec = get_arch(arch)
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"K: expected an int, got {type(K).__name__}")
    if (arch, K) in PRESETS:
        return Split(PRESETS[(arch, K)].module_ends, preset=True)
    if not 1 <= K <= spec.num_blocks:
        raise ValueError(f"K={K} is impossible for {arch}: valid K are {valid_ks(arch)}")
    positions = [(s + 1, b) for s, n in enumerate(spec.layers) for b in range(n)]
    # Module j ends after block floor((j+1)*n/K) - 1: sizes differ by at most one block.
    ends = tuple(positions[(j + 1) * spec.num_blocks // K - 1] for j in range(K))
    return Split(ends, preset=False)


def lam_rule(layers: tuple[int, ...], module_end: Position, depth: int) -> tuple[Position, ...]:
    """LAM after a module ending at ``module_end``: every later stage's first block, then blocks of the
    last stage spread evenly over those left, ending with the final block; ``depth`` blocks at most,
    fewer near the output, never fewer than the stage transitions (the shapes must line up)."""
    last_stage, last_block = len(layers), layers[-1] - 1
    stage, block = module_end
    if module_end == (last_stage, last_block):
        raise ValueError("lam_rule: the last module has no LAM")
    required = [(t, 0) for t in range(stage + 1, last_stage + 1)]
    required = sorted(set(required) | {(last_stage, last_block)})
    first_free = block + 1 if stage == last_stage else 0
    optional = [(last_stage, b) for b in range(first_free, last_block) if (last_stage, b) not in required]
    fill = max(0, min(depth - len(required), len(optional)))
    picked = [optional[(i + 1) * len(optional) // (fill + 1)] for i in range(fill)]
    return tuple(sorted(required + picked))


def lam_lists(arch: str, K: int, module_ends: tuple[Position, ...], depth: int = PRESET_LAM_DEPTH
              ) -> tuple[tuple[Position, ...], ...]:
    """LAM_j block lists for j = 0 .. M-2: the preset's when it has them (at its depth), else the rule."""
    if depth < 1:
        raise ValueError(f"lam_depth must be >= 1, got {depth}")
    preset = PRESETS.get((arch, K))
    if preset is not None and preset.lams is not None and depth == PRESET_LAM_DEPTH:
        return preset.lams
    layers = get_arch(arch).layers
    return tuple(lam_rule(layers, end, depth) for end in module_ends[:-1])
