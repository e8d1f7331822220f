"""Settings defined once: every bad value of a model option or training setting is refused before
any work, from Python, YAML or the command line, with one line naming the setting."""
import math

import pytest
import yaml

from mlaan_fast.cli import build_parser, main
from mlaan_fast.models import LocalOptions, build_model
from mlaan_fast.models.options import OPTION_NAMES
from mlaan_fast.settings import boolean
from mlaan_fast.train.config import RESUME_KEYS, TrainConfig, resolve_config

# (option, bad value, exception, words of the message)
BAD_OPTIONS = [
    ("w_casc", float("nan"), ValueError, "w_casc: must be a finite number"),
    ("w_ind", -1, ValueError, "w_ind: must be >= 0"),
    ("w_ind", math.inf, ValueError, "w_ind: must be a finite number"),
    ("ema_decay", "0.9", TypeError, "ema_decay: expected a number"),
    ("ema_decay", 1.5, ValueError, "ema_decay: must be in [0, 1]"),
    ("ema_decay", True, TypeError, "ema_decay: expected a number"),
    ("fused", "maybe", TypeError, "fused: expected true or false"),
    ("lam", 2, TypeError, "lam: expected true or false"),
    ("mlm", None, TypeError, "mlm: expected true or false"),
    ("s", 0, ValueError, "s: must be >= 1"),
    ("s", 2.0, TypeError, "s: expected a whole number"),
    ("lam_depth", "4", TypeError, "lam_depth: expected a whole number"),
    ("schedule", "fast", ValueError, "schedule: unknown 'fast'; choose one of once, straightforward"),
    ("shadow_update", "some", ValueError, "shadow_update: unknown 'some'"),
    ("std", (0.2, 0.0, 0.2), ValueError, "std[1]: must be > 0"),
    ("mean", (0.5, 0.5), ValueError, "mean: expected 3 numbers, got 2"),
    ("mean", "0.5", TypeError, "mean: expected 3 numbers"),
    ("ixx_1", float("-inf"), ValueError, "ixx_1: must be a finite number"),
]


@pytest.mark.parametrize("name,value,exc,words", BAD_OPTIONS, ids=lambda v: repr(v)[:20])
def test_build_model_refuses_bad_option_values(name, value, exc, words):
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("(", r"\(")):
        build_model("resnet20", K=3, method="mlaan", **{name: value})


@pytest.mark.parametrize("spelling,value", [("false", False), ("No", False), ("off", False), ("0", False),
                                            ("true", True), ("YES", True), ("on", True), ("1", True),
                                            (False, False), (True, True), (0, False), (1, True)])
def test_yes_no_options_take_booleans_and_the_usual_spellings(spelling, value):
    assert boolean("fused", spelling) is value
    assert build_model("resnet20", K=3, method="mlaan", fused=spelling).options.fused is value


def test_every_option_has_a_check_a_help_text_and_a_flag():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    for name in OPTION_NAMES:
        assert "--" + name.replace("_", "-") in flags, name
    assert LocalOptions().to_dict()["ema_decay"] == 0.995


# (flags, the words of the one-line error)
BAD_FLAGS = [
    (["--lr", "nan"], "--lr: must be a finite number, got nan"),
    (["--lr", "-0.1"], "--lr: must be > 0"),
    (["--lr", "inf"], "--lr: must be a finite number"),
    (["--epochs", "0"], "--epochs: must be >= 1, got 0"),
    (["--epochs", "2.5"], "--epochs: expected a whole number"),
    (["--batch-size", "three"], "--batch-size: expected a whole number, got 'three'"),
    (["--momentum", "1"], "--momentum: must be in [0, 1)"),
    (["--weight-decay=-1e-4"], "--weight-decay: must be >= 0"),
    (["--warmup-epochs", "nan"], "--warmup-epochs: must be a finite number"),
    (["--workers", "-1"], "--workers: must be >= 0"),
    (["--seed", "x"], "--seed: expected a whole number"),
    (["--max-steps-per-epoch", "0"], "--max-steps-per-epoch: must be >= 1"),
    (["--amp", "fp8"], "--amp: unknown 'fp8'"),
    (["--arch", "resnet7"], "--arch: unknown 'resnet7'"),
    (["--w-ind", "nan"], "--w-ind: must be a finite number"),
    (["--ema-decay", "-0.5"], "--ema-decay: must be in [0, 1]"),
    (["--s", "0"], "--s: must be >= 1"),
    (["--model-option", "fused=maybe"], "--fused: expected true or false, got 'maybe'"),
    (["--model-option", "w_casc=.nan"], "--w-casc: must be a finite number"),
    (["--model-option", "w_casc=nan"], "--w-casc: must be a finite number, got nan"),
    (["--model-option", "w_ind=-inf"], "--w-ind: must be a finite number, got -inf"),
    (["--model-option", "foo=1"], "unknown model option(s) foo"),
    (["--model-option", "fused"], "--model-option: expected KEY=VALUE"),
    (["--warmup-epochs", "5", "--epochs", "2"], "warmup_epochs: must be in [0, epochs=2]"),
]


@pytest.mark.parametrize("argv,words", BAD_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_flags_are_one_line_errors_before_any_work(argv, words, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("mlaan-fast train: error: ")
    assert not out.exists()


BAD_YAML = [
    ({"epochs": "three"}, TypeError, "epochs: expected a whole number, got 'three'"),
    ({"lr": ".nan"}, TypeError, "lr: expected a number"),
    ({"lr": float("nan")}, ValueError, "lr: must be a finite number"),
    ({"nesterov": "maybe"}, TypeError, "nesterov: expected true or false"),
    ({"options": {"w_ind": -1}}, ValueError, "w_ind: must be >= 0"),
    ({"options": "fused"}, TypeError, "options: expected a mapping"),
    ({"learning_rate": 1}, ValueError, "unknown setting(s) learning_rate"),
    ({"fused": "maybe"}, TypeError, "fused: expected true or false"),
]


@pytest.mark.parametrize("values,exc,words", BAD_YAML, ids=lambda v: repr(v)[:24])
def test_bad_yaml_values_name_the_file_and_the_setting(values, exc, words, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(exc) as info:
        resolve_config({}, path)
    assert str(info.value).startswith(f"--config {path}: ") and words in str(info.value)
    assert str(info.value).count("--config") == 1, "the file is named once"


def test_configs_with_model_options_at_the_top_level_still_load(tmp_path):
    """Configs written before the options were one group kept them flat (None: the model's default)."""
    old = {**TrainConfig().to_dict(), "mlm": None, "lam": None, "s": None, "w_ind": 0.01, "fused": None,
           "ema_decay": 0.99, "model_options": {"ixx_1": 2.5}}
    del old["options"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = resolve_config({}, tmp_path / "config.yaml")
    assert cfg.options == {"w_ind": 0.01, "ema_decay": 0.99, "ixx_1": 2.5}
    assert TrainConfig.from_dict(old).options == cfg.options


def test_resume_keys_are_the_settings_that_change_the_training_path():
    assert set(RESUME_KEYS) == {"dataset", "epochs", "batch_size", "drop_last", "lr", "momentum", "nesterov",
                                "weight_decay", "warmup_epochs", "amp", "seed", "max_steps_per_epoch",
                                "precise_bn"}
