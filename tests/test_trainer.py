"""Trainer: schedule, data order, checkpoints (atomic, refused, exact resume), NaN stop, metrics, plots."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mlaan_fast.train import checkpoint as ckpt
from mlaan_fast.train import loop
from mlaan_fast.train.config import resolve_config
from mlaan_fast.train.data import EpochSampler, build_datasets, build_loaders, check_labels
from mlaan_fast.train.metrics import MetricsLog, read_metrics
from mlaan_fast.train.plots import plot_runs

# A tiny run: synthetic data, 2 modules, 2 steps per epoch, bitwise repeatable.
TINY = dict(
    dataset="synthetic",
    arch="resnet20",
    method="mlaan",
    K=2,
    batch_size=16,
    epochs=2,
    max_steps_per_epoch=2,
    workers=0,
    deterministic=True,
    device="cpu",
    lr=0.05,
    warmup_epochs=1,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path, name, **over):
    return resolve_config({**TINY, "out": str(tmp_path / name), **over})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished tiny run (2 epochs), shared by the checkpoint tests."""
    root = tmp_path_factory.mktemp("runs")
    loop.train(resolve_config({**TINY, "out": str(root / "full")}), verbose=False)
    return root / "full"


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.8)
    sched = loop.warmup_cosine(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(0.8)
    assert lrs[8] == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at 0


def test_optimizer_is_nesterov_sgd_with_recipe_values():
    cfg = resolve_config({"dataset": "cifar10"})
    opt = loop.make_optimizer(torch.nn.Linear(3, 2), cfg, torch.device("cpu"))
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        0.8,
        0.9,
        True,
        1e-4,
    )
    assert group["foreach"] is True


def test_data_order_and_augmentation_depend_only_on_seed_and_epoch():
    train_set, test_set, _ = build_datasets("synthetic", "unused")

    def first_batch(epoch, workers):
        loader, sampler, _ = build_loaders(train_set, test_set, 8, seed=3, workers=workers)
        sampler.set_epoch(epoch)
        return next(iter(loader))

    x0, y0 = first_batch(1, workers=0)
    x2, y2 = first_batch(1, workers=2)
    assert torch.equal(x0, x2) and torch.equal(y0, y2)
    x_other, _ = first_batch(2, workers=0)
    assert not torch.equal(x0, x_other)


def test_distributed_sampler_shards_partition_the_epoch():
    a, b = EpochSampler(10, seed=0, rank=0, world=2), EpochSampler(10, seed=0, rank=1, world=2)
    idx = sorted(i for _, i in a) + sorted(i for _, i in b)
    assert sorted(idx) == list(range(10))


def test_labels_out_of_range_are_refused():
    check_labels(torch.tensor([0, 9]), 10, "batch")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\); found \[10\]"):
        check_labels(torch.tensor([3, 10]), 10, "training batch")


def test_atomic_save_never_clobbers_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # temp file removed


def test_truncated_and_foreign_checkpoints_are_refused(trained, tmp_path):
    data = (trained / "last.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.load_checkpoint(cut)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ckpt.CheckpointError, match="not an mlaan_fast training checkpoint"):
        ckpt.load_checkpoint(foreign)
    with pytest.raises(ckpt.CheckpointError, match="no such file"):
        ckpt.load_checkpoint(tmp_path / "absent.pt")


@pytest.mark.parametrize("change", [{"K": 3}, {"arch": "resnet32"}, {"method": "dgl"}])
def test_checkpoint_of_another_model_is_refused(trained, tmp_path, change):
    cfg = tiny(tmp_path, "other", epochs=3, **change)
    key = next(iter(change))
    with pytest.raises(ckpt.CheckpointError, match=f"{key}: checkpoint has .*, this run has"):
        loop.train(cfg, resume=str(trained / "last.pt"), verbose=False)


def test_run_writes_artifacts_and_checkpoint_contents(trained):
    rows = read_metrics(trained)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "lr",
        "epoch_time_s",
        "images_per_s",
        "peak_bytes",
        "module_loss",
    } <= set(rows[0])
    assert len(rows[0]["module_loss"]) == 2 and rows[0]["peak_bytes"] > 0  # ActivationMeter on CPU
    header = (trained / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "module_loss_1" in header and "test_acc" in header
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["best_test_acc"] == max(r["test_acc"] for r in rows)
    state = ckpt.load_checkpoint(trained / "last.pt")
    assert (
        state["epoch"] == 2 and state["model_config"]["K"] == 2 and state["config"]["dataset"] == "synthetic"
    )
    assert {"torch", "numpy", "python", "cuda"} <= set(state["rng"]) and state["sampler"]["epoch"] == 1
    assert state["optimizer"]["state"], "optimizer momentum must be saved"
    assert (trained / "best.pt").is_file()


def test_resume_continues_bitwise(trained, tmp_path):
    """Stopped after epoch 1 and resumed == uninterrupted at epoch 2 (deterministic, CPU, workers=0)."""
    cfg = tiny(tmp_path, "resumed")
    loop.train(cfg, verbose=False, stop_after=1)
    loop.train(tiny(tmp_path, "resumed"), resume=str(tmp_path / "resumed" / "last.pt"), verbose=False)
    full, resumed = (
        ckpt.load_checkpoint(trained / "last.pt"),
        ckpt.load_checkpoint(tmp_path / "resumed" / "last.pt"),
    )
    mismatched = [k for k in full["model"] if not torch.equal(full["model"][k], resumed["model"][k])]
    assert not mismatched, f"first mismatches: {mismatched[:5]}"
    for i, s in full["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], resumed["optimizer"]["state"][i]["momentum_buffer"])
    rows_full, rows_resumed = read_metrics(trained), read_metrics(tmp_path / "resumed")
    assert [r["epoch"] for r in rows_resumed] == [1, 2]
    for key in ("train_loss", "test_loss", "test_acc", "module_loss"):
        assert rows_full[1][key] == rows_resumed[1][key]


def test_resume_with_precise_bn_continues_bitwise(tmp_path):
    """The statistics recomputed before each evaluation (on 24 images: a batch and a half) are those a
    resumed run starts from, and the test metrics use them."""
    whole = loop.train(tiny(tmp_path, "whole", precise_bn=24), verbose=False).run_dir
    loop.train(tiny(tmp_path, "halves", precise_bn=24), verbose=False, stop_after=1)
    halves = tmp_path / "halves"
    loop.train(tiny(tmp_path, "halves", precise_bn=24), resume=str(halves / "last.pt"), verbose=False)
    full, resumed = ckpt.load_checkpoint(whole / "last.pt"), ckpt.load_checkpoint(halves / "last.pt")
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    assert read_metrics(whole)[1]["test_loss"] == read_metrics(halves)[1]["test_loss"]
    plain = loop.train(tiny(tmp_path, "plain"), verbose=False).run_dir
    assert read_metrics(plain)[0]["test_loss"] != read_metrics(whole)[0]["test_loss"]  # it did something


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, amp):
    loop.train(
        tiny(tmp_path, amp, amp=amp, epochs=1, max_steps_per_epoch=1, deterministic=False), verbose=False
    )
    state = ckpt.load_checkpoint(tmp_path / amp / "last.pt")
    assert math.isfinite(read_metrics(tmp_path / amp)[0]["train_loss"])
    assert (state["scaler"] is not None) == (amp == "fp16")


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_gpu_training_step(tmp_path, amp):
    """CUDA: pinned loader, fused SGD, autocast, channels_last; peak memory is the allocator's."""
    cfg = tiny(
        tmp_path,
        amp,
        amp=amp,
        device="cuda",
        channels_last=True,
        epochs=1,
        max_steps_per_epoch=3,
        deterministic=False,
        workers=2,
    )
    result = loop.train(cfg, verbose=False)
    row = read_metrics(tmp_path / amp)[0]
    assert (
        math.isfinite(row["train_loss"])
        and row["peak_kind"] == "cuda_max_allocated"
        and row["peak_bytes"] > 0
    )
    assert next(result.model.parameters()).is_cuda


def test_nonfinite_loss_stops_without_touching_checkpoints(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, "nan", epochs=3)
    loop.train(cfg, verbose=False, stop_after=1)
    last, best = (tmp_path / "nan" / "last.pt").read_bytes(), (tmp_path / "nan" / "best.pt").read_bytes()
    real_to_device = loop._to_device

    def poisoned(images, *args):
        images, targets = real_to_device(images, *args)
        return torch.full_like(images, float("nan")), targets

    monkeypatch.setattr(loop, "_to_device", poisoned)
    with pytest.raises(loop.TrainingDiverged, match=r"non-finite loss \(nan\) in module \d+.* at epoch 2"):
        loop.train(tiny(tmp_path, "nan", epochs=3), resume=str(tmp_path / "nan" / "last.pt"), verbose=False)
    assert (tmp_path / "nan" / "last.pt").read_bytes() == last
    assert (tmp_path / "nan" / "best.pt").read_bytes() == best
    assert [r["epoch"] for r in read_metrics(tmp_path / "nan")] == [1]


def test_metrics_log_and_plots(tmp_path):
    log = MetricsLog(tmp_path)
    for e in (1, 2, 3):
        log.append(
            {
                "epoch": e,
                "train_loss": 1.0 / e,
                "test_loss": 1.2 / e,
                "train_acc": 50.0 + e,
                "test_acc": 45.0 + e,
                "images_per_s": 100.0,
                "module_loss": [0.5, 0.6],
            }
        )
    log = MetricsLog(tmp_path)
    log.keep_epochs_before(3)  # what a resume after epoch 2 does
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].endswith("module_loss_0,module_loss_1")
    paths = plot_runs([tmp_path, tmp_path], tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["accuracy.png", "loss.png", "throughput.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_cuda_graphs_need_cuda_and_exclude_compile(tmp_path):
    with pytest.raises(ValueError, match="cuda_graphs and compile"):
        tiny(tmp_path, "both", cuda_graphs=True, compile=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            loop.train(tiny(tmp_path, "graphs", cuda_graphs=True, device="cpu"), verbose=False)
        assert not (tmp_path / "graphs" / "last.pt").exists()


def test_overlap_reaches_the_step(tmp_path, monkeypatch):
    """--overlap is a runtime switch: every training step's schedule runs with it."""
    from mlaan_fast.models import LocalModel

    seen, local_step = [], LocalModel.local_step

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("overlap"))
        return local_step(self, *args, **kwargs)

    monkeypatch.setattr(LocalModel, "local_step", spy)
    cfg = tiny(tmp_path, "overlap", overlap=True, epochs=1, max_steps_per_epoch=2)
    loop.train(cfg, verbose=False)
    assert cfg.overlap is True and seen == [True, True]


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_gpu_training_with_cuda_graphs(tmp_path, amp):
    """--cuda-graphs --overlap: warm-up steps eager, then one captured graph replayed (5 steps)."""
    cfg = tiny(tmp_path, amp, amp=amp, device="cuda", epochs=1, max_steps_per_epoch=5, cuda_graphs=True,
               overlap=True, deterministic=False, workers=2)
    loop.train(cfg, verbose=False)
    row = read_metrics(tmp_path / amp)[0]
    assert math.isfinite(row["train_loss"]) and row["peak_kind"] == "cuda_max_allocated"
