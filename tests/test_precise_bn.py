"""BatchNorm statistics recomputed before an evaluation: exact averages, nothing else touched."""
import copy

import pytest
import torch
from torch import nn

from mlaan_fast.models import build_model
from mlaan_fast.runtime.pipeline.engine import pipeline_supported
from mlaan_fast.train.config import resolve_config
from mlaan_fast.train.precise_bn import recompute_batchnorm_statistics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_statistics_are_the_average_over_the_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1),
                        nn.BatchNorm2d(5)).double()
    batches = [torch.randn(n, 3, 6, 5, dtype=torch.float64) * 3 + 1 for n in (4, 4, 3)]
    net.eval()
    params = copy.deepcopy(net.state_dict())
    used = recompute_batchnorm_statistics(net, iter(batches), images=10)  # 4 + 4 + the first 2 of 3
    assert used == 10 and not net.training and not net[1].training  # modes kept
    assert net[1].momentum == 0.1 and int(net[1].num_batches_tracked) == 0
    want_mean, want_var = [], []
    with torch.no_grad():
        for x in (batches[0], batches[1], batches[2][:2]):
            z = net[0](x)
            want_mean.append(z.mean((0, 2, 3)))
            want_var.append(z.var((0, 2, 3), unbiased=True))
    torch.testing.assert_close(net[1].running_mean, torch.stack(want_mean).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[1].running_var, torch.stack(want_var).mean(0), rtol=1e-12, atol=1e-12)
    for name, value in params.items():  # weights untouched; only the running statistics moved
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(net.state_dict()[name], value)


def test_a_local_models_backbone_changes_and_nothing_else():
    model = build_model("resnet20", K=4, method="mlaan").train()
    before = copy.deepcopy(model.state_dict())
    images = torch.randn(8, 3, 32, 32)
    assert recompute_batchnorm_statistics(model.local_modules, [images], images=8) == 8
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("local_modules.") and "running_" in k for k in changed)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_the_demo_uses_it_and_a_pipeline_refuses_it():
    assert resolve_config({}).precise_bn == 256
    assert resolve_config({"dataset": "cifar10"}).precise_bn == 0
    if pipeline_supported():
        with pytest.raises(ValueError, match="precise_bn"):
            resolve_config({"pipeline_stages": 2})
        assert resolve_config({"pipeline_stages": 2, "precise_bn": 0}).pipeline_stages == 2
    else:
        with pytest.raises(ValueError, match="needs torch >= 2.7"):
            resolve_config({"pipeline_stages": 2, "precise_bn": 0})
