"""Training configuration: the paper's recipes per dataset, resolution of flags over them, YAML I/O.

Precedence, lowest first: built-in defaults < the recipe for the dataset < ``--config FILE.yaml``
< flags given on the command line. The resolved config is a :class:`TrainConfig`, whose fields are
declared once with their check and help (``mlaan_fast.settings``); the model options it carries
are those of :class:`mlaan_fast.models.LocalOptions`.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from mlaan_fast import settings
from mlaan_fast.models.archs import ARCHS
from mlaan_fast.models.local_model import METHODS
from mlaan_fast.models.options import OPTION_NAMES, LocalOptions, check_options
from mlaan_fast.settings import boolean, choice, integer, mapping, number, setting, text

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
_PAPER_COMMON = dict(momentum=0.9, nesterov=True, weight_decay=1e-4)

# Short runs that finish in minutes on a laptop CPU (the no-argument demonstration is "digits").
# Both sets live in memory, so loading in the main process (workers=0) is cheapest.
# digits: 1,348 training images make 42 steps of 32 an epoch. Evaluated after each epoch, the
# network must already hold sensible BatchNorm statistics after the first: no warm-up ramping the
# rate up to its peak at that moment, no last batch of 4 images (its statistics and its gradient
# step land right before the evaluation), and statistics recomputed on 256 training images before
# each evaluation (the running averages lag the first epoch's fast-moving weights).
_DEMO = {
    "digits": dict(arch="resnet20", method="mlaan", K=4, epochs=4, batch_size=32, lr=0.02, warmup_epochs=0,
                   weight_decay=5e-4, workers=0, drop_last=True, precise_bn=256, compare_end_to_end=True),
    "synthetic": dict(arch="resnet20", method="mlaan", K=2, epochs=1, batch_size=32, lr=0.05,
                      warmup_epochs=0, workers=0),
}
_DEMO_COMMON = dict(momentum=0.9, nesterov=True, weight_decay=1e-4)


_WHAT, _OPT, _SPEED = "what to train", "optimisation (defaults: the recipe)", "speed and reproducibility"
_PARALLEL = "several processes (torchrun) and micro-batches"


def _device_check(name: str, value) -> str:
    return check_device_name(value, name)


_device_check.wants_text = True


def _default_workers() -> int:
    return min(8, os.cpu_count() or 1)


@dataclass
class TrainConfig:
    """Every setting of one training run (YAML-serialisable); ``options`` holds the model options set
    explicitly (LocalOptions names; the rest keep the model's defaults)."""

    dataset: str = setting("digits", "default: digits (offline demo)", choice(*DATASETS), group=_WHAT,
                           resume=True)
    data_dir: str = setting("data", "folder holding the dataset files (never downloaded)", text(),
                            group=_WHAT)
    recipe: str = setting("demo", "hyper-parameter defaults: 'paper' (published recipe; default for "
                          "cifar10/svhn/stl10/imagenet) or 'demo' (short run; default for digits/synthetic)",
                          choice(*RECIPES), group=_WHAT)
    arch: str = setting("resnet20", "resnet20/32/56/110 (CIFAR-style), resnet18/34/50/101/152 (ImageNet)",
                        choice(*ARCHS), group=_WHAT)
    method: str = setting("mlaan", "e2e, dgl, infopro, mlaan, dgl+mlaan, infopro+mlaan", choice(*METHODS),
                          group=_WHAT)
    K: int = setting(4, "number of gradient-isolated modules", integer(1), flag="--K", aliases=("--k",),
                     group=_WHAT)
    epochs: int = setting(4, "epochs to train", integer(1), group=_OPT, resume=True)
    batch_size: int = setting(32, "global batch, split evenly over data-parallel ranks", integer(1),
                              group=_OPT, resume=True)
    drop_last: bool = setting(False, "leave out each epoch's last batch when it is smaller than the others "
                              "(its BatchNorm statistics and its step come from a few images)", boolean,
                              group=_OPT, resume=True)
    precise_bn: int = setting(0, "before each evaluation, recompute the backbone's BatchNorm running "
                              "statistics from this many training images (0: keep the running averages)",
                              integer(0), group=_OPT, resume=True)
    lr: float = setting(0.02, "peak learning rate (after warm-up)", number(0, lo_open=True), group=_OPT,
                        resume=True)
    momentum: float = setting(0.9, "SGD momentum", number(0, 1, hi_open=True), group=_OPT, resume=True)
    nesterov: bool = setting(True, "Nesterov momentum", boolean, group=_OPT, resume=True)
    weight_decay: float = setting(1e-4, "L2 weight decay", number(0), group=_OPT, resume=True)
    warmup_epochs: float = setting(0.0, "linear warm-up epochs, then cosine to 0", number(0), group=_OPT,
                                   resume=True)
    options: dict = setting({}, "model options (LocalOptions) set explicitly", mapping, flag="", resume=False)
    amp: str = setting("off", "mixed precision (fp16 uses a grad scaler)", choice(*AMP_MODES), group=_SPEED,
                       resume=True)
    channels_last: bool = setting(False, "channels_last memory format", boolean, group=_SPEED)
    compile: bool = setting(False, "torch.compile each module", boolean, group=_SPEED)
    cuda_graphs: bool = setting(False, "replay each training step from a CUDA graph (GPU, fixed batch shape)",
                                boolean, group=_SPEED)
    overlap: bool = setting(False, "schedule 'once': window j after module j+1's forward; on a GPU the heads "
                            "run on a second CUDA stream", boolean, group=_SPEED)
    microbatches: int = setting(1, "run each batch as n micro-batches whose gradients are averaged (gradient "
                                "accumulation; with a pipeline, what flows through the stages)", integer(1),
                                group=_PARALLEL)
    pipeline_stages: int = setting(1, "module pipeline: the model's modules on this many processes "
                                   "(torchrun; world size = stages x data-parallel replicas)", integer(1),
                                   group=_PARALLEL)
    pipeline_mode: str = setting("sync", "sync (exact, micro-batches flushed every step) or async (no flush, "
                                 "gradients across stages one step late)", choice("sync", "async"),
                                 group=_PARALLEL)
    partition: str = setting("measured", "how modules are cut into stages: measured (balance one profiled "
                             "step's per-module time) or even", choice("measured", "even"), group=_PARALLEL)
    comm_timeout: float = setting(600.0, "seconds a rank waits for another before stopping with an error",
                                  number(0, lo_open=True), group=_PARALLEL)
    seed: int = setting(0, "seed of every random number generator", integer(0), group=_SPEED, resume=True)
    deterministic: bool = setting(False, "torch.use_deterministic_algorithms (bitwise-repeatable runs, "
                                  "slower)", boolean, group=_SPEED)
    workers: int = setting(_default_workers(), "DataLoader worker processes", integer(0), group=_SPEED)
    device: str = setting("auto", "auto (default), cpu, cuda, cuda:N", _device_check, group=_SPEED)
    max_steps_per_epoch: int | None = setting(None, "cap on batches per epoch (short runs)",
                                              integer(1, optional=True), group=_SPEED, resume=True)
    out: str | None = setting(None, "run folder (default runs/<dataset>-<arch>-<method>-K<K>)",
                              text(optional=True), group="output")
    compare_end_to_end: bool = setting(False, "end with one step of the same network trained end to end on "
                                       "the same batch: its saved-activation peak and step time next to "
                                       "this method's (default for the digits demo)", boolean, group="output")

    def validate(self) -> TrainConfig:
        """Check every setting (ValueError/TypeError naming the first bad one), canonicalise; return self."""
        for name, value in settings.check_all(self).items():
            setattr(self, name, value)
        self.options = check_options(self.options)
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs: must be in [0, epochs={self.epochs}], got "
                             f"{self.warmup_epochs:g} (pass --warmup-epochs with --epochs)")
        if self.cuda_graphs and self.compile:
            raise ValueError("cuda_graphs and compile: choose one (--cuda-graphs replays the whole step; "
                             "--compile compiles each module)")
        if self.cuda_graphs and self.microbatches > 1:
            raise ValueError("cuda_graphs and microbatches: a captured step runs the whole batch; choose one")
        if self.microbatches > self.batch_size:
            raise ValueError(f"microbatches: {self.microbatches} micro-batches of a batch of "
                             f"{self.batch_size}")
        if self.pipeline_stages > 1:
            self._check_pipeline()
        return self

    def _check_pipeline(self) -> None:
        """What a module pipeline cannot be combined with, refused with the reason."""
        from mlaan_fast.runtime.pipeline.engine import check_torch_release

        try:
            check_torch_release()
        except ValueError as exc:
            raise ValueError(f"pipeline_stages={self.pipeline_stages}: {exc}") from None
        conflicts = (("cuda_graphs", self.cuda_graphs, "a captured graph cannot wait for other stages"),
                     ("compile", self.compile, "compiling a stage's share of the model is not supported"),
                     ("precise_bn", self.precise_bn > 0, "the backbone is split over the stages; pass "
                      "--precise-bn 0"),
                     ("overlap", self.overlap, "a pipeline stage already overlaps with the others"),
                     ("amp fp16", self.amp == "fp16", "the gradient scaler would skip steps stage by stage; "
                      "use --amp bf16"))
        for name, bad, why in conflicts:
            if bad:
                raise ValueError(f"pipeline_stages={self.pipeline_stages} and {name}: not together ({why})")
        if self.pipeline_mode == "async" and self.microbatches > 1:
            raise ValueError("microbatches: the async pipeline steps on whole batches; use "
                             "--pipeline-mode sync")

    def model_kwargs(self) -> dict:
        """Keyword options for ``build_model``: the ones set explicitly."""
        return dict(self.options)

    def local_options(self) -> LocalOptions:
        """The model options this run uses (explicit ones over the model's defaults, span unresolved)."""
        return LocalOptions(**self.options)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> TrainConfig:
        """A checked TrainConfig from a mapping (a YAML file, a checkpoint); model options may also sit at
        the top level (older configs kept them there)."""
        return cls(**_fold_options(values, where)).validate()


# Keys of configs written before the model options were one group; None meant "the model's default".
_LEGACY_KEYS = ("model_options",)


def _fold_options(values: dict, where: str) -> dict:
    """``values`` with top-level model options (and the older ``model_options``) moved into ``options``."""
    values = dict(values)
    options = settings.mapping("options", values.pop("options", None) or {})
    for key in _LEGACY_KEYS:
        options.update(settings.mapping(key, values.pop(key, None) or {}))
    for name in OPTION_NAMES:
        if name in values:
            value = values.pop(name)
            if value is not None:
                options.setdefault(name, value)
    settings.unknown_keys(TrainConfig, values, where)
    return {**values, "options": options}


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
RESUME_KEYS = tuple(f.name for f in settings.fields(TrainConfig) if f.metadata["resume"])


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
    """Resolve a config: defaults < recipe (or ``base``, a resumed run's config) < YAML < ``explicit``."""
    from_file = _checked(load_yaml(config_file), f"--config {config_file}") if config_file else {}
    explicit = _checked(explicit, None)
    if base is None:
        dataset = explicit.get("dataset", from_file.get("dataset", TrainConfig.dataset))
        recipe = explicit.get("recipe", from_file.get("recipe"))
        base = recipe_values(dataset, recipe)
    else:
        base = _checked(base, "the checkpoint's config")
    given = {**from_file, **explicit}
    options = {**base.get("options", {}), **from_file.get("options", {}), **explicit.get("options", {})}
    values = {**base, **given, "options": options}
    if "warmup_epochs" not in given and "epochs" in given and values["warmup_epochs"] > values["epochs"]:
        # a shortened run keeps the recipe's warm-up fraction (paper: 10 of 400 epochs)
        values["warmup_epochs"] = values["epochs"] * base["warmup_epochs"] / base["epochs"]
    if values["dataset"] == "imagenet" and values["recipe"] == "paper" and "lr" not in given:
        values["lr"] = 0.05 * values["batch_size"] / 128  # the ImageNet recipe scales lr with the batch
    if values["method"] == "e2e" and "K" not in given:
        values["K"] = 1  # end-to-end backprop is one module
    return TrainConfig(**values).validate()


def _checked(values: dict, where: str | None) -> dict:
    """Settings from one source, each checked; errors name the source ``where`` and the setting, or
    for the command line (``where`` None) the flag."""
    label = settings.flag_name if where is None else (lambda name: name)
    try:
        values = _fold_options(values, where or "command line")
        out = {k: settings.check_value(TrainConfig, k, v, label(k))
               for k, v in values.items() if k != "options"}
        out["options"] = check_options(values["options"], label)
    except (TypeError, ValueError) as exc:
        named = where is None or str(exc).startswith(where)
        raise type(exc)(str(exc) if named else f"{where}: {exc}") from None
    if not out["options"]:
        del out["options"]
    return out


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


def check_device_name(name: str, label: str = "device") -> str:
    """``name`` if it is 'auto', 'cpu', 'cuda' or 'cuda:N'; ValueError naming the option otherwise."""
    if isinstance(name, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        return name
    raise ValueError(f"{label}: unknown {name!r}; use auto, cpu, cuda or cuda:N (e.g. --device cuda:0)")


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config so ``--config path`` repeats the run."""
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def format_config(cfg: TrainConfig) -> str:
    """The resolved config as aligned ``key: value`` lines (printed at start-up)."""
    d = cfg.to_dict()
    d["options"] = ", ".join(f"{k}={v}" for k, v in cfg.options.items()) or "(the model's defaults)"
    width = max(map(len, d))
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in d.items())
