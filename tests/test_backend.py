"""Backend discovery, forcing (context manager and environment variable) and the `mlaan-fast info` report."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import mlaan_fast.ops as ops
from mlaan_fast.cli import main as cli_main
from mlaan_fast.ops import (
    BACKENDS,
    BackendUnavailableError,
    _backend,
    available_backends,
    select_backend,
    use_backend,
)

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_env_force(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


def _fake_avail(monkeypatch, **usable):
    table = {}
    for name in BACKENDS:
        ok = usable.get(name, True)
        table[name] = (ok, f"{name} {'works' if ok else 'is broken'} here")
    monkeypatch.setattr(_backend, "available_backends", lambda: dict(table))


def test_available_backends_reports_every_backend():
    avail = available_backends()
    assert set(avail) == {"reference", "cpu", "cuda", "triton"} == set(BACKENDS)
    for name, (usable, reason) in avail.items():
        assert isinstance(usable, bool) and isinstance(reason, str) and reason, name
    assert avail["reference"][0]
    if not torch.cuda.is_available():
        assert not avail["cuda"][0]
    # The answer is a fresh dict: callers may not corrupt the cache.
    avail["reference"] = (False, "x")
    assert available_backends()["reference"][0]


def test_automatic_selection(monkeypatch):
    _fake_avail(monkeypatch)
    monkeypatch.setattr(_backend, "triton_interpreted", lambda: False)
    assert select_backend("op", CPU) == "cpu"
    assert select_backend("op", CUDA) == "cuda"
    assert select_backend("op", CUDA, gpu_order=("triton", "cuda")) == "triton"
    _fake_avail(monkeypatch, cuda=False)
    assert select_backend("op", CUDA) == "triton"
    _fake_avail(monkeypatch, cuda=False, triton=False, cpu=False)
    assert select_backend("op", CUDA) == "reference"
    assert select_backend("op", CPU) == "reference"


def test_use_backend_forces_and_restores():
    assert _backend.forced_backend() is None
    with use_backend("reference"):
        assert _backend.forced_backend() == "reference"
        assert select_backend("op", CPU) == "reference"
        with use_backend(None):
            assert _backend.forced_backend() is None
        with use_backend("reference"):
            pass
        assert _backend.forced_backend() == "reference"
    assert _backend.forced_backend() is None
    with pytest.raises(RuntimeError, match="boom"), use_backend("reference"):
        raise RuntimeError("boom")
    assert _backend.forced_backend() is None


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert select_backend("op", CPU) == "reference"
    with use_backend(None):  # an explicit automatic block wins over the environment
        assert select_backend("op", CPU) == ("cpu" if available_backends()["cpu"][0] else "reference")
    monkeypatch.setenv(_backend.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=r"MLAAN_FAST_BACKEND: unknown backend 'fastest'"):
        select_backend("op", CPU)
    monkeypatch.setenv(_backend.ENV_VAR, "")
    assert _backend.forced_backend() is None


@pytest.mark.parametrize("op", ["aux_head_loss", "ema_update_"])
def test_unknown_environment_backend_is_a_one_line_error(monkeypatch, op):
    """A misspelt MLAAN_FAST_BACKEND stops every op with one line naming the variable and the choices."""
    monkeypatch.setenv(_backend.ENV_VAR, "cuda ")
    x = torch.randn(2, 3)
    with pytest.raises(ValueError) as caught:
        if op == "aux_head_loss":
            ops.aux_head_loss(x, torch.randn(4, 3), None, torch.tensor([0, 1]))
        else:
            ops.ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.5)
    assert str(caught.value) == ("MLAAN_FAST_BACKEND: unknown backend 'cuda '; choose one of "
                                 "reference, cpu, cuda, triton")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'.*reference, cpu, cuda, triton"):
        with use_backend("gpu"):
            pass


def test_forcing_unusable_backend_raises(monkeypatch):
    _fake_avail(monkeypatch, cpu=False)
    with use_backend("cpu"), pytest.raises(BackendUnavailableError,
                                           match=r"'cpu' was forced.*cpu is broken here"):
        select_backend("ema_update_", CPU)
    with use_backend("cpu"), pytest.raises(BackendUnavailableError, match="ema_update_"):
        ops.ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.5)


def test_forcing_backend_on_wrong_device_raises(monkeypatch):
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
        select_backend("op", CPU)
    _fake_avail(monkeypatch)
    with use_backend("cpu"), pytest.raises(BackendUnavailableError, match="cannot run on cuda tensors"):
        select_backend("op", CUDA)
    monkeypatch.setattr(_backend, "triton_interpreted", lambda: False)
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="interpreter mode"):
        select_backend("op", CPU)


def test_real_unusable_backend_is_an_error():
    """Without monkeypatching: whatever is unusable on this machine cannot be forced."""
    for name, (usable, _why) in available_backends().items():
        if not usable:
            with use_backend(name), pytest.raises(BackendUnavailableError, match="unavailable"):
                select_backend("op", CUDA if name in ("cuda", "triton") else CPU)


def test_ops_route_through_the_forced_backend(monkeypatch):
    import mlaan_fast.ops.ema as ema

    seen = []
    monkeypatch.setattr(ema, "_reference", lambda s, t, d: seen.append("reference"))
    with use_backend("reference"):
        ops.ema_update_([torch.zeros(2)], [torch.zeros(2)], 0.5)
    assert seen == ["reference"]


def test_info_command_lists_every_backend(capsys):
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    _check_info(out)


def test_info_command_entry_point():
    out = subprocess.run([sys.executable, "-m", "mlaan_fast", "info"], capture_output=True, text=True,
                         timeout=120, env={**_env(), _backend.ENV_VAR: "reference"})
    assert out.returncode == 0, out.stderr
    _check_info(out.stdout)
    assert "forced by MLAAN_FAST_BACKEND: reference" in out.stdout


def _check_info(out):
    assert "torch" in out and "backends:" in out
    lines = out[out.index("backends:"):].splitlines()[1:]
    for name, (usable, _reason) in available_backends().items():
        row = [line for line in lines if line.split() and line.split()[0] == name]
        assert len(row) == 1, (name, out)
        assert ("yes" if usable else "no") == row[0].split()[1]


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != _backend.ENV_VAR}


def _nvcc_major():
    """The CUDA major version of the nvcc on PATH ('13'), or None."""
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.", out)
    return m.group(1) if m else None


@pytest.mark.skipif(shutil.which("nvcc") is None or torch.version.cuda is None
                    or os.environ.get("MLAAN_FAST_SKIP_CUDA") == "1",
                    reason="no nvcc on PATH or a CPU-only torch: the CUDA sources are not built here")
@pytest.mark.skipif(shutil.which("nvcc") is not None and torch.version.cuda is not None
                    and _nvcc_major() != torch.version.cuda.split(".")[0],
                    reason="nvcc and torch are of different CUDA major versions: setup.py skips the CUDA "
                           "sources")
def test_cuda_sources_were_compiled_where_nvcc_exists():
    """Where a toolkit exists the build must include kernels/*.cu (a broken .cu then fails the build)."""
    import mlaan_fast._C as ext

    assert ext.with_cuda == 1, "nvcc is on PATH but mlaan_fast._C was built without its CUDA kernels"


def test_cpp_error_messages_arrive_whole():
    """_C shares torch's C++ runtime: a message assembled from several parts (numbers formatted by the
    C++ streams) arrives whole. With a private static libstdc++ in _C it came back cut after its first
    part here and crashed the process on the GPU image (setup.py's torch_libstdcxx)."""
    bad = [torch.zeros(3, dtype=torch.float64)]
    with pytest.raises(TypeError, match=r"^ema_update_: shadow\[0\] must be float32"):
        torch.ops.mlaan_fast.ema_update_(bad, bad, 0.5)
    features, weight, target = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 9, 2])
    with pytest.raises(ValueError, match=r"target\[2\] = 9 is outside the class range \[0, 5\)"):
        torch.ops.mlaan_fast.aux_head_loss(features, weight, None, target, "mean", 0.0, True)
