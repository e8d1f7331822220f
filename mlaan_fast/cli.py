"""The `mlaan-fast` command line: info, train, eval, plot."""
from __future__ import annotations

import argparse
import sys

import yaml

S = argparse.SUPPRESS  # train flags not given stay absent, so recipe and --config values show through


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, the build, the devices and which backends work here (and why not)."""
    from mlaan_fast.info import collect_info, format_info

    print(format_info(collect_info()))
    return 0


OPTION_PREFIX = "option:"  # argparse dest of the model-option flags


def _model_option_items(items: list[str]) -> dict:
    """``--model-option KEY=VALUE`` items -> {KEY: VALUE parsed as YAML}."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-option: expected KEY=VALUE, got {item!r}")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"--model-option {key}: cannot read the value {value!r}") from None
    return options


def train_config_from_args(args: argparse.Namespace):
    """The resolved TrainConfig: recipe (or the resumed checkpoint's config) < --config file < flags."""
    from mlaan_fast.train.checkpoint import load_checkpoint
    from mlaan_fast.train.config import resolve_config

    explicit, options = {}, _model_option_items(getattr(args, "model_option_items", []))
    for key, value in vars(args).items():
        if key.startswith(OPTION_PREFIX):
            options[key[len(OPTION_PREFIX):]] = value
        elif key not in ("command", "func", "config", "resume", "model_option_items"):
            explicit[key] = value
    if options:
        explicit["options"] = options
    base = load_checkpoint(args.resume)["config"] if args.resume else None
    return resolve_config(explicit, args.config, base=base)


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) a local-learning model; write runs/NAME/{config.yaml,metrics.*,summary.json,*.pt}."""
    from mlaan_fast.train.loop import train

    cfg = train_config_from_args(args)
    train(cfg, resume=args.resume)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Load a checkpoint and print its test accuracy."""
    from mlaan_fast.train.checkpoint import check_compatible, load_checkpoint
    from mlaan_fast.train.config import TrainConfig
    from mlaan_fast.train.data import build_datasets, build_loaders
    from mlaan_fast.train.loop import build_for_config, evaluate, pick_device

    state = load_checkpoint(args.checkpoint)
    cfg = TrainConfig.from_dict(state["config"], where=f"checkpoint {args.checkpoint}")
    if args.data_dir:
        cfg.data_dir = args.data_dir
    device = pick_device(args.device)
    train_set, test_set, info = build_datasets(cfg.dataset, cfg.data_dir)
    model = build_for_config(cfg, info.num_classes, device, info)
    check_compatible(state, model.config, path=args.checkpoint)
    model.load_state_dict(state["model"])
    batch = args.batch_size or cfg.batch_size
    _, _, test_loader = build_loaders(train_set, test_set, batch, cfg.seed, args.workers,
                                      pin_memory=device.type == "cuda")
    loss, acc = evaluate(model, test_loader, device, cfg.amp, cfg.channels_last, info.num_classes)
    print(f"{args.checkpoint}: {cfg.arch} {cfg.method} K={cfg.K}, epoch {state['epoch']}/{cfg.epochs}; "
          f"{cfg.dataset} test accuracy {acc:.2f}% (loss {loss:.4f}, {len(test_set)} images)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Overlay the metrics of one or more runs into loss/accuracy/throughput PNGs."""
    from pathlib import Path

    from mlaan_fast.train.plots import plot_runs

    out = args.out or (Path(args.runs[0]) / "plots" if len(args.runs) == 1 else Path("runs") / "plots")
    for path in plot_runs(args.runs, out):
        print(path)
    return 0


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """The train flags: one per TrainConfig setting and one per model option (LocalOptions)."""
    from mlaan_fast.models.options import LocalOptions
    from mlaan_fast.settings import add_flags
    from mlaan_fast.train.config import TrainConfig

    groups: dict = {}
    add_flags(p, TrainConfig, default=S, groups=groups)
    p.add_argument("--config", default=None, help="YAML file of settings (e.g. runs/NAME/config.yaml)")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue exactly from runs/NAME/last.pt (its settings; flags given must agree)")
    g = p.add_argument_group("model options (defaults: the model's, from the paper)")
    add_flags(g, LocalOptions, dest_prefix=OPTION_PREFIX, default=S, groups={None: g})
    g.add_argument("--model-option", dest="model_option_items", action="append", default=[], metavar="KEY=VALUE",
                   help="any model option as KEY=VALUE (repeatable; VALUE read as YAML)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlaan-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, build, devices and usable backends")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a model (no arguments: a few-minute demo on offline digits)",
                       description="Train with local learning. Without arguments: resnet20 + MLAAN (K=4) on "
                                   "scikit-learn's digits, 4 epochs, on the CPU or GPU.")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test accuracy of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="runs/NAME/best.pt or last.pt")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the one the run used)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's batch size")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot", help="PNG curves (loss, accuracy, images/s) of one or more runs, overlaid")
    p.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG folder (default RUN/plots; runs/plots for several)")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mlaan_fast.train.checkpoint import CheckpointError
    from mlaan_fast.train.data import DatasetNotFoundError
    from mlaan_fast.train.loop import TrainingDiverged

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TrainingDiverged as exc:
        print(f"mlaan-fast {args.command}: {exc}", file=sys.stderr)
        return 3
    except (DatasetNotFoundError, CheckpointError, FileExistsError, FileNotFoundError, ValueError,
            TypeError) as exc:
        print(f"mlaan-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
