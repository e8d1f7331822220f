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


def _model_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-option: expected KEY=VALUE, got {item!r}")
        options[key] = yaml.safe_load(value)
    return options


def train_config_from_args(args: argparse.Namespace):
    """The resolved TrainConfig: recipe (or the resumed checkpoint's config) < --config file < flags."""
    from mlaan_fast.train.checkpoint import load_checkpoint
    from mlaan_fast.train.config import resolve_config

    explicit = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config", "resume")}
    if "model_options" in explicit:
        explicit["model_options"] = _model_options(explicit["model_options"])
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
    cfg = TrainConfig(**state["config"])
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
    from mlaan_fast.train.config import AMP_MODES, DATASETS, RECIPES

    g = p.add_argument_group("what to train")
    g.add_argument("--dataset", choices=DATASETS, default=S, help="default: digits (offline demo)")
    g.add_argument("--data-dir", default=S, help="folder holding the dataset files (never downloaded)")
    g.add_argument("--recipe", choices=RECIPES, default=S,
                   help="hyper-parameter defaults: 'paper' (published recipe; default for cifar10/svhn/stl10/"
                        "imagenet) or 'demo' (short run; default for digits/synthetic)")
    g.add_argument("--config", default=None, help="YAML file of settings (e.g. runs/NAME/config.yaml)")
    g.add_argument("--arch", default=S, help="resnet20/32/56/110 (CIFAR-style), resnet34/101/152 (ImageNet)")
    g.add_argument("--method", default=S, help="e2e, dgl, infopro, mlaan, dgl+mlaan, infopro+mlaan")
    g.add_argument("--K", "--k", dest="K", type=int, default=S, help="number of gradient-isolated modules")
    g = p.add_argument_group("optimisation (defaults: the recipe)")
    g.add_argument("--epochs", type=int, default=S)
    g.add_argument("--batch-size", type=int, default=S, help="global batch, split over data-parallel ranks")
    g.add_argument("--lr", type=float, default=S, help="peak learning rate (after warm-up)")
    g.add_argument("--momentum", type=float, default=S)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=S)
    g.add_argument("--weight-decay", type=float, default=S)
    g.add_argument("--warmup-epochs", type=float, default=S, help="linear warm-up, then cosine to 0")
    g.add_argument("--ema-decay", type=float, default=S, help="EMA momentum m of the LAM shadows")
    g = p.add_argument_group("model options (defaults: the model's, from the paper)")
    g.add_argument("--mlm", action=argparse.BooleanOptionalAction, default=S, help="cascaded windows on/off")
    g.add_argument("--lam", action=argparse.BooleanOptionalAction, default=S, help="leap augmented modules")
    g.add_argument("--s", type=int, default=S, help="cascade span (modules per window)")
    g.add_argument("--w-ind", type=float, default=S, help="weight of the independent loss")
    g.add_argument("--w-casc", type=float, default=S, help="weight of the cascaded loss")
    g.add_argument("--lam-depth", type=int, default=S, help="blocks per LAM for non-preset (arch, K)")
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=S, help="fused head ops")
    g.add_argument("--schedule", default=S, help="window schedule of the model")
    g.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=S,
                   help="schedule 'once': heads on a second CUDA stream, overlapping module work")
    g.add_argument("--model-option", dest="model_options", action="append", default=S, metavar="KEY=VALUE",
                   help="any other build_model option (repeatable; VALUE parsed as YAML)")
    g = p.add_argument_group("speed and reproducibility")
    g.add_argument("--amp", choices=AMP_MODES, default=S, help="mixed precision (fp16 uses a grad scaler)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=S)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=S, help="torch.compile")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=S,
                   help="replay each training step from a CUDA graph (GPU, fixed batch shape)")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=S,
                   help="torch.use_deterministic_algorithms (bitwise-repeatable runs, slower)")
    g.add_argument("--workers", type=int, default=S, help="DataLoader worker processes")
    g.add_argument("--device", default=S, help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--max-steps-per-epoch", type=int, default=S, help="cap on batches per epoch (short runs)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=S, help="run folder (default runs/<dataset>-<arch>-<method>-K<K>)")
    g.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue exactly from runs/NAME/last.pt (its settings; flags given must agree)")


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
    """Run one command; every failure is one line on stderr (exit 2; a diverged run 3; Ctrl-C 130)."""
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
        bar.close()
    print(f"mlaan-fast {command}: {message}", file=sys.stderr, flush=True)


def _failure(exc: Exception) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ends a command."""
    from mlaan_fast.train.checkpoint import CheckpointError
    from mlaan_fast.train.loop import TrainingDiverged
    from mlaan_fast.train.runfolder import RunFolderError

    if isinstance(exc, TrainingDiverged):
        return 3, _one_line(str(exc))
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
