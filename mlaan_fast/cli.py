"""The `mlaan-fast` command line: info, train, eval, plot."""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading

import yaml

S = argparse.SUPPRESS  # train flags not given stay absent, so recipe and --config values show through


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, the build, the devices and which backends work here (and why not)."""
    from mlaan_fast.info import collect_info, format_info

    print(format_info(collect_info()))
    return 0


OPTION_PREFIX = "option:"  # argparse dest of the model-option flags


def _model_option_items(items: list[str]) -> dict:
    """``--model-option KEY=VALUE`` items -> {KEY: VALUE parsed as YAML; nan/inf read as floats, as
    the numeric flags read them, so that the option's own check refuses them by name}."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-option: expected KEY=VALUE, got {item!r}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"--model-option {key}: cannot read the value {value!r}") from None
        if isinstance(parsed, str) and parsed.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            parsed = float(parsed)
        options[key] = parsed
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
    from mlaan_fast.train.checkpoint import check_compatible, load_checkpoint, load_model_state
    from mlaan_fast.train.config import TrainConfig
    from mlaan_fast.train.data import build_datasets, build_loaders
    from mlaan_fast.train.loop import build_for_config, check_backend_env, evaluate, pick_device

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers: must be >= 0, got {args.workers}")
    device = pick_device(args.device)
    check_backend_env(device)
    state = load_checkpoint(args.checkpoint)
    cfg = TrainConfig.from_dict(state["config"], where=f"checkpoint {args.checkpoint}")
    if args.data_dir:
        cfg.data_dir = args.data_dir
    train_set, test_set, info = build_datasets(cfg.dataset, cfg.data_dir)
    model = build_for_config(cfg, info.num_classes, device, info)
    check_compatible(state, model.config, path=args.checkpoint)
    load_model_state(model, state, args.checkpoint)
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

    from mlaan_fast.train.metrics import read_metrics
    from mlaan_fast.train.plots import plot_runs
    from mlaan_fast.train.runfolder import RunFolderError

    for run in args.runs:
        if not read_metrics(run):
            raise ValueError(f"{Path(run) / 'metrics.jsonl'}: no completed epoch yet, nothing to plot")
    out = Path(args.out or (Path(args.runs[0]) / "plots" if len(args.runs) == 1 else Path("runs") / "plots"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"--out: cannot write the plot folder {out} ({_os_error(exc)})") from None
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
    g.add_argument("--model-option", dest="model_option_items", action="append", default=[],
                   metavar="KEY=VALUE",
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
    """Run one command; every failure is one line on stderr (exit 2; a diverged run 3; a lost process of a
    distributed run 4; Ctrl-C 130)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _ctrl_c_is_never_lost():
            return args.func(args)
    except KeyboardInterrupt as exc:
        _say(args.command, _interrupted(exc))
        return 130
    except Exception as exc:
        code, message = _failure(exc)
        if code == 1 and os.environ.get("MLAAN_FAST_TRACEBACK"):
            raise
        _say(args.command, f"error: {message}")
        return code


@contextlib.contextmanager
def _ctrl_c_is_never_lost():
    """Ctrl-C raises KeyboardInterrupt as usual; one that lands in a finalizer (``__del__``), where Python
    prints and drops exceptions, is raised again a moment later instead."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous_hook = sys.unraisablehook

    def hook(unraisable):
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            signal.setitimer(signal.ITIMER_REAL, 0.05)
        else:
            previous_hook(unraisable)

    def again(signum, frame):
        raise KeyboardInterrupt

    previous_alarm = signal.signal(signal.SIGALRM, again)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_alarm)
        sys.unraisablehook = previous_hook


def _say(command: str, message: str) -> None:
    """One line on stderr, after clearing any progress bar the failure left open."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except AttributeError:
            # A Ctrl-C that lands inside tqdm's constructor leaves a registered bar without its
            # position; it has drawn nothing: forget it, so that its finalizer does nothing either.
            bar.disable = True
            type(bar)._instances.discard(bar)
    print(f"mlaan-fast {command}: {message}", file=sys.stderr, flush=True)


def _failure(exc: Exception) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ends a command."""
    from mlaan_fast.runtime.distributed import lost_peer
    from mlaan_fast.runtime.pipeline import PipelineError
    from mlaan_fast.train.checkpoint import CheckpointError
    from mlaan_fast.train.loop import TrainingDiverged
    from mlaan_fast.train.runfolder import RunFolderError

    if isinstance(exc, TrainingDiverged):
        return 3, _one_line(str(exc))
    if isinstance(exc, PipelineError) or lost_peer(exc):
        if isinstance(exc, PipelineError):
            return 4, _one_line(str(exc))
        cause = _one_line(str(exc))[:300]
        return 4, f"another process of this run died or stopped answering ({cause})"
    if isinstance(exc, OSError):
        return 2, _one_line(_os_error(exc))
    if isinstance(exc, (CheckpointError, RunFolderError, ValueError, TypeError)):
        return 2, _one_line(str(exc))
    return 1, (f"unexpected {type(exc).__name__}: {_one_line(str(exc))} (set MLAAN_FAST_TRACEBACK=1 to see "
               "where)")


def _os_error(exc: OSError) -> str:
    from mlaan_fast.train.runfolder import describe_os_error

    return describe_os_error(exc)


def _one_line(message: str) -> str:
    """A message on one line; of an error re-raised from a DataLoader worker, its own last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if "Original Traceback" in message and lines:
        return lines[-1]
    return "; ".join(lines)


def _interrupted(exc: KeyboardInterrupt) -> str:
    """What Ctrl-C stopped, and the command that continues it."""
    checkpoint = getattr(exc, "checkpoint", None)
    if checkpoint is not None:
        return f"interrupted; resume with: mlaan-fast train --resume {shlex.quote(str(checkpoint))}"
    run_dir = getattr(exc, "run_dir", None)
    if run_dir is not None:
        return (f"interrupted before the first checkpoint of {run_dir}: nothing to resume; run the same "
                "command again to start over")
    return "interrupted"


if __name__ == "__main__":
    sys.exit(main())
