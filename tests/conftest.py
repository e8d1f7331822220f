"""Test setup: Triton runs in interpreter mode on CPU tensors when no GPU is present."""
import os

import torch

if not torch.cuda.is_available():
    # Must happen before any Triton kernel is defined (they read it at decoration time).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def _versions() -> str:
    import platform

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    device = f"CUDA {torch.cuda.get_device_name()}" if HAS_CUDA else "no GPU"
    return (f"Python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}, "
            f"{torch.get_num_threads()} threads, {device}")


def pytest_report_header(config):
    return f"mlaan_fast tests on {_versions()}"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    # repeated at the end: a CI log that keeps only its tail still says which versions failed
    terminalreporter.write_line(f"ran on {_versions()}")


def pytest_sessionfinish(session, exitstatus):
    # A selection with no tests (exit code 5) is not a failure of the suite.
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread than with two OpenMP threads competing for shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
