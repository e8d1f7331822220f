"""LocalModel: a ResNet cut into gradient-isolated modules with local heads, MLM windows and LAMs."""
from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mlaan_fast.models import compiled
from mlaan_fast.models.archs import build_backbone, get_arch
from mlaan_fast.models.heads import head_loss, make_head
from mlaan_fast.models.options import LocalOptions
from mlaan_fast.models.plan import lam_lists, split
from mlaan_fast.models.schedules import get_schedule, make_windows
from mlaan_fast.nn import LAM, EMAShadow
from mlaan_fast.ops import aux_head_loss


@dataclass(frozen=True)
class Method:
    head: str | None  # auxiliary head kind; None for e2e
    mlaan: bool  # MLM windows + LAM
    span: int  # default cascade span s


METHODS: dict[str, Method] = {
    "e2e": Method(None, False, 1),
    "dgl": Method("dgl", False, 1),
    "infopro": Method("infopro", False, 1),
    "mlaan": Method("linear", True, 2),
    "dgl+mlaan": Method("dgl", True, 3),
    "infopro+mlaan": Method("infopro", True, 3),
}

class LocalModel(nn.Module):
    """A backbone in M gradient-isolated modules (``local_modules``), the real classifier ``fc``, and
    per-module auxiliary heads, LAMs and EMA shadows. Build it with :func:`build_model`."""

    def __init__(self, arch: str, num_classes: int, K: int, method: str, options: LocalOptions):
        super().__init__()
        spec = METHODS[method]
        backbone = build_backbone(arch, num_classes)
        plan = split(arch, K)
        if method == "e2e" and plan.num_modules != 1:
            raise ValueError(f"method 'e2e' trains one module (K=1), got K={K}")
        self.config = {"arch": arch, "method": method, "K": K, "num_classes": num_classes,
                       "num_modules": plan.num_modules,
                       "options": options.to_dict()}
        self.options = options
        self.module_ends = plan.module_ends
        self.local_modules = nn.ModuleList(self._cut(backbone, plan.module_ends))
        self._live_blocks = {p: backbone.block(p) for p in backbone.positions()}  # plain dict: not registered
        self.fc = backbone.fc
        M = plan.num_modules
        self.windows = make_windows(M, cascade=spec.mlaan, span=options.s, w_ind=options.w_ind,
                                    w_casc=options.w_casc)
        self.schedule = get_schedule(options.schedule)
        self.use_lam = spec.mlaan and options.lam
        self.lam_blocks = lam_lists(arch, K, plan.module_ends, options.lam_depth) if self.use_lam else ()

        widths = [backbone.block(end).out_channels for end in plan.module_ends]
        final_width = self.fc.in_features
        head = dict(num_modules=M, final_channels=final_width, options=options)
        self.ind_heads, self.casc_heads, self.lams = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        for w in self.windows:
            if w.index == M - 1:
                continue  # the last module uses the real classifier for both terms
            if w.ind_weight is not None:
                self.ind_heads[str(w.index)] = make_head(spec.head, widths[w.index], num_classes,
                                                         module_index=w.index, **head)
            if w.start is not None:
                cascade_width = final_width if self.use_lam else widths[w.index]
                self.casc_heads[str(w.index)] = make_head(spec.head, cascade_width, num_classes,
                                                          module_index=w.index, **head)
        self._register_load_state_dict_pre_hook(_drop_shadow_statistics)
        self._compiled = False  # see compile_modules
        self.shadow_bank = self.frozen_shadow_bank = None
        self.shadow_positions: list = []  # live block (stage, block) that shadow i follows
        if self.use_lam:
            self._build_lams(backbone, options)

    @staticmethod
    def _cut(backbone, module_ends) -> list[nn.Sequential]:
        """Module j = (stem if j == 0) + the blocks after module j-1's end up to module j's end."""
        positions = backbone.positions()
        modules, first = [], 0
        for j, end in enumerate(module_ends):
            last = positions.index(end)
            blocks = [backbone.block(p) for p in positions[first:last + 1]]
            modules.append(nn.Sequential(*([backbone.stem] if j == 0 else []), *blocks))
            first = last + 1
        return modules

    def _build_lams(self, backbone, options) -> None:
        """LAM_j (trainable copies of ``lam_blocks[j]``) for every cascaded window but the last module's.
        Under "last_only" only the last LAM's shadow is tracked; the others stay frozen copies of the
        initial block, kept in a second bank that is never updated."""
        js = sorted(int(j) for j in self.casc_heads)
        if not js:
            return
        tracked = js if options.shadow_update == "all" else js[-1:]
        frozen = [j for j in js if j not in tracked]
        share, decay = options.share_shadows, options.ema_decay
        self.shadow_bank, index, self.shadow_positions = self._shadow_bank(backbone, tracked, share, decay)
        if frozen:
            self.frozen_shadow_bank, frozen_index, _ = self._shadow_bank(backbone, frozen, share, decay)
        for j in js:
            if j in index:
                bank, i = self.shadow_bank, index[j]
            else:
                bank, i = self.frozen_shadow_bank, frozen_index[j]
            copies = [copy.deepcopy(backbone.block(p)) for p in self.lam_blocks[j]]
            self.lams[str(j)] = LAM(copies, shadow_bank=bank, shadow_index=i)

    def _shadow_bank(self, backbone, js, share: bool, decay: float):
        """One EMAShadow serving the LAMs ``js``: one shadow per distinct live block their first block
        follows (``share``; exact, they would be identical) or one per LAM.
        Returns (bank, {j: shadow index}, [live block position of each shadow])."""
        keys: list = []
        for j in js:
            key = self.lam_blocks[j][0] if share else j
            if key not in keys:
                keys.append(key)
        positions = [k if share else self.lam_blocks[k][0] for k in keys]
        index = {j: keys.index(self.lam_blocks[j][0] if share else j) for j in js}
        return lam_shadow_bank([backbone.block(p) for p in positions], decay), index, positions

    # ------------------------------------------------------------------ structure
    @property
    def num_modules(self) -> int:
        return len(self.local_modules)

    def live_block(self, position: tuple[int, int]) -> nn.Module:
        """The backbone block at (stage, block), stages from 1 (it lives inside one of ``local_modules``)."""
        if position not in self._live_blocks:
            last = list(self._live_blocks)[-1]
            raise ValueError(f"live_block: no block at {position}; the backbone has {last} last")
        return self._live_blocks[position]

    def module_of(self, position: tuple[int, int]) -> int:
        """The index of the module that holds the live block at (stage, block)."""
        order = list(self._live_blocks)
        if position not in self._live_blocks:
            raise ValueError(f"module_of: no block at {position}; the backbone has {order[-1]} last")
        return next(m for m, end in enumerate(self.module_ends) if order.index(end) >= order.index(position))

    def inference_parameters(self) -> Iterator[nn.Parameter]:
        """Backbone modules + final classifier: what inference uses."""
        return itertools.chain(self.local_modules.parameters(), self.fc.parameters())

    def auxiliary_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable weights used only in training: auxiliary heads and LAM copies."""
        aux = itertools.chain(self.ind_heads.parameters(), self.casc_heads.parameters(),
                              self.lams.parameters())
        return (p for p in aux if p.requires_grad)

    def window_modules(self, j: int) -> list[nn.Module]:
        """The auxiliary modules of module j's window: its heads and LAM (the last module's: the final
        classifier)."""
        if j == self.num_modules - 1:
            return [self.fc]
        return [group[str(j)] for group in (self.ind_heads, self.casc_heads, self.lams) if str(j) in group]

    def window_parameters(self, j: int) -> list[nn.Parameter]:
        """Trainable parameters of :meth:`window_modules` (frozen EMA shadows excluded)."""
        return [p for m in self.window_modules(j) for p in m.parameters() if p.requires_grad]

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """Every trainable parameter (frozen EMA shadows excluded)."""
        return (p for p in super().parameters(recurse) if p.requires_grad)

    # ------------------------------------------------------------------ losses
    def _classifier_loss(self, features, targets):
        """Real classifier on the last module's output: (CE, logits [B,N])."""
        if self.options.fused:
            return aux_head_loss(features, self.fc.weight, self.fc.bias, targets, return_logits=True)
        logits = self.fc(features.mean(dim=(2, 3)))
        logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        return F.cross_entropy(logits, targets), logits

    def independent_loss(self, j: int, h, images, targets):
        """L_ind(j) on h = E_j(stopgrad o_{j-1}) -> (loss, logits or None)."""
        if j == self.num_modules - 1:
            return self._classifier_loss(h, targets)
        return head_loss(self.ind_heads[str(j)], h, images, targets), None

    def cascade_loss(self, j: int, z, images, targets):
        """L_casc(j) on z = window output -> (loss, logits or None); LAM_j first when present."""
        if j == self.num_modules - 1:
            return self._classifier_loss(z, targets)
        if self.use_lam:
            z = self.lams[str(j)](z)
        return head_loss(self.casc_heads[str(j)], z, images, targets), None

    # ------------------------------------------------------------------ running
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: images [B,3,H,W] -> logits [B,num_classes] (backbone + fc only)."""
        for module in self.local_modules:
            x = module(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def local_step(self, images: torch.Tensor, targets: torch.Tensor, grad_scaler=None, *,
                   overlap: bool = False, side_stream=None, on_grads_ready=None) -> dict:
        """images [B,3,H,W], int64 targets [B]: every local forward/backward of one iteration,
        accumulating .grad (no optimizer step).

        Returns {"loss": 0-dim total, "module_losses": [0-dim per module, 0 where a module has no
        objective of its own], "logits": final logits [B,N]}, all detached. ``overlap``, ``side_stream``
        and ``on_grads_ready(params)`` (called where a schedule knows gradients are complete, to start
        their all-reduce early) are the runtime's switches (``mlaan_fast.runtime.LocalStep`` sets them).
        """
        with compiled.compiled_step() if self._compiled else nullcontext():
            return self.schedule(self, images, targets, grad_scaler, overlap=overlap, side_stream=side_stream,
                                 on_grads_ready=on_grads_ready)

    @torch.no_grad()
    def update_shadows(self) -> None:
        """EMA of every tracked shadow towards its live block (one fused update), after the optimizer step."""
        if self.shadow_bank is not None:
            self.shadow_bank.update()

    def compile_modules(self, parts=compiled.PARTS, **kwargs) -> None:
        """torch.compile(**kwargs) the training-mode forward of every backbone module, LAM and auxiliary
        head (``parts``: a subset of ("modules", "lams", "heads")); see :mod:`mlaan_fast.models.compiled`."""
        compiled.compile_parts(self, parts, **kwargs)
        self._compiled = True


def lam_shadow_bank(live_blocks: list[nn.Module], decay: float) -> EMAShadow:
    """EMA shadows of ``live_blocks`` for LAMs, whose BatchNorm layers keep no running statistics:
    LAMs only ever run in training mode, where BatchNorm normalises by the batch's own statistics,
    so those would be state nothing reads (and LAMs that share a shadow on different pipeline
    stages would update them differently)."""
    bank = EMAShadow(live_blocks, decay)
    for bn in bank.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.track_running_stats = False
            bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    return bank


_SHADOW_STATISTICS = re.compile(
    r"(frozen_)?shadow_bank\.shadows\.\d+\..*(running_mean|running_var|num_batches_tracked)$")


def _drop_shadow_statistics(state_dict, prefix, *_args) -> None:
    """Load hook: checkpoints written before shadows dropped their BatchNorm statistics still load."""
    for key in [k for k in state_dict if k.startswith(prefix) and _SHADOW_STATISTICS.match(k[len(prefix):])]:
        del state_dict[key]


def build_model(arch: str, num_classes: int = 10, K: int | None = None, method: str = "mlaan",
                **options) -> LocalModel:
    """A LocalModel for ``arch`` (see ARCHS) cut into the modules of ``K`` (a preset label or 1..blocks),
    trained by ``method`` (see METHODS); ``options`` are LocalOptions fields (the paper's defaults)."""
    get_arch(arch)
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; choose one of {', '.join(METHODS)}")
    if K is None:
        if method != "e2e":
            raise ValueError(f"K is required for method {method!r}")
        K = 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    resolved = LocalOptions.from_kwargs(**options).for_method(METHODS[method].span)
    return LocalModel(arch, num_classes, K, method, resolved)
