"""torch.compile: a compiled step has the eager gradients (inductor, and AOTAutograd for every method);
`train --compile` runs.

Compiling is slow on a CPU: both methods of the inductor test cut ResNet-20 into the same K = 4
modules, so the second reuses the first's graphs from inductor's cache, and each compiled model
serves both schedules.
"""
from types import SimpleNamespace

import pytest
import torch
import torch._functorch.config as functorch_config
from tolerance import assert_all_close_scaled, assert_close_scaled
from torch import nn

from mlaan_fast.cli import main
from mlaan_fast.models import build_model
from mlaan_fast.models.compiled import compile_parts
from mlaan_fast.models.schedules import get_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def trainable_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def twins(method, batch, dtype, device="cpu", **compile_kwargs):
    """(eager model, the same model compiled, images, targets)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 32, 32, generator=g, dtype=dtype).to(device)
    targets = torch.randint(0, 10, (batch,), generator=g).to(device)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("resnet20", K=1 if method == "e2e" else 4, method=method)
        models.append(model.to(device=device, dtype=dtype))
    models[1].compile_modules(**compile_kwargs)
    return (*models, images, targets)


def assert_same_steps(eager, compiled, images, targets, atol=0.0):
    """One step of each schedule on both models: the same losses and gradients."""
    donated = functorch_config.donated_buffer
    for schedule in ("once", "straightforward"):
        for model in (eager, compiled):
            model.schedule = get_schedule(schedule)
            model.zero_grad(set_to_none=True)
        want, got = eager.local_step(images, targets), compiled.local_step(images, targets)
        assert_close_scaled(got["loss"], want["loss"], name=f"{schedule} loss")
        assert_all_close_scaled(trainable_grads(compiled), trainable_grads(eager), atol=atol)
        assert functorch_config.donated_buffer == donated  # switched off for the step only


@pytest.mark.parametrize("method, device", [
    ("mlaan", "cpu"), ("dgl+mlaan", "cpu"),
    pytest.param("mlaan", "cuda", marks=pytest.mark.gpu),
    pytest.param("dgl+mlaan", "cuda", marks=pytest.mark.gpu),
])
def test_inductor_step_has_the_eager_gradients(method, device):
    # fp64: in fp32 the compiled forward's rounding flips a few ReLU masks, which moves whole
    # gradient tensors by up to about 1e-2 of their magnitude; in fp64 it stays at rounding.
    # atol: a Linear's bias before BatchNorm1d (DGL head) has a zero gradient, rounding noise.
    eager, compiled, images, targets = twins(method, 8, torch.float64, device)
    assert_same_steps(eager, compiled, images, targets, atol=1e-12)
    compiled.eval()
    torch.testing.assert_close(compiled(images), eager.eval()(images))  # eval mode runs eagerly


@pytest.mark.parametrize("method", ["e2e", "dgl", "infopro", "infopro+mlaan"])  # the others: above
def test_other_methods_run_compiled_through_aot_autograd(method):
    # aot_eager traces and partitions as inductor does (donated buffers included), generating no code
    assert_same_steps(*twins(method, 4, torch.float32, backend="aot_eager"))


def test_every_module_gets_a_compile_cache_of_its_own():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    modules = nn.ModuleList(nn.Sequential(nn.Linear(4 + i, 4 + i)) for i in range(12))  # > recompile_limit
    compile_parts(SimpleNamespace(local_modules=modules), ("modules",), backend=backend)
    for i, module in enumerate(modules):
        module(torch.randn(2, 4 + i))
    assert len(graphs) == len(modules)


def test_cli_train_compile_runs_the_demo(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--compile", "--K", "2", "--epochs", "1", "--max-steps-per-epoch", "2", "--workers", "0",
            "--out", str(out)]  # K = 2: the fewest modules with a window across two of them
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "epoch 1/1" in text and (out / "last.pt").is_file()
    assert "--compile on a CPU" in text
