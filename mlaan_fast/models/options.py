"""The options of a LocalModel, defined once: name, default (the paper's), type, check and help.

``build_model(..., **options)``, the trainer's config and YAML files, the ``mlaan-fast train``
flags and the checkpoint compatibility check all derive from :class:`LocalOptions`: adding an
option is one field here plus its use.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mlaan_fast import settings
from mlaan_fast.settings import boolean, choice, integer, number, numbers_of, setting

SCHEDULE_NAMES = ("once", "straightforward")


@dataclass(frozen=True)
class LocalOptions:
    """Options of a LocalModel with the paper's defaults (method.md); see :func:`build_model`."""

    s: int | None = setting(None, "cascade span (modules per window); default: the method's (2 for mlaan, "
                            "3 for dgl+mlaan and infopro+mlaan, 1 without MLM)", integer(1, optional=True))
    mlm: bool = setting(True, "multilaminar windows (off: the LAM-only ablation, span 1)", boolean)
    lam: bool = setting(True, "leap augmented modules (off: the MLM-only ablation)", boolean)
    w_ind: float = setting(0.001, "weight of each module's independent loss", number(0))
    w_casc: float = setting(0.999, "weight of each window's cascaded loss", number(0))
    ema_decay: float = setting(0.995, "EMA momentum m of the LAM shadows", number(0, 1))
    lam_depth: int = setting(4, "blocks per LAM where (arch, K) is not a paper preset", integer(1))
    share_shadows: bool = setting(True, "one EMA shadow per distinct live block (exact; off: one per LAM)",
                                  boolean)
    shadow_update: str = setting("all", "which shadows track their block: all (paper) or last_only "
                                 "(the reference code)", choice("all", "last_only"))
    fused: bool = setting(True, "fused head ops (GAP, Linear and cross-entropy in one kernel)", boolean)
    dgl_lean: bool = setting(True, "DGL heads save one tensor per conv layer and rebuild the other in "
                             "backward", boolean)
    schedule: str = setting("once", "window schedule: once (each module forward once) or straightforward "
                            "(the published order); same gradients", choice(*SCHEDULE_NAMES))
    mean: tuple = setting((0.4914, 0.4822, 0.4465), "dataset normalisation mean (InfoPro's decoder target)",
                          numbers_of(3, number()), metavar="M")
    std: tuple = setting((0.2470, 0.2435, 0.2616), "dataset normalisation std",
                         numbers_of(3, number(0, lo_open=True)), metavar="S")
    ixx_1: float = setting(5.0, "InfoPro reconstruction weight at module 0", number(0))
    ixy_1: float = setting(0.5, "InfoPro classification weight at module 0", number(0))
    ixx_2: float = setting(0.0, "InfoPro reconstruction weight at module M-2", number(0))
    ixy_2: float = setting(0.0, "InfoPro classification weight at module M-2", number(0))

    def __post_init__(self):
        for name, value in settings.check_all(self).items():
            object.__setattr__(self, name, value)
        if not self.mlm and self.s not in (None, 1):
            raise ValueError(f"s={self.s} contradicts mlm=False (the LAM-only ablation has span 1)")

    @classmethod
    def from_kwargs(cls, where: str = "build_model", **options) -> LocalOptions:
        """LocalOptions from keyword options; unknown names are a TypeError listing the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"{where}: unknown option(s) {unknown}; known: {known}")
        return cls(**options)

    def for_method(self, default_span: int) -> LocalOptions:
        """These options with ``s`` resolved: the method's span, or 1 without MLM."""
        if self.s is not None:
            return self
        return dataclasses.replace(self, s=default_span if self.mlm else 1)

    def to_dict(self) -> dict:
        """Plain values (tuples as lists) for YAML, checkpoints and comparisons."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LocalOptions))


def check_options(options: dict, label=lambda name: name) -> dict:
    """A partial mapping of options (from a config, YAML or flags), checked: {name: canonical value};
    errors name an option as ``label(name)``."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)}; known: {', '.join(OPTION_NAMES)}")
    return {name: settings.check_value(LocalOptions, name, value, label(name))
            for name, value in options.items()}
