"""`mlaan-fast` command line: parsing, recipes, config round trip, the default run's artifacts, eval, plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from mlaan_fast.cli import build_parser, main, train_config_from_args
from mlaan_fast.train.config import TrainConfig, resolve_config, save_yaml

pytestmark = pytest.mark.usefixtures("one_thread")


def resolved(*argv):
    return train_config_from_args(build_parser().parse_args(["train", *argv]))


def test_no_arguments_is_the_offline_digits_demo():
    cfg = resolved()
    assert (cfg.dataset, cfg.recipe, cfg.arch, cfg.method, cfg.K) == (
        "digits",
        "demo",
        "resnet20",
        "mlaan",
        4,
    )


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("cifar10", dict(arch="resnet32", K=16, epochs=400, batch_size=1024, lr=0.8, warmup_epochs=10)),
        ("svhn", dict(arch="resnet32", K=16, epochs=400, batch_size=1024, lr=0.8, warmup_epochs=10)),
        ("stl10", dict(batch_size=128, lr=0.1)),
        ("imagenet", dict(arch="resnet34", epochs=150, batch_size=256, lr=0.1, warmup_epochs=0)),
    ],
)
def test_paper_recipe_per_dataset(dataset, expected):
    cfg = resolved("--dataset", dataset)
    assert cfg.recipe == "paper"
    assert (cfg.momentum, cfg.nesterov, cfg.weight_decay) == (0.9, True, 1e-4)
    assert cfg.local_options().ema_decay == 0.995
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_explicit_flags_override_the_recipe():
    cfg = resolved(
        "--dataset",
        "cifar10",
        "--recipe",
        "paper",
        "--lr",
        "0.1",
        "--K",
        "8",
        "--amp",
        "bf16",
        "--no-nesterov",
        "--channels-last",
        "--w-casc",
        "0.9",
        "--model-option",
        "ixx_1=2.5",
    )
    assert (cfg.lr, cfg.K, cfg.amp, cfg.nesterov, cfg.channels_last) == (0.1, 8, "bf16", False, True)
    assert cfg.batch_size == 1024 and cfg.epochs == 400  # untouched recipe values
    assert cfg.model_kwargs() == {"w_casc": 0.9, "ixx_1": 2.5} and cfg.local_options().ema_decay == 0.995
    assert resolved("--dataset", "imagenet", "--batch-size", "512").lr == pytest.approx(0.2)  # 0.05 per 128
    assert resolved("--method", "e2e").K == 1 and resolved("--method", "e2e", "--K", "2").K == 2


def test_bad_settings_are_refused_with_the_setting_named(capsys):
    with pytest.raises(ValueError, match="no published recipe for 'digits'"):
        resolved("--recipe", "paper")
    assert main(["train", "--epochs", "0"]) == 2
    assert "epochs: must be >= 1" in capsys.readouterr().err
    assert main(["train", "--amp", "fp8"]) == 2
    assert "--amp: unknown 'fp8'; choose one of off, bf16, fp16" in capsys.readouterr().err


def test_config_yaml_round_trip(tmp_path):
    cfg = resolved("--dataset", "svhn", "--lr", "0.3", "--model-option", "schedule=straightforward")
    save_yaml(cfg, tmp_path / "config.yaml")
    assert resolve_config({}, tmp_path / "config.yaml") == cfg
    again = resolved("--config", str(tmp_path / "config.yaml"), "--epochs", "20")
    assert again.epochs == 20 and again.lr == 0.3 and again.dataset == "svhn" and again.warmup_epochs == 10
    short = resolved("--dataset", "svhn", "--epochs", "8")
    assert short.warmup_epochs == pytest.approx(8 * 10 / 400)  # a shortened recipe keeps its warm-up fraction
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"learning_rate": 1}))
    with pytest.raises(ValueError, match="unknown setting.*learning_rate"):
        resolve_config({}, tmp_path / "bad.yaml")


def test_missing_dataset_names_the_files_and_how_to_get_them(tmp_path, capsys):
    assert (
        main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")])
        == 2
    )
    err = capsys.readouterr().err
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in err
    assert "cifar-10-python.tar.gz" in err and "never downloads" in err
    assert main(["train", "--dataset", "imagenet", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "train") in err and "ImageFolder" in err
    assert not (tmp_path / "r").exists()


def test_default_run_shortened_writes_every_artifact_then_eval_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(["train", "--epochs", "1", "--max-steps-per-epoch", "3", "--workers", "0", "--out", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    assert "resolved config" in text and "epoch 1/1" in text and "img/s" in text and "peak mem" in text
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "summary.json", "last.pt", "best.pt"):
        assert (out / name).is_file(), name
    saved = TrainConfig(**yaml.safe_load((out / "config.yaml").read_text()))
    assert saved.dataset == "digits" and saved.max_steps_per_epoch == 3 and saved.out == str(out)
    summary = json.loads((out / "summary.json").read_text())

    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--workers", "0"]) == 0
    assert f"test accuracy {summary['best_test_acc']:.2f}%" in capsys.readouterr().out

    assert main(["plot", str(out)]) == 0
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["accuracy.png", "loss.png", "throughput.png"]

    # resuming with another model is refused; the same --out without --resume must not clobber the run
    assert main(["train", "--resume", str(out / "last.pt"), "--K", "3"]) == 2
    assert "K: checkpoint has 4, this run has 3" in capsys.readouterr().err
    assert main(["train", "--epochs", "1", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_module_entry_point_and_info_still_work():
    done = subprocess.run(
        [sys.executable, "-m", "mlaan_fast", "train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "--max-steps-per-epoch" in done.stdout and "--recipe" in done.stdout
    assert main(["info"]) == 0
