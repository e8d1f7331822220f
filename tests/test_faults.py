"""Hostile input and faults: nothing is lost, nothing broken is kept, and every failure is one line.

One test per class of fault, parametrised over its examples. The non-finite-checkpoint,
corruption, concurrent-run, moved-folder and Ctrl-C cases run the real CLI (``python -m mlaan_fast``
in a subprocess, from this checkout) in a temp folder; the rest call ``cli.main`` in-process.
The unwritable-folder cases use paths under a regular file and in /proc: as root, chmod-based
read-only folders stay writable.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlaan_fast.cli import main
from mlaan_fast.train import checkpoint as ckpt
from mlaan_fast.train import loop
from mlaan_fast.train.config import TrainConfig, resolve_config
from mlaan_fast.train.metrics import MetricsLog, read_metrics
from mlaan_fast.train.runfolder import RunFolder, RunFolderError

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--dataset", "synthetic", "--workers", "0", "--device", "cpu", "--batch-size", "16", "--K", "2",
             "--max-steps-per-epoch", "1"]
TINY = dict(dataset="synthetic", arch="resnet20", method="mlaan", K=2, batch_size=16, epochs=3,
            max_steps_per_epoch=1, workers=0, device="cpu", lr=0.05, warmup_epochs=0)

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m mlaan_fast ARGS`` from this checkout, in a subprocess."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mlaan_fast", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def start_cli(*args) -> subprocess.Popen:
    """``python -m mlaan_fast ARGS`` in the background; Ctrl-C reaches it even where the test runner's
    shell ignores SIGINT (a background job), as it would reach a trainer in a terminal."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mlaan_fast", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() - start < timeout, f"{path} did not appear"
        time.sleep(0.05)


def stderr_lines(err: str) -> list[str]:
    """The lines of ``err`` that are not progress bars."""
    out = []
    for line in err.split("\n"):
        line = re.sub(r"epoch \d+/\d+:\s+\d+%\|[^\]]*\]", "", line.split("\r")[-1]).strip()
        if line:
            out.append(line)
    return out


def one_line_error(err: str, command: str, *fragments: str) -> str:
    """The single stderr line of a refused command; it names ``fragments``."""
    assert "Traceback" not in err, err[-3000:]
    lines = stderr_lines(err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"mlaan-fast {command}: error: "), lines[0]
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    assert "download=True" not in lines[0]
    return lines[0]


def tiny(out, **over) -> TrainConfig:
    return resolve_config({**TINY, "out": str(out), **over})


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory):
    """A run of 3 epochs stopped after its first (last.pt = best.pt = epoch 1); copy it before changing it."""
    out = tmp_path_factory.mktemp("partial") / "run"
    loop.train(tiny(out), verbose=False, stop_after=1)
    return out


def copy_of(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# ---------------------------------------------------------------- a broken state is never kept or crowned
@pytest.mark.parametrize("flags, real_cli", [
    (["--lr", "1e6", "--max-steps-per-epoch", "2"], True),  # train loss finite, test loss NaN after epoch 1
    (["--lr", "1e4"], False),
    (["--lr", "1e6", "--amp", "bf16"], False),
    (["--lr", "1e30"], False),
], ids=["lr1e6", "lr1e4", "lr1e6-bf16", "lr1e30"])
def test_divergence_saves_no_checkpoint_and_no_nan_row(tmp_path, capsys, flags, real_cli):
    out = tmp_path / "run"
    args = ["train", *TINY_ARGS, "--epochs", "2", *flags, "--out", out]
    if real_cli:
        done = run_cli(*args)
        code, err = done.returncode, done.stderr
    else:
        code, err = main(list(map(str, args))), capsys.readouterr().err
    assert code == 3, err[-2000:]
    one_line_error(err, "train", "training diverged at epoch 1", "nothing was saved")
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()
    assert read_metrics(out) == [] and "NaN" not in (out / "metrics.csv").read_text()


def _poison_shadow(model, optimizer):
    model.shadow_bank.flat[5] = float("nan")


def _poison_buffer(model, optimizer):
    model.local_modules[1][0].bn1.running_var[0] = float("inf")


def _poison_momentum(model, optimizer):
    next(iter(optimizer.state.values()))["momentum_buffer"].view(-1)[0] = float("nan")


@pytest.mark.parametrize("poison, where", [
    (_poison_shadow, "the EMA shadows (shadow_bank.flat)"),
    (_poison_buffer, "module 1 (local_modules.1.0.bn1.running_var)"),
    (_poison_momentum, "[optimizer momentum_buffer]"),
], ids=["ema-shadow", "bn-buffer", "momentum"])
def test_nonfinite_state_is_never_saved(tmp_path, monkeypatch, poison, where):
    """State poisoned during epoch 2 (test loss still finite): last.pt and best.pt stay at epoch 1."""
    out = tmp_path / "run"
    loop.train(tiny(out, K=4), verbose=False, stop_after=1)
    before = snapshot(out)
    optimizers = []
    real_make, real_evaluate = loop.make_optimizer, loop.evaluate
    monkeypatch.setattr(loop, "make_optimizer", lambda *a: optimizers.append(real_make(*a)) or optimizers[-1])

    def poisoned_evaluate(runner, *args, **kwargs):
        poison(runner.model, optimizers[-1])
        return real_evaluate(runner, *args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", poisoned_evaluate)
    with pytest.raises(loop.TrainingDiverged, match=r"diverged at epoch 2: non-finite values in ") as info:
        loop.train(tiny(out, K=4), resume=str(out / "last.pt"), verbose=False)
    assert where in str(info.value)
    assert snapshot(out) == before
    assert ckpt.load_checkpoint(out / "best.pt")["epoch"] == 1


def test_save_checkpoint_refuses_nonfinite_state(tmp_path):
    state = {"model": {"w": torch.tensor([1.0, float("inf")])}, "optimizer": {"state": {}}, "epoch": 1}
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to write .* non-finite values in model tensor"):
        ckpt.save_checkpoint(state, tmp_path / "last.pt")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- a checkpoint changed anywhere is refused
def _changed(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x55]) + data[offset + 1:]


def test_checkpoint_changed_anywhere_is_refused(partial_run, tmp_path):
    data = (partial_run / "last.pt").read_bytes()
    header = data.index(b"\n") + 1
    spread = torch.randint(header, len(data), (40,), generator=torch.Generator().manual_seed(0)).tolist()
    ends = [header + 30, header + 512, len(data) - 22, len(data) - 1]
    offsets = sorted({*range(0, header + 2), *ends, *spread})
    damaged = {f"byte {o} changed": _changed(data, o) for o in offsets}
    damaged |= {"empty": b"", "first half": data[: len(data) // 2], "header only": data[:header],
                "one byte short": data[:-1], "one byte more": data + b"\0", "zeros": bytes(len(data))}
    path = tmp_path / "last.pt"
    loaded = []
    for what, content in damaged.items():
        path.write_bytes(content)
        try:
            ckpt.load_checkpoint(path)
            loaded.append(what)
        except ckpt.CheckpointError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc), (what, str(exc))
    assert not loaded, f"loaded although damaged: {loaded}"


def test_format_1_checkpoints_load_when_sound_and_are_refused_when_not(partial_run, tmp_path):
    state = ckpt.load_checkpoint(partial_run / "last.pt")
    state["version"] = 1
    old = tmp_path / "old.pt"
    torch.save(state, old)  # format 1: a bare torch.save zip, no digest
    assert ckpt.load_checkpoint(old)["epoch"] == 1
    state["model"]["local_modules.0.0.1.running_var"][0] = float("nan")
    torch.save(state, old)
    with pytest.raises(ckpt.CheckpointError, match="non-finite values in model tensor local_modules.0.0.1"):
        ckpt.load_checkpoint(old)
    del state["optimizer"]
    torch.save(state, old)
    with pytest.raises(ckpt.CheckpointError, match="incomplete or damaged: missing or malformed optimizer"):
        ckpt.load_checkpoint(old, check_finite=False)


@pytest.mark.parametrize("command, damage, real_cli", [
    ("eval", "middle byte", True),
    ("train", "middle byte", False),
    ("train", "empty", False),
    ("eval", "last byte", False),
], ids=["eval-middle", "resume-middle", "resume-empty", "eval-last"])
def test_cli_refuses_a_damaged_checkpoint_before_any_work(partial_run, tmp_path, capsys, command, damage,
                                                          real_cli):
    run = copy_of(partial_run, tmp_path / "run")
    target = run / ("best.pt" if command == "eval" else "last.pt")
    data = target.read_bytes()
    target.write_bytes({"middle byte": lambda: _changed(data, len(data) // 2), "empty": lambda: b"",
                        "last byte": lambda: _changed(data, len(data) - 1)}[damage]())
    before = snapshot(run)
    args = ["eval", "--checkpoint", target, "--workers", "0"] if command == "eval" else ["train", "--resume",
                                                                                            target]
    if real_cli:
        done = run_cli(*args)
        code, out, err = done.returncode, done.stdout, done.stderr
    else:
        code = main(list(map(str, args)))
        out, err = capsys.readouterr()
    assert code == 2
    one_line_error(err, command, f"checkpoint {target}")
    assert "test accuracy" not in out and "resolved config" not in out
    assert snapshot(run) == before


# ---------------------------------------------------------------- metrics and checkpoint always agree
def _torn_last_line(path):
    path.write_text(path.read_text() + '{"epoch": 2, "train_lo')


def _row_lost(path):  # the checkpoint was saved, then the process died before its metrics row
    path.write_text("")


def _row_beyond_checkpoint(path):  # an older version wrote the row first, then died before the checkpoint
    row = json.loads(path.read_text().splitlines()[0])
    path.write_text(path.read_text() + json.dumps({**row, "epoch": 2}) + "\n")


def _broken_middle_line(path):
    path.write_text("{not json\n" + path.read_text())


def _deleted(path):
    path.unlink()


@pytest.mark.parametrize("damage", [_torn_last_line, _row_lost, _row_beyond_checkpoint, _broken_middle_line,
                                    _deleted], ids=lambda f: f.__name__.strip("_"))
def test_resume_makes_metrics_agree_with_the_checkpoint(partial_run, tmp_path, capsys, damage):
    run = copy_of(partial_run, tmp_path / "run")
    row1 = ckpt.load_checkpoint(run / "last.pt")["metrics"][0]
    damage(run / "metrics.jsonl")
    assert main(["train", "--resume", str(run / "last.pt")]) == 0
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[0] == row1
    assert ckpt.load_checkpoint(run / "last.pt")["metrics"] == rows
    assert len((run / "metrics.csv").read_text().splitlines()) == 4
    assert main(["plot", str(run)]) == 0


def test_plot_reads_a_run_whose_last_line_is_torn_and_names_a_broken_line(partial_run, tmp_path, capsys):
    run = copy_of(partial_run, tmp_path / "run")
    _torn_last_line(run / "metrics.jsonl")
    assert main(["plot", str(run)]) == 0
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["accuracy.png", "loss.png", "throughput.png"]
    _broken_middle_line(run / "metrics.jsonl")
    assert main(["plot", str(run)]) == 2
    one_line_error(capsys.readouterr().err, "plot", f"{run / 'metrics.jsonl'}, line 1")
    (run / "metrics.jsonl").write_text("")
    assert main(["plot", str(run)]) == 2
    one_line_error(capsys.readouterr().err, "plot", "no completed epoch yet")


def test_metrics_log_never_writes_a_nonfinite_row(tmp_path):
    log = MetricsLog(tmp_path)
    log.append({"epoch": 1, "test_loss": 0.5})
    with pytest.raises(ValueError):
        log.append({"epoch": 2, "test_loss": float("nan")})
    assert read_metrics(tmp_path) == [{"epoch": 1, "test_loss": 0.5}] and len(log.rows) == 1


# ---------------------------------------------------------------- resume continues where the checkpoint lives
@pytest.mark.parametrize("how", ["moved", "moved-folder-argument", "other-cwd"])
def test_resume_continues_where_the_checkpoint_lives(tmp_path, monkeypatch, how):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if how == "other-cwd":
        (tmp_path / "d1").mkdir()
        monkeypatch.chdir(tmp_path / "d1")
        loop.train(tiny("runs/x"), verbose=False, stop_after=1)
        monkeypatch.chdir(ROOT)
        run, old = tmp_path / "d1" / "runs" / "x", None
    else:
        old = tmp_path / "old"
        loop.train(tiny(old), verbose=False, stop_after=1)
        run = tmp_path / "new"
        shutil.move(old, run)
    resume = run if how == "moved-folder-argument" else run / "last.pt"
    done = run_cli("train", "--resume", resume, cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]
    assert ckpt.load_checkpoint(run / "last.pt")["config"]["out"] == str(run)
    assert not list(elsewhere.iterdir()) and (old is None or not old.exists())


# ---------------------------------------------------------------- one trainer per run folder
@pytest.mark.parametrize("second", ["same-out", "resume", "same-out-by-symlink"])
def test_second_trainer_on_a_run_folder_is_refused(tmp_path, capsys, second):
    out = tmp_path / "run"
    first = start_cli("train", *TINY_ARGS, "--epochs", "100000", "--out", out)
    try:
        wait_for(out / "last.pt", first)
        (tmp_path / "link").symlink_to(out)
        args = {"same-out": ["train", *TINY_ARGS, "--epochs", "2", "--out", out],
                "resume": ["train", "--resume", out / "last.pt"],
                "same-out-by-symlink": ["train", *TINY_ARGS, "--epochs", "2", "--out", tmp_path / "link"],
                }[second]
        assert main(list(map(str, args))) == 2
        one_line_error(capsys.readouterr().err, "train", "is in use by another mlaan-fast train",
                       f"(pid {first.pid})")
    finally:
        first.kill()  # SIGKILL: the kernel drops its lock
        first.wait()
    cfg = TrainConfig(**ckpt.load_checkpoint(out / "last.pt")["config"])
    epoch = ckpt.load_checkpoint(out / "last.pt")["epoch"]
    loop.train(cfg, resume=str(out / "last.pt"), verbose=False, stop_after=epoch + 1)
    assert read_metrics(out)[-1]["epoch"] == epoch + 1


def test_lock_is_released_when_its_holder_ends(tmp_path):
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(RunFolderError, match=f"run folder {tmp_path / 'run'} is in use .*pid {os.getpid()}"):
        RunFolder(tmp_path / "run")
    folder.release()
    RunFolder(tmp_path / "run").release()


# ---------------------------------------------------------------- bad values: one line, before any work
def _files(**contents):
    def make(root: Path):
        for name, data in contents.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode() if isinstance(data, str) else data)
    return make


def _images(**splits):
    def make(root: Path):
        from PIL import Image

        for split, classes in splits.items():
            for c in classes:
                (root / "data" / split / c).mkdir(parents=True)
                Image.new("RGB", (8, 8)).save(root / "data" / split / c / "x.png")
    return make


_CIFAR = {f"data/cifar-10-batches-py/{n}": b"not a pickle" for n in
          ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
           "batches.meta"]}
_STL = {f"data/stl10_binary/{n}": b"\0" * 64 for n in
        ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin"]}
_IMAGENET = ["--arch", "resnet34", "--K", "2", "--batch-size", "2"]

BAD_VALUES = {
    "yaml-malformed": (["--config", "{root}/c.yaml"], _files(**{"c.yaml": "epochs: [1,\nlr: 0.1\n"}),
                       ["--config: ", "c.yaml is not valid YAML (line 3, column 1"]),
    "yaml-tab": (["--config", "{root}/c.yaml"], _files(**{"c.yaml": "model_options:\n\tschedule: once\n"}),
                 ["is not valid YAML (line 2, column 1: found character '\\t'"]),
    "yaml-binary": (["--config", "{root}/c.yaml"], _files(**{"c.yaml": b"\xff\xfe\x81lr: 1"}),
                    ["is not a text file"]),
    "yaml-folder": (["--config", "{root}"], None, ["is a folder; pass a YAML file"]),
    "yaml-number-key": (["--config", "{root}/c.yaml"], _files(**{"c.yaml": "1: 2\nlr: 0.1\n"}),
                        ["setting names must be words, got 1"]),
    "yaml-python-tag": (["--config", "{root}/c.yaml"],
                        _files(**{"c.yaml": "lr: !!python/object/apply:os.system ['true']\n"}),
                        ["is not valid YAML", "python/object/apply:os.system"]),
    "data-dir-is-a-file": (["--dataset", "cifar10", "--data-dir", "{root}/f"], _files(f="x"),
                           ["data_dir: ", "/f is a file, not a folder"]),
    "data-dir-missing": (["--dataset", "cifar10", "--data-dir", "{root}/none"], None,
                         ["cifar-10-batches-py/data_batch_1", "never downloads"]),
    "cifar10-wrong-contents": (["--dataset", "cifar10", "--data-dir", "{root}/data"], _files(**_CIFAR),
                               ["expected names but not the expected contents", "data_batch_1",
                                "batches.meta"]),
    "svhn-wrong-contents": (["--dataset", "svhn", "--data-dir", "{root}/data"],
                            _files(**{"data/train_32x32.mat": "MATLAB 5.0", "data/test_32x32.mat": "MATLAB"}),
                            ["train_32x32.mat", "not the expected contents"]),
    "stl10-wrong-contents": (["--dataset", "stl10", "--data-dir", "{root}/data"], _files(**_STL),
                             ["stl10: these files", "train_X.bin"]),
    "stl10-unlabeled-missing": (["--dataset", "stl10", "--data-dir", "{root}/data"],
                                _files(**{k: v for k, v in _STL.items() if "unlabeled" not in k}),
                                ["missing: ", "unlabeled_X.bin"]),
    "imagenet-empty": (["--dataset", "imagenet", "--data-dir", "{root}/data", *_IMAGENET],
                       _files(**{"data/train/.keep": "", "data/val/.keep": ""}),
                       ["imagenet: ", "class folder", "ImageFolder layout"]),
    "imagenet-classes-differ": (["--dataset", "imagenet", "--data-dir", "{root}/data", *_IMAGENET],
                                _images(train=["a", "b", "c"], val=["a", "c"]),
                                ["3 class folders", "has 2, not the same ones (e.g. b)"]),
    "imagenet-not-an-image": (["--dataset", "imagenet", "--data-dir", "{root}/data", *_IMAGENET],
                              _files(**{"data/train/a/x.JPEG": "no", "data/val/a/x.JPEG": "no"}),
                              ["cannot read the image", "train/a/x.JPEG"]),
    "device-gpu": (["--device", "gpu"], None, ["device: unknown 'gpu'; use auto, cpu, cuda or cuda:N"]),
    "device-empty": (["--device", ""], None, ["device: unknown ''"]),
    "device-mps": (["--device", "mps"], None, ["device: unknown 'mps'"]),
    "device-cuda-x": (["--device", "cuda:x"], None, ["device: unknown 'cuda:x'"]),
    "backend-unknown": ([], "MLAAN_FAST_BACKEND=bogus", ["MLAAN_FAST_BACKEND: unknown backend 'bogus'",
                                                         "set it to one of: reference, cpu"]),
    "batch-larger-than-dataset": (["--batch-size", "100000", "--drop-last"], None,
                                  ["batch_size: 100000 is larger than the", "--no-drop-last"]),
    "backend-wrong-case": ([], "MLAAN_FAST_BACKEND=CPU", ["unknown backend 'CPU'"]),
    "backend-unusable-triton": ([], "MLAAN_FAST_BACKEND=triton", ["backend 'triton' was forced but is "
                                                                  "unavailable", "unset MLAAN_FAST_BACKEND"]),
}
if not torch.cuda.is_available():
    BAD_VALUES["device-cuda-absent"] = (["--device", "cuda:0"], None, ["no CUDA device is available"])
    BAD_VALUES["backend-unusable-cuda"] = ([], "MLAAN_FAST_BACKEND=cuda", ["backend 'cuda' was forced"])


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_train_refuses_bad_values_before_any_work(tmp_path, capsys, monkeypatch, case):
    flags, setup, fragments = BAD_VALUES[case]
    if isinstance(setup, str):
        name, value = setup.split("=")
        monkeypatch.setenv(name, value)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif setup is not None:
        setup(tmp_path)
    out = tmp_path / "run"
    flags = [f.format(root=tmp_path) for f in flags]
    args = ["train", *TINY_ARGS, "--epochs", "1", *flags, "--out", str(out)]
    assert main(args) == 2
    one_line_error(capsys.readouterr().err, "train", *fragments)
    assert not out.exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["--batch-size", "-5"], "--batch-size: must be >= 1, got -5"),
    (["--workers", "-1"], "--workers: must be >= 0, got -1"),
    (["--device", "gpu"], "device: unknown 'gpu'"),
    (["--data-dir", "/dev/null"], None),  # synthetic data: no files read, so the run is evaluated
], ids=["batch-0", "batch-negative", "workers-negative", "device-gpu", "data-dir-ignored"])
def test_eval_refuses_bad_values(partial_run, capsys, flags, fragment):
    code = main(["eval", "--checkpoint", str(partial_run / "best.pt"), "--workers", "0", *flags])
    if fragment is None:
        assert code == 0 and "test accuracy" in capsys.readouterr().out
        return
    assert code == 2
    one_line_error(capsys.readouterr().err, "eval", fragment)


# ---------------------------------------------------------------- a full disk or an unwritable folder
class _FullFile:
    """A file whose write stores half the bytes, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _fill_disk(monkeypatch, name: str, nth: int) -> None:
    """The ``nth`` file opened for writing whose name holds ``name`` hits a full disk."""
    real_open, seen = builtins.open, []

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and name in Path(str(file)).name:
            seen.append(file)
            if len(seen) == nth:
                return _FullFile(f)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize("target, nth, saved_epoch, fragments", [
    ("last.pt", 2, 1, ["epoch 2 was not saved: cannot write checkpoint", "last.pt: no space left on device; "
                       "the previous last.pt is kept"]),
    ("best.pt", 1, None, ["epoch 1 was not saved", "best.pt: no space left on device; free some space, then "
                          "run the same command again"]),
    ("metrics.jsonl", 3, 2, ["epoch 2 is saved in", "but its metrics could not be written"]),
    ("config.yaml", 1, None, ["config.yaml"]),
], ids=["last-epoch2", "best-epoch1", "metrics-epoch2", "config-start"])
def test_full_disk_says_so_and_loses_nothing(tmp_path, capsys, monkeypatch, target, nth, saved_epoch,
                                             fragments):
    out = tmp_path / "run"
    _fill_disk(monkeypatch, target, nth)
    assert main(["train", *TINY_ARGS, "--epochs", "3", "--out", str(out)]) == 2
    line = one_line_error(capsys.readouterr().err, "train", "no space left on device", *fragments)
    monkeypatch.undo()
    assert not [p.name for p in out.glob(".*tmp*")] if out.exists() else True
    if saved_epoch is None:
        assert not (out / "last.pt").exists()
        return
    resume = out / "last.pt"
    assert f"resume with: mlaan-fast train --resume {resume}" in line
    assert ckpt.load_checkpoint(resume)["epoch"] == saved_epoch
    assert [r["epoch"] for r in read_metrics(out)] == [1]  # the failed epoch is not recorded
    assert main(["train", "--resume", str(resume)]) == 0
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]


@pytest.mark.parametrize("out, fragment", [
    ("{root}/file/run", "not a directory"),
    ("{root}/file", "it is a file, not a folder"),
    ("/proc/mlaan-fast-test-run", "cannot write the run folder /proc/mlaan-fast-test-run"),
], ids=["under-a-file", "a-file", "proc"])
def test_unwritable_out_is_refused_before_reading_data(tmp_path, capsys, out, fragment):
    (tmp_path / "file").write_text("x")
    out = out.format(root=tmp_path)
    # the data folder does not exist either: the --out error coming first shows it is checked first
    args = ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--out", out]
    assert main(args) == 2
    one_line_error(capsys.readouterr().err, "train", "--out: cannot write the run folder", fragment)
    assert (tmp_path / "file").read_text() == "x"


def test_plot_to_an_unwritable_folder_is_one_line(partial_run, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["plot", str(partial_run), "--out", str(tmp_path / "file" / "plots")]) == 2
    one_line_error(capsys.readouterr().err, "plot", "--out: cannot write the plot folder", "not a directory")


# ---------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize("when", ["after-first-checkpoint", "before-first-checkpoint"])
def test_ctrl_c_stops_at_once_and_prints_the_resume_command(tmp_path, when):
    out = tmp_path / "run"
    if when == "after-first-checkpoint":
        proc = start_cli("train", *TINY_ARGS, "--epochs", "100000", "--out", out)
        wait_for(out / "last.pt", proc)
    else:  # the digits demo: its first epoch of 20 steps outlasts the wait below
        proc = start_cli("train", "--workers", "0", "--max-steps-per-epoch", "20", "--out", out)
        wait_for(out / "config.yaml", proc)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - start < 30
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    lines = stderr_lines(err)
    assert len(lines) == 1, lines
    if when == "after-first-checkpoint":
        resume = f"mlaan-fast train --resume {out / 'last.pt'}"
        assert lines[0] == f"mlaan-fast train: interrupted; resume with: {resume}"
        state = ckpt.load_checkpoint(out / "last.pt")
        assert [r["epoch"] for r in read_metrics(out)] == [r["epoch"] for r in state["metrics"]]
    else:
        assert lines[0].startswith(f"mlaan-fast train: interrupted before the first checkpoint of {out}")
        assert not (out / "last.pt").exists()


class _DroppedCtrlC:
    """Raises KeyboardInterrupt from ``__del__``, where Python prints and drops it: what happens to a
    Ctrl-C that lands in a finalizer (the ActivationMeter's run by the thousand in a first step)."""

    def __del__(self):
        raise KeyboardInterrupt


def test_ctrl_c_dropped_in_a_finalizer_still_stops_the_run(tmp_path, capsys, monkeypatch):
    real_evaluate = loop.evaluate

    def evaluate(*args, **kwargs):
        _DroppedCtrlC()
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    assert main(["train", *TINY_ARGS, "--epochs", "30", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "Exception ignored" not in err and "Traceback" not in err
    assert stderr_lines(err)[-1].startswith("mlaan-fast train: interrupted")


def test_the_error_line_survives_a_bar_interrupted_in_its_constructor(capsys):
    """A Ctrl-C inside tqdm's constructor leaves a registered bar with no position (seen once in a loaded
    full-suite run, as an AttributeError traceback instead of the resume line): the one line still comes."""
    import tqdm

    from mlaan_fast import cli

    half_made = tqdm.tqdm.__new__(tqdm.tqdm)  # registered in tqdm's instances ...
    half_made.disable = False  # ... and __init__ stopped after setting this, before the position
    message = "interrupted; resume with: mlaan-fast train --resume run/last.pt"
    try:
        cli._say("train", message)
        assert half_made not in tqdm.tqdm._instances and half_made.disable
    finally:
        tqdm.tqdm._instances.discard(half_made)
        half_made.disable = True
    assert capsys.readouterr().err == f"mlaan-fast train: {message}\n"
