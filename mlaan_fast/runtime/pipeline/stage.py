"""One pipeline stage's share of a LocalModel: what it holds, what crosses its borders, and the
model restricted to it (every other part freed), plus the single-model state gathered from stages.

Every rank builds the whole model from the same seed (or loads the same checkpoint), then keeps
its stage: modules ``first..last``, the heads and LAMs of the windows that end there (the final
classifier on the last stage) and the EMA shadows those LAMs read. A shadow whose live block sits
on another stage follows a *boundary copy* of that block, whose weights the owner sends after
every optimizer step; that copy and the shadows are all a stage duplicates.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from mlaan_fast.models.local_model import lam_shadow_bank
from mlaan_fast.runtime.pipeline.partition import Partition

BANKS = ("shadow_bank", "frozen_shadow_bank")  # LocalModel attributes holding EMA shadows


@dataclass(frozen=True)
class ShadowRef:
    """Shadow ``index`` of the model's bank ``bank``, which follows the live block at ``position``."""

    bank: str
    index: int
    position: tuple[int, int]


@dataclass(frozen=True)
class StageLayout:
    """Stage ``index`` of ``num_stages``: its modules and windows and what crosses its borders.

    ``streams_out``: the (window, start) gradient streams it hands to the previous stage at
    o_{first-1}, in the order they are sent (window order); ``streams_in``: those the next stage
    hands to it at o_last. ``shadows``: the shadows its LAMs read, per bank. ``live_in[q]``: live
    blocks of stage q whose weights it receives; ``live_out[q]``: its own blocks stage q needs."""

    index: int
    num_stages: int
    first: int
    last: int
    windows: tuple[int, ...]
    streams_out: tuple[tuple[int, int], ...]
    streams_in: tuple[tuple[int, int], ...]
    shadows: tuple[ShadowRef, ...]
    live_in: dict
    live_out: dict

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


def _streams(model) -> list[tuple[int, int]]:
    """Every (window, start) gradient stream of the model, in the order the schedule runs them."""
    out = []
    for w in model.windows:
        if w.start is not None:
            out.append((w.index, w.start))
        if w.ind_weight is not None:
            out.append((w.index, w.index))
    return out


def _shadow_ref(model, j: int) -> ShadowRef | None:
    """The shadow LAM_j reads (None without one)."""
    lam = model.lams[str(j)] if str(j) in model.lams else None
    if lam is None or lam.shadow is None:
        return None
    bank = next(name for name in BANKS if getattr(model, name) is lam._bank[0])
    return ShadowRef(bank, lam.shadow_index, model.lam_blocks[j][0])


def _shadow_refs(model, windows) -> list[ShadowRef]:
    refs = []
    for j in windows:
        ref = _shadow_ref(model, j)
        if ref is not None and ref not in refs:
            refs.append(ref)
    return refs


def layouts(model, partition: Partition) -> list[StageLayout]:
    """The layout of every stage (identical on every rank: it depends on the model's structure only)."""
    streams = _streams(model)
    windows = {w.index for w in model.windows}
    shadows = [_shadow_refs(model, [j for j in sorted(windows) if a <= j <= b]) for a, b in partition.ranges]
    # Only tracked shadows follow their live block; the frozen bank ("last_only") never moves.
    needs = [{r.position for r in refs if r.bank == "shadow_bank"} for refs in shadows]
    out = []
    for p, (a, b) in enumerate(partition.ranges):
        live_in, live_out = {}, {}
        for q in range(partition.num_stages):
            if q == p:
                continue
            theirs = sorted(pos for pos in needs[p] if partition.stage_of(model.module_of(pos)) == q)
            mine = sorted(pos for pos in needs[q] if partition.stage_of(model.module_of(pos)) == p)
            if theirs:
                live_in[q] = tuple(theirs)
            if mine:
                live_out[q] = tuple(mine)
        out.append(StageLayout(
            index=p, num_stages=partition.num_stages, first=a, last=b,
            windows=tuple(j for j in sorted(windows) if a <= j <= b),
            streams_out=tuple((j, s) for j, s in streams if j >= a and s < a),
            streams_in=tuple((j, s) for j, s in streams if j > b and s <= b),
            shadows=tuple(shadows[p]), live_in=live_in, live_out=live_out))
    return out


class StageModel:
    """A LocalModel restricted, in place, to one stage (see the module docstring).

    Parts of other stages move to the meta device with gradients off, so ``model.parameters()``
    is this stage's trainable parameters and the shared schedule code runs unchanged on the
    modules in range. ``boundary[position]`` are the frozen copies of other stages' live blocks."""

    def __init__(self, model, layout: StageLayout, device: torch.device):
        self.model, self.layout = model, layout
        self.all_parameter_names = [n for n, p in model.named_parameters() if p.requires_grad]
        owned_positions = {pos for pos in model._live_blocks
                           if layout.first <= model.module_of(pos) <= layout.last}
        self.boundary = {pos: _frozen_copy(model.live_block(pos)) for refs in layout.live_in.values()
                         for pos in refs}
        lam_refs = {j: _shadow_ref(model, j) for j in layout.windows}
        banks = self._stage_banks(owned_positions)
        for m, module in enumerate(model.local_modules):
            if not layout.first <= m <= layout.last:
                _free(module)
        held = set(layout.windows)
        for group in (model.ind_heads, model.casc_heads, model.lams):
            for key, module in group.items():
                if int(key) not in held:
                    _free(module)
        if not layout.is_last:
            _free(model.fc)
        for name in BANKS:
            if getattr(model, name) is not None:
                setattr(model, name, banks.get(name))
        for j, ref in lam_refs.items():
            if ref is not None:
                model.lams[str(j)]._bank[0] = banks[ref.bank]
                model.lams[str(j)].shadow_index = self._bank_slot[ref]
        for module in self.held_modules() + list(self.boundary.values()):
            module.to(device)

    def held_modules(self) -> list[nn.Module]:
        """The model's parts this stage holds: modules, windows' heads and LAMs, classifier, shadow banks."""
        model, layout = self.model, self.layout
        held = [model.local_modules[m] for m in range(layout.first, layout.last + 1)]
        held += [m for j in layout.windows for m in model.window_modules(j)]
        return held + [getattr(model, name) for name in BANKS if getattr(model, name) is not None]

    def _stage_banks(self, owned_positions) -> dict:
        """New EMA banks holding only this stage's shadows, following owned blocks or boundary copies."""
        model, banks, self._bank_slot = self.model, {}, {}
        for name in BANKS:
            refs = [r for r in self.layout.shadows if r.bank == name]
            old = getattr(model, name)
            if not refs or old is None:
                continue
            live = [model.live_block(r.position) if r.position in owned_positions or name != "shadow_bank"
                    else self.boundary[r.position] for r in refs]
            bank = lam_shadow_bank(live, old.decay).to(dtype=old.flat.dtype)
            for k, r in enumerate(refs):
                bank.shadows[k].load_state_dict(old.shadows[r.index].state_dict())
                self._bank_slot[r] = k
            banks[name] = bank
        return banks

    def parameters(self) -> list[nn.Parameter]:
        """This stage's trainable parameters, in the whole model's order."""
        return list(self.model.parameters())

    def owned_state(self) -> dict[str, torch.Tensor]:
        """This stage's part of the whole model's state dict, on the CPU (shadows under their whole-model
        names; the flat shadow buffers are left out: the shadows' entries rebuild them)."""
        out = {}
        for name, t in self.model.state_dict().items():
            if t.is_meta or name.split(".")[0] in BANKS:
                continue
            out[name] = t.detach().cpu()
        for ref in self.layout.shadows:
            for key, t in self.shadow(ref).state_dict().items():
                out[f"{ref.bank}.shadows.{ref.index}.{key}"] = t.detach().cpu()
        return out

    def parameter_names(self) -> list[str]:
        """Names (whole-model) of :meth:`parameters`, in order."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def shadow(self, ref: ShadowRef) -> nn.Module:
        """This stage's copy of the shadow ``ref`` (one it holds)."""
        return getattr(self.model, ref.bank).shadows[self._bank_slot[ref]]

    def boundary_parameters(self, position) -> list[torch.Tensor]:
        """The parameters of a live block this stage owns, or of its boundary copy of another stage's."""
        block = self.boundary.get(position) or self.model.live_block(position)
        return list(block.parameters())


def _frozen_copy(block: nn.Module) -> nn.Module:
    copy_ = copy.deepcopy(block)
    copy_.requires_grad_(False)
    return copy_


def _free(module: nn.Module) -> None:
    module.to("meta")
    module.requires_grad_(False)


def whole_model_state(template, stage_states: list[dict]) -> dict:
    """The single-process state dict of ``template`` (a whole LocalModel on the CPU) filled from every
    stage's :meth:`StageModel.owned_state` (in stage order); a shadow held by several stages is taken from
    the last of them, the nearest to its live block (all copies are equal in sync mode)."""
    target = template.state_dict()
    filled = set()
    with torch.no_grad():
        for state in reversed(stage_states):
            for name, t in state.items():
                if name in filled:
                    continue
                target[name].copy_(t)
                filled.add(name)
    missing = [n for n in target if n not in filled and n.split(".")[0] not in BANKS]
    if missing:
        raise RuntimeError(f"pipeline: no stage holds {missing[:5]} ({len(missing)} entries)")
    return template.state_dict()


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: list[str]) -> dict:
    """An optimizer's per-parameter state keyed by parameter name (one param group), on the CPU."""
    sd = optimizer.state_dict()
    return {names[i]: {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
            for i, s in sd["state"].items()}


def whole_optimizer_state(optimizer: torch.optim.Optimizer, by_name: dict, all_names: list[str]) -> dict:
    """The single-process optimizer state dict (parameters numbered in ``all_names`` order)."""
    sd = optimizer.state_dict()
    group = {k: v for k, v in sd["param_groups"][0].items() if k != "params"}
    return {"state": {i: by_name[n] for i, n in enumerate(all_names) if n in by_name},
            "param_groups": [{**group, "params": list(range(len(all_names)))}]}


def stage_optimizer_state(whole: dict, all_names: list[str], names: list[str]) -> dict:
    """The part of a single-process optimizer state dict that belongs to a stage's ``names``."""
    index = {n: i for i, n in enumerate(all_names)}
    group = {k: v for k, v in whole["param_groups"][0].items() if k != "params"}
    state = {k: whole["state"][index[n]] for k, n in enumerate(names) if index[n] in whole["state"]}
    return {"state": state, "param_groups": [{**group, "params": list(range(len(names)))}]}
