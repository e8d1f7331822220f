"""The demo's closing comparison with end-to-end training, and the demo recipe that uses it."""
import json

import pytest
import torch

from mlaan_fast.models import build_model
from mlaan_fast.profiling import ActivationMeter
from mlaan_fast.train import loop
from mlaan_fast.train.compare import compare_with_end_to_end, format_comparison
from mlaan_fast.train.config import resolve_config
from mlaan_fast.train.data import build_datasets, build_loaders

pytestmark = pytest.mark.usefixtures("one_thread")


def test_comparison_measures_both_models_on_the_same_batch():
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    local = build_model("resnet20", K=4, method="mlaan")
    e2e = build_model("resnet20", K=1, method="e2e")
    result = compare_with_end_to_end(local, e2e, x, y)
    for name, model in (("local", local), ("end_to_end", e2e)):  # what a meter around one step reads
        assert all(p.grad is None for p in model.parameters())  # nothing left behind
        with ActivationMeter(exclude=model) as meter:
            model.local_step(x, y)
        assert result[name]["saved_bytes"] == meter.peak_bytes > 0
        assert result[name]["step_s"] > 0
    assert result["batch"] == 8
    saved = {name: result[name]["saved_bytes"] for name in ("local", "end_to_end")}
    assert result["memory_ratio"] == pytest.approx(saved["local"] / saved["end_to_end"])
    assert result["memory_ratio"] < 1  # four modules hold less than one
    text = format_comparison(result, "mlaan", 4, "resnet20", torch.device("cpu"))
    assert "end to end (K=1)" in text and "mlaan (K=4)" in text and f"{result['memory_ratio']:.2f}x" in text


def test_digits_demo_ends_with_the_comparison(tmp_path, capsys):
    cfg = resolve_config({"out": str(tmp_path / "run"), "epochs": 1, "max_steps_per_epoch": 2})
    assert cfg.compare_end_to_end and cfg.drop_last and cfg.batch_size == 32  # the demo recipe
    loop.train(cfg)
    assert "one training step of the same batch (32 images, resnet20, cpu" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    comparison = summary["end_to_end_comparison"]
    assert comparison["end_to_end"]["saved_bytes"] > comparison["local"]["saved_bytes"] > 0


def test_paper_recipes_keep_every_batch_and_skip_the_comparison():
    cfg = resolve_config({"dataset": "cifar10"})
    assert not cfg.drop_last and not cfg.compare_end_to_end


@pytest.mark.parametrize("drop_last, steps, last", [(False, 43, 4), (True, 42, 32)])
def test_drop_last_leaves_out_the_short_batch(drop_last, steps, last):
    train_set, test_set, _ = build_datasets("digits", "unused")
    loader, _, _ = build_loaders(train_set, test_set, 32, seed=0, workers=0, drop_last=drop_last)
    sizes = [len(t) for _, t in loader]
    assert len(loader) == len(sizes) == steps and sizes[-1] == last
