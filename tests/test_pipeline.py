"""The module pipeline on the CPU with gloo, processes spawned by the tests.

``sync`` is exact: after k steps the weights, BatchNorm buffers, EMA shadows and optimizer state equal
those of one process running ``local_step`` on the same micro-batches in turn (gradients averaged).
A pipeline checkpoint is an ordinary single-model checkpoint, in both directions. A dead or silent
stage stops the others with a message naming it.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed as dist
from dist_helpers import spawn
from tolerance import assert_all_close_scaled

from mlaan_fast.models import build_model
from mlaan_fast.runtime import LocalStep
from mlaan_fast.runtime.distributed import GradientReducer
from mlaan_fast.runtime.pipeline import Pipeline, even_partition, layouts, make_groups
from mlaan_fast.runtime.pipeline.engine import pipeline_supported
from mlaan_fast.train import checkpoint as ckpt
from mlaan_fast.train import loop
from mlaan_fast.train.config import resolve_config

pytestmark = pytest.mark.skipif(not pipeline_supported(), reason="the module pipeline needs torch >= 2.7")

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _model(arch, K, method):
    torch.manual_seed(0)
    return build_model(arch, K=K, method=method).double()


def _batches(steps, replicas=1, size=8):
    g = torch.Generator().manual_seed(5)
    def batch():
        images = torch.rand(size, 3, 32, 32, generator=g, dtype=torch.float64)
        return images, torch.randint(0, 10, (size,), generator=g)

    return [[batch() for _ in range(replicas)] for _ in range(steps)]


def _engine_worker(rank, case, stages, replicas, out):
    arch, K, method, n, steps = case
    dist.init_process_group("gloo")
    model = _model(arch, K, method)
    groups = make_groups(stages, replicas, rank)
    pipe = Pipeline(model, even_partition(model.num_modules, stages), stage=rank % stages,
                    replica=rank // stages, device=torch.device("cpu"), groups=groups, microbatches=n,
                    timeout_s=120,
                    template=lambda: _model(arch, K, method))
    optimizer = torch.optim.SGD(pipe.parameters(), lr=0.1, momentum=0.9)
    reducer = GradientReducer(pipe.parameters(), groups.data_parallel)
    for batch in _batches(steps, replicas):
        optimizer.zero_grad(set_to_none=True)
        pipe.step(*batch[rank // stages])
        reducer.finish()
        optimizer.step()
        pipe.update_shadows()
    pipe.drain()
    whole = pipe.gather_state(optimizer)
    if rank == 0:
        torch.save(whole, out)
    dist.destroy_process_group()


def _reference(case, replicas):
    """One process: every replica's batch as n micro-batches in turn, gradients averaged, one SGD step."""
    arch, K, method, n, steps = case
    model = _model(arch, K, method)
    step = LocalStep(model, microbatches=n)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    class Share:  # the data-parallel mean over replicas, as a loss scale
        def scale(self, loss):
            return loss / replicas

    for batch in _batches(steps, replicas):
        optimizer.zero_grad(set_to_none=True)
        for images, targets in batch:
            step(images, targets, grad_scaler=Share() if replicas > 1 else None)
        optimizer.step()
        model.update_shadows()
    return model.state_dict(), optimizer.state_dict()


def _compare(got, want, skip=()):
    (gm, go), (wm, wo) = got, want
    names = [k for k in wm if not k.endswith(skip)]
    assert_all_close_scaled({k: gm[k].double() for k in names}, {k: wm[k].double() for k in names}, rtol=1e-9)
    assert set(go["state"]) == set(wo["state"])
    # atol: DGL's Linear biases before BatchNorm1d get a gradient of zero up to rounding (1e-17).
    momentum = [{str(i): s["momentum_buffer"] for i, s in o["state"].items()} for o in (go, wo)]
    assert_all_close_scaled(*momentum, rtol=1e-9, atol=1e-12)


# (arch, K, method, micro-batches, steps), stages: every case has windows across the stage borders;
# dgl+mlaan with one module per stage sends streams on through a whole stage.
CASES = [
    (("resnet20", 4, "mlaan", 2, 2), 2),
    (("resnet32", 8, "mlaan", 2, 2), 3),
    (("resnet20", 6, "dgl+mlaan", 2, 2), 3),
    (("resnet20", 4, "dgl", 2, 2), 2),
    (("resnet20", 4, "dgl+mlaan", 2, 2), 4),
]


def _case_id(value) -> str:
    return "-".join(map(str, value)) if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize("case,stages", CASES, ids=_case_id)
def test_sync_equals_one_process_on_the_same_micro_batches(case, stages, tmp_path):
    model = _model(*case[:3])
    crossing = any(layout.streams_out for layout in layouts(model, even_partition(model.num_modules, stages)))
    assert crossing == ("mlaan" in case[2])  # DGL has no windows across modules
    spawn(_engine_worker, stages, case, stages, 1, str(tmp_path / "state.pt"))
    _compare(torch.load(tmp_path / "state.pt"), _reference(case, 1))


def test_two_stages_times_two_replicas(tmp_path):
    """P x D = 2 x 2: each stage's gradients are averaged over its replicas only. Replica 0's BatchNorm
    running statistics saw its own batches (the single process saw both), so they are left out."""
    case = ("resnet20", 4, "mlaan", 2, 2)
    spawn(_engine_worker, 4, case, 2, 2, str(tmp_path / "state.pt"))
    _compare(torch.load(tmp_path / "state.pt"), _reference(case, 2), skip=BN_STATS)


# ------------------------------------------------------------------ through the trainer
RUN = dict(dataset="synthetic", arch="resnet20", method="mlaan", K=4, batch_size=16, epochs=2,
           max_steps_per_epoch=2, microbatches=2, workers=0, device="cpu", lr=0.05, warmup_epochs=0,
           deterministic=True, comm_timeout=60)


def _train_worker(rank, settings, resume, stop_after, out):
    cfg = resolve_config(settings)
    try:
        loop.train(cfg, resume=resume, verbose=False, stop_after=stop_after)
    except Exception as exc:  # the message is what the test checks
        with open(f"{out}.rank{rank}", "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")


def _train(tmp_path, name, world=1, resume=None, stop_after=None, **over):
    settings = {**RUN, "out": str(tmp_path / name), **over}
    if world == 1:
        loop.train(resolve_config(settings), resume=resume, verbose=False, stop_after=stop_after)
    else:
        spawn(_train_worker, world, settings, resume, stop_after, str(tmp_path / name))
    return tmp_path / name


def _state(run):
    return ckpt.load_checkpoint(run / "last.pt")


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """Two epochs in one process with two micro-batches per step: what every pipeline run must equal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each stage runs: convolutions round differently on other thread counts
    try:
        return _state(_train(tmp_path_factory.mktemp("single"), "whole"))
    finally:
        torch.set_num_threads(threads)


def _assert_same_run(got, want):
    assert got["epoch"] == want["epoch"]
    gm, wm = got["model"], want["model"]
    assert gm.keys() == wm.keys()
    floating = [k for k in wm if wm[k].is_floating_point()]
    assert_all_close_scaled({k: gm[k] for k in floating}, {k: wm[k] for k in floating})
    assert all(torch.equal(gm[k], wm[k]) for k in wm if k not in floating)
    assert_all_close_scaled({str(i): s["momentum_buffer"] for i, s in got["optimizer"]["state"].items()},
                            {str(i): s["momentum_buffer"] for i, s in want["optimizer"]["state"].items()})


@pytest.mark.usefixtures("one_thread")
def test_pipeline_and_single_process_checkpoints_resume_each_other(tmp_path, one_process_run):
    # pipeline epoch 1 -> one process epoch 2, and the other way round
    first = _train(tmp_path, "a", world=2, stop_after=1, pipeline_stages=2, partition="measured")
    a = _train(tmp_path, "a", resume=str(first / "last.pt"))
    _assert_same_run(_state(a), one_process_run)
    first = _train(tmp_path, "b", stop_after=1)
    b = _train(tmp_path, "b", world=2, resume=str(first / "last.pt"), pipeline_stages=2)
    _assert_same_run(_state(b), one_process_run)
    metrics = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in metrics] == [1, 2]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_pipeline_resumed_midway_continues_exactly(tmp_path, mode):
    # async through the trainer also checks that the streams a stage sends back, which the previous
    # stage takes only in its next step, never leave both waiting in the trainer's all-reduce
    over = dict(pipeline_stages=2, pipeline_mode=mode, microbatches=2 if mode == "sync" else 1)
    whole = _train(tmp_path, "whole", world=2, **over)
    first = _train(tmp_path, "halves", world=2, stop_after=1, **over)
    resumed = _train(tmp_path, "halves", world=2, resume=str(first / "last.pt"), **over)
    got, want = _state(resumed), _state(whole)
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])


# ------------------------------------------------------------------ bad input, faults
@pytest.mark.parametrize("world,over,words", [
    (1, dict(pipeline_stages=2), "pipeline_stages=2 needs 2 processes per replica, this run has 1"),
    (3, dict(pipeline_stages=2), "the 3 processes do not divide into replicas of 2 stages"),
    (3, dict(pipeline_stages=3, K=2), "pipeline_stages=3 for a model of 2 modules"),
])
def test_impossible_pipelines_are_refused_before_any_work(tmp_path, world, over, words):
    out = _train(tmp_path, "bad", world=world, **over) if world > 1 else None
    if world == 1:
        with pytest.raises(ValueError, match=words):
            _train(tmp_path, "bad", **over)
        out = tmp_path / "bad"
    messages = [(tmp_path / f"bad.rank{r}").read_text() for r in range(world) if world > 1]
    assert all(words in m for m in messages), messages
    assert not (out / "last.pt").exists()


def _disagreeing_worker(rank, settings, out):
    _train_worker(rank, {**settings, "lr": 0.05 * (rank + 1)}, None, None, out)


def test_ranks_that_disagree_on_the_config_are_refused(tmp_path):
    settings = {**RUN, "out": str(tmp_path / "run"), "pipeline_stages": 2}
    spawn(_disagreeing_worker, 2, settings, str(tmp_path / "run"))
    for rank in (0, 1):
        message = (tmp_path / f"run.rank{rank}").read_text()
        assert "ranks [1] were started with another configuration" in message


def _faulty_worker(rank, settings, fault, out):
    if rank == 1:
        real = Pipeline.step
        calls = []

        def step(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:  # the first step of epoch 2: epoch 1's checkpoint exists
                if fault == "dies":
                    os._exit(17)
                time.sleep(120)
            return real(self, *args, **kwargs)

        Pipeline.step = step
    _train_worker(rank, settings, None, None, out)


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_dead_or_silent_stage_stops_the_others_with_its_name(tmp_path, fault):
    settings = {**RUN, "out": str(tmp_path / "run"), "pipeline_stages": 2, "comm_timeout": 8}
    context = spawn(_faulty_worker, 2, settings, fault, str(tmp_path / "run"), join=False)
    start = time.perf_counter()
    rank0 = context.processes[0]
    rank0.join(90)
    elapsed = time.perf_counter() - start
    for p in context.processes:
        if p.is_alive():
            p.kill()
            p.join()
    assert not rank0.is_alive() and elapsed < 90
    message = (tmp_path / "run.rank0").read_text()
    assert "stage 1 (rank 1)" in message or "another process" in message, message
    assert "PipelineError" in message or "RuntimeError" in message
    assert ckpt.load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1  # intact, loads



def test_async_trains_the_digits_demo_as_well_as_sync(tmp_path):
    """The decoupled pipeline (one step of staleness across the cut) reaches the synchronous pipeline's
    test accuracy on the offline demo over the same epochs, within 3 points."""
    accuracy = {}
    for mode in ("sync", "async"):
        settings = {"out": str(tmp_path / mode), "pipeline_stages": 2, "pipeline_mode": mode, "workers": 0,
                    "device": "cpu", "precise_bn": 0, "comm_timeout": 120}  # a split backbone: no precise BN
        spawn(_train_worker, 2, settings, None, None, str(tmp_path / mode))
        assert not list(tmp_path.glob(f"{mode}.rank*")), (tmp_path / f"{mode}.rank0").read_text()
        summary = json.loads((tmp_path / mode / "summary.json").read_text())
        accuracy[mode] = summary["final_test_acc"]
    assert min(accuracy.values()) > 90 and abs(accuracy["async"] - accuracy["sync"]) <= 3.0, accuracy
