"""LocalModel: a ResNet cut into gradient-isolated modules with local heads, MLM windows and LAMs."""
from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mlaan_fast.models import compiled
from mlaan_fast.models.archs import build_backbone, get_arch
from mlaan_fast.models.heads import head_loss, make_head
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

# Paper defaults (method.md); every one is a keyword of build_model.
DEFAULT_OPTIONS = {
    "s": None,  # cascade span; None: the method's (2 for mlaan, 3 for dgl+mlaan / infopro+mlaan)
    "mlm": True,  # False: LAM-only ablation (span 1)
    "lam": True,  # False: MLM-only ablation (cascade head directly on the window output)
    "w_ind": 0.001,
    "w_casc": 0.999,
    "ema_decay": 0.995,
    "lam_depth": 4,
    "share_shadows": True,  # one EMA shadow per distinct live block (exact); False: one per LAM
    "shadow_update": "all",  # "last_only": only the last LAM's shadow tracks its block (reference code)
    "fused": True,
    "dgl_lean": True,  # DGL heads (fused): save one tensor per conv layer, rebuild the other in backward
    "schedule": "once",  # "straightforward": the published s+1 forwards per module (same gradients)
    "overlap": False,  # "once" only: window j after module j+1's forward, heads on a second CUDA stream
    "mean": (0.4914, 0.4822, 0.4465),  # dataset normalisation; InfoPro's decoder target is image*std+mean
    "std": (0.2470, 0.2435, 0.2616),
    "ixx_1": 5.0, "ixy_1": 0.5, "ixx_2": 0.0, "ixy_2": 0.0,  # InfoPro λ at module 0 and module M-2
}


def _resolve_options(method: str, options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise TypeError(f"build_model: unknown option(s) {unknown}; known: {sorted(DEFAULT_OPTIONS)}")
    resolved = {**DEFAULT_OPTIONS, **options}
    spec = METHODS[method]
    if resolved["s"] is None:
        resolved["s"] = spec.span if resolved["mlm"] else 1
    elif not resolved["mlm"] and resolved["s"] != 1:
        raise ValueError(f"s={resolved['s']} contradicts mlm=False (the LAM-only ablation has span 1)")
    if not isinstance(resolved["s"], int) or resolved["s"] < 1:
        raise ValueError(f"s must be an int >= 1, got {resolved['s']!r}")
    if resolved["shadow_update"] not in ("all", "last_only"):
        raise ValueError(f"shadow_update must be 'all' or 'last_only', got {resolved['shadow_update']!r}")
    if not 0.0 <= resolved["ema_decay"] <= 1.0:
        raise ValueError(f"ema_decay must be in [0, 1], got {resolved['ema_decay']}")
    resolved["mean"] = tuple(float(v) for v in resolved["mean"])
    resolved["std"] = tuple(float(v) for v in resolved["std"])
    get_schedule(resolved["schedule"])
    if not isinstance(resolved["overlap"], bool):
        raise TypeError(f"overlap must be True or False, got {resolved['overlap']!r}")
    if resolved["overlap"] and resolved["schedule"] != "once":
        raise ValueError("overlap=True needs schedule='once' (the straightforward schedule runs window by window)")
    return resolved


class LocalModel(nn.Module):
    """A backbone in M gradient-isolated modules (``local_modules``), the real classifier ``fc``, and
    per-module auxiliary heads, LAMs and EMA shadows. Build it with :func:`build_model`."""

    def __init__(self, arch: str, num_classes: int, K: int, method: str, options: dict):
        super().__init__()
        spec = METHODS[method]
        backbone = build_backbone(arch, num_classes)
        plan = split(arch, K)
        if method == "e2e" and plan.num_modules != 1:
            raise ValueError(f"method 'e2e' trains one module (K=1), got K={K}")
        self.config = {"arch": arch, "method": method, "K": K, "num_classes": num_classes,
                       "num_modules": plan.num_modules,
                       "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}
        self.options = options
        self.module_ends = plan.module_ends
        self.local_modules = nn.ModuleList(self._cut(backbone, plan.module_ends))
        self._live_blocks = {p: backbone.block(p) for p in backbone.positions()}  # plain dict: not registered
        self.fc = backbone.fc
        M = plan.num_modules
        self.windows = make_windows(M, cascade=spec.mlaan, span=options["s"], w_ind=options["w_ind"],
                                    w_casc=options["w_casc"])
        self.schedule = get_schedule(options["schedule"])
        self.use_lam = spec.mlaan and options["lam"]
        self.lam_blocks = lam_lists(arch, K, plan.module_ends, options["lam_depth"]) if self.use_lam else ()

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
        self.check_targets = True  # see set_target_checks
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
        tracked = js if options["shadow_update"] == "all" else js[-1:]
        frozen = [j for j in js if j not in tracked]
        share, decay = options["share_shadows"], options["ema_decay"]
        self.shadow_bank, index, self.shadow_positions = self._shadow_bank(backbone, tracked, share, decay)
        if frozen:
            self.frozen_shadow_bank, frozen_index, _ = self._shadow_bank(backbone, frozen, share, decay)
        for j in js:
            bank, i = (self.shadow_bank, index[j]) if j in index else (self.frozen_shadow_bank, frozen_index[j])
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
        return EMAShadow([backbone.block(p) for p in positions], decay), index, positions

    # ------------------------------------------------------------------ structure
    @property
    def num_modules(self) -> int:
        return len(self.local_modules)

    def live_block(self, position: tuple[int, int]) -> nn.Module:
        """The backbone block at (stage, block), stages from 1 (it lives inside one of ``local_modules``)."""
        if position not in self._live_blocks:
            raise ValueError(f"live_block: no block at {position}; the backbone has {list(self._live_blocks)[-1]} last")
        return self._live_blocks[position]

    def inference_parameters(self) -> Iterator[nn.Parameter]:
        """Backbone modules + final classifier: what inference uses."""
        return itertools.chain(self.local_modules.parameters(), self.fc.parameters())

    def auxiliary_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable weights used only in training: auxiliary heads and LAM copies."""
        aux = itertools.chain(self.ind_heads.parameters(), self.casc_heads.parameters(), self.lams.parameters())
        return (p for p in aux if p.requires_grad)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """Every trainable parameter (frozen EMA shadows excluded)."""
        return (p for p in super().parameters(recurse) if p.requires_grad)

    def set_target_checks(self, enabled: bool) -> None:
        """Whether the fused heads check the label range (one host sync per head call on a GPU).

        Turn off only where labels were validated on the host (the trainer does): an out-of-range
        label then gives a NaN loss instead of an error. Not part of the config or checkpoints."""
        self.check_targets = bool(enabled)
        for head in itertools.chain(self.ind_heads.values(), self.casc_heads.values()):
            head.check_target = self.check_targets

    # ------------------------------------------------------------------ losses
    def _classifier_loss(self, features, targets):
        """Real classifier on the last module's output: (CE, logits [B,N])."""
        if self.options["fused"]:
            return aux_head_loss(features, self.fc.weight, self.fc.bias, targets, return_logits=True,
                                 check_target=self.check_targets)
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

    def local_step(self, images: torch.Tensor, targets: torch.Tensor, grad_scaler=None) -> dict:
        """All local forwards/backwards of one iteration, accumulating .grad (no optimizer step).

        Returns {"loss": 0-dim total, "module_losses": [0-dim per module, 0 where a module has no
        objective of its own], "logits": final logits [B,N]}, all detached.
        """
        with compiled.compiled_step() if self._compiled else nullcontext():
            return self.schedule(self, images, targets, grad_scaler)

    @torch.no_grad()
    def update_shadows(self) -> None:
        """EMA of every tracked shadow towards its live block (one fused update); call after the optimizer step."""
        if self.shadow_bank is not None:
            self.shadow_bank.update()

    def compile_modules(self, parts=compiled.PARTS, **kwargs) -> None:
        """torch.compile(**kwargs) the training-mode forward of every backbone module, LAM and auxiliary
        head (``parts``: a subset of ("modules", "lams", "heads")); see :mod:`mlaan_fast.models.compiled`."""
        compiled.compile_parts(self, parts, **kwargs)
        self._compiled = True


def build_model(arch: str, num_classes: int = 10, K: int | None = None, method: str = "mlaan",
                **options) -> LocalModel:
    """A LocalModel for ``arch`` (see ARCHS) cut into the modules of ``K`` (a preset label or 1..blocks),
    trained by ``method`` (see METHODS); options (see DEFAULT_OPTIONS) default to the paper's values."""
    get_arch(arch)
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; choose one of {', '.join(METHODS)}")
    if K is None:
        if method != "e2e":
            raise ValueError(f"K is required for method {method!r}")
        K = 1
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return LocalModel(arch, num_classes, K, method, _resolve_options(method, options))
