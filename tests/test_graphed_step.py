"""GraphedLocalStep: a replayed CUDA graph gives the eager step's gradients, step after step."""
import copy

import pytest
import torch
from tolerance import assert_all_close_scaled, assert_close_scaled

from mlaan_fast.models import build_model
from mlaan_fast.runtime import GraphedLocalStep

pytestmark = pytest.mark.usefixtures("one_thread")


def test_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only error")
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        GraphedLocalStep(build_model("resnet20", K=3, method="mlaan"))


def _train(model, steps, step_fn, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outs = []
    for images, targets in batches[:steps]:
        opt.zero_grad(set_to_none=True)
        outs.append(step_fn(images, targets))
        opt.step()
        model.update_shadows()
    return outs


@pytest.mark.gpu
@pytest.mark.parametrize("method,overlap", [("mlaan", False), ("mlaan", True), ("dgl+mlaan", True),
                                            ("infopro+mlaan", True)])
def test_graph_replay_matches_eager(method, overlap):
    torch.manual_seed(0)
    eager = build_model("resnet20", K=4, method=method).cuda()
    graphed_model = copy.deepcopy(eager)
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(32, 3, 32, 32, device="cuda", generator=g),
                torch.randint(0, 10, (32,), device="cuda", generator=g)) for _ in range(5)]
    step = GraphedLocalStep(graphed_model, warmup=2, overlap=overlap)
    want = _train(eager, 5, eager.local_step, batches)
    got = _train(graphed_model, 5, step, batches)
    assert step.num_graphs == 1  # steps 3..5 replayed the graph captured at step 3
    # cuDNN's backward kernels may sum in another order from one run to the next: every tensor is
    # compared to its own magnitude (rtol 1e-4 of its largest element after 5 SGD steps).
    for a, b in zip(want, got):
        assert_close_scaled(b["loss"], a["loss"], rtol=1e-4, name="loss")
        assert_close_scaled(b["logits"], a["logits"], rtol=1e-4, name="logits")
    state = {n: p.detach() for n, p in eager.named_parameters()} | dict(eager.named_buffers())
    graphed_state = ({n: p.detach() for n, p in graphed_model.named_parameters()}
                     | dict(graphed_model.named_buffers()))
    floating = [n for n in state if state[n].is_floating_point()]
    assert_all_close_scaled({n: graphed_state[n] for n in floating}, {n: state[n] for n in floating},
                            rtol=1e-4)
    assert all(torch.equal(graphed_state[n], state[n]) for n in state if n not in floating)


@pytest.mark.gpu
def test_graph_rejects_ambient_autocast_and_cpu_tensors():
    model = build_model("resnet20", K=3, method="mlaan").cuda()
    step = GraphedLocalStep(model, amp_dtype=torch.bfloat16)
    x, t = torch.randn(4, 3, 32, 32, device="cuda"), torch.randint(0, 10, (4,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), \
            pytest.raises(RuntimeError, match="outside torch.autocast"):
        step(x, t)
    with pytest.raises(ValueError, match="CUDA device"):
        step(x.cpu(), t.cpu())


@pytest.mark.gpu
def test_other_batch_shapes_run_eagerly_beyond_max_graphs():
    model = build_model("resnet20", K=3, method="mlaan").cuda()
    step = GraphedLocalStep(model, warmup=1, max_graphs=1)
    for n in (8, 8, 8, 5, 5, 5):
        out = step(torch.randn(n, 3, 32, 32, device="cuda"), torch.randint(0, 10, (n,), device="cuda"))
        assert out["logits"].shape == (n, 10)
    assert step.num_graphs == 1
