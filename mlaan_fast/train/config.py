"""Training configuration: the paper's recipes per dataset, resolution of flags over them, YAML I/O.

Precedence, lowest first: built-in defaults < the recipe for the dataset < ``--config FILE.yaml``
< flags given on the command line. The resolved config is a flat :class:`TrainConfig`.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DATASETS = ("cifar10", "svhn", "stl10", "imagenet", "digits", "synthetic")
PAPER_DATASETS = ("cifar10", "svhn", "stl10", "imagenet")
AMP_MODES = ("off", "bf16", "fp16")
RECIPES = ("paper", "demo")

# The published recipe (method.md §5). STL-10 epochs/warm-up are not stated there: the CIFAR
# protocol (400 epochs, 10 warm-up) is assumed. ImageNet: lr 0.05 per 128 images, no warm-up.
_PAPER = {
    "cifar10": dict(arch="resnet32", method="mlaan", K=16, epochs=400, batch_size=1024, lr=0.8,
                    warmup_epochs=10),
    "svhn": dict(arch="resnet32", method="mlaan", K=16, epochs=400, batch_size=1024, lr=0.8,
                 warmup_epochs=10),
    "stl10": dict(arch="resnet32", method="mlaan", K=16, epochs=400, batch_size=128, lr=0.1,
                  warmup_epochs=10),
    "imagenet": dict(arch="resnet34", method="mlaan", K=4, epochs=150, batch_size=256, lr=0.05 * 256 / 128,
                     warmup_epochs=0),
}
_PAPER_COMMON = dict(momentum=0.9, nesterov=True, weight_decay=1e-4, ema_decay=0.995)

# Short runs that finish in minutes on a laptop CPU (the no-argument demonstration is "digits").
# Both sets live in memory, so loading in the main process (workers=0) is cheapest.
_DEMO = {
    "digits": dict(arch="resnet20", method="mlaan", K=4, epochs=4, batch_size=64, lr=0.1, warmup_epochs=1,
                   weight_decay=5e-4, workers=0),
    "synthetic": dict(arch="resnet20", method="mlaan", K=2, epochs=1, batch_size=32, lr=0.05,
                      warmup_epochs=0, workers=0),
}
_DEMO_COMMON = dict(momentum=0.9, nesterov=True, weight_decay=1e-4, ema_decay=0.995)

# Model options forwarded to build_model when set (None = the model's own default).
MODEL_OPTION_KEYS = ("mlm", "lam", "s", "w_ind", "w_casc", "lam_depth", "fused", "schedule", "overlap")


@dataclass
class TrainConfig:
    """Every setting of one training run (flat, YAML-serialisable)."""

    dataset: str = "digits"
    data_dir: str = "data"
    recipe: str = "demo"
    arch: str = "resnet20"
    method: str = "mlaan"
    K: int = 4
    epochs: int = 4
    batch_size: int = 64  # global batch: split evenly over data-parallel ranks
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    ema_decay: float = 0.995
    mlm: bool | None = None
    lam: bool | None = None
    s: int | None = None
    w_ind: float | None = None
    w_casc: float | None = None
    lam_depth: int | None = None
    fused: bool | None = None
    schedule: str | None = None
    overlap: bool | None = None
    model_options: dict = field(default_factory=dict)
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    seed: int = 0
    deterministic: bool = False
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))  # DataLoader processes
    device: str = "auto"
    max_steps_per_epoch: int | None = None
    out: str | None = None

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first bad setting; return self."""
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: unknown {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: unknown {self.amp!r}; choose one of {', '.join(AMP_MODES)}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe: unknown {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        for name in ("epochs", "batch_size", "K"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs: must be in [0, epochs={self.epochs}], got {self.warmup_epochs} "
                             "(pass --warmup-epochs with --epochs)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")
        if self.cuda_graphs and self.compile:
            raise ValueError("cuda_graphs and compile: choose one (--cuda-graphs replays the whole step; "
                             "--compile compiles each module)")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch: must be >= 1, got {self.max_steps_per_epoch}")
        return self

    def model_kwargs(self) -> dict:
        """Keyword options for ``build_model`` (only those set, plus ``ema_decay``)."""
        kw = {k: getattr(self, k) for k in MODEL_OPTION_KEYS if getattr(self, k) is not None}
        kw["ema_decay"] = self.ema_decay
        kw.update(self.model_options)
        return kw

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def recipe_values(dataset: str, recipe: str | None = None) -> dict:
    """The recipe's settings for ``dataset``: 'paper' (published) or 'demo'; None picks the natural one."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset: unknown {dataset!r}; choose one of {', '.join(DATASETS)}")
    if recipe is None:
        recipe = "paper" if dataset in PAPER_DATASETS else "demo"
    if recipe == "paper":
        if dataset not in _PAPER:
            raise ValueError(f"recipe: there is no published recipe for {dataset!r}; "
                             f"paper recipes exist for {', '.join(_PAPER)} (use --recipe demo)")
        return {"dataset": dataset, "recipe": "paper", **_PAPER_COMMON, **_PAPER[dataset]}
    if recipe == "demo":
        if dataset in _DEMO:
            return {"dataset": dataset, "recipe": "demo", **_DEMO_COMMON, **_DEMO[dataset]}
        # a paper dataset, shortened: its paper model, 5 epochs at batch 128
        short = dict(_PAPER[dataset], epochs=5, batch_size=128, lr=0.1, warmup_epochs=1)
        return {"dataset": dataset, "recipe": "demo", **_DEMO_COMMON, **short}
    raise ValueError(f"recipe: unknown {recipe!r}; choose one of {', '.join(RECIPES)}")


def resolve_config(explicit: dict, config_file: str | Path | None = None,
                   base: dict | None = None) -> TrainConfig:
    """Resolve a config: defaults < recipe (or ``base``) < YAML file < ``explicit`` (flags given)."""
    from_file = load_yaml(config_file) if config_file else {}
    for source, values in (("--config file", from_file), ("flags", explicit)):
        unknown = sorted(set(values) - FIELDS)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}")
    if base is None:
        dataset = explicit.get("dataset", from_file.get("dataset", TrainConfig.dataset))
        recipe = explicit.get("recipe", from_file.get("recipe"))
        base = recipe_values(dataset, recipe)
    values = {**base, **from_file, **explicit}
    given = {**from_file, **explicit}
    if "warmup_epochs" not in given and "epochs" in given and values["warmup_epochs"] > values["epochs"]:
        # a shortened run keeps the recipe's warm-up fraction (paper: 10 of 400 epochs)
        values["warmup_epochs"] = values["epochs"] * base["warmup_epochs"] / base["epochs"]
    if values["dataset"] == "imagenet" and values["recipe"] == "paper" and "lr" not in given:
        values["lr"] = 0.05 * values["batch_size"] / 128  # the ImageNet recipe scales lr with the batch
    if values["method"] == "e2e" and "K" not in given:
        values["K"] = 1  # end-to-end backprop is one module
    if "model_options" in explicit and "model_options" in from_file:
        values["model_options"] = {**from_file["model_options"], **explicit["model_options"]}
    return TrainConfig(**values).validate()


def load_yaml(path: str | Path) -> dict:
    """Read a config YAML file (a mapping of TrainConfig fields); ValueError naming the file and the
    place if it is not a readable YAML mapping of setting names."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--config: {path} is a folder; pass a YAML file (e.g. runs/NAME/config.yaml)")
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ValueError(f"--config: {path} is not a text file (not UTF-8); pass a YAML file") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"--config: {path} is not valid YAML ({_yaml_problem(exc)})") from None
    except OSError as exc:
        raise ValueError(f"--config: cannot read {path} ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of settings, got {type(data).__name__}")
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise ValueError(f"--config: {path}: setting names must be words, got {odd[0]!r}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """'line L, column C: problem' of a YAML error, on one line."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


def check_device_name(name: str) -> str:
    """``name`` if it is 'auto', 'cpu', 'cuda' or 'cuda:N'; ValueError naming the option otherwise."""
    if isinstance(name, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        return name
    raise ValueError(f"device: unknown {name!r}; use auto, cpu, cuda or cuda:N (e.g. --device cuda:0)")


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config so ``--config path`` repeats the run."""
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def format_config(cfg: TrainConfig) -> str:
    """The resolved config as aligned ``key: value`` lines (printed at start-up)."""
    d = cfg.to_dict()
    width = max(map(len, d))
    return "\n".join(f"  {k:<{width}}  {'(model default)' if v is None and k in MODEL_OPTION_KEYS else v}"
                     for k, v in d.items())
