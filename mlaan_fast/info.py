"""What this installation is: versions, build, devices, backends."""
from __future__ import annotations

import os
import platform

import torch


def collect_info() -> dict:
    """A dict describing versions, the compiled extension, devices and backend availability."""
    import mlaan_fast
    from mlaan_fast.ops._backend import available_backends, extension_has_cuda, load_extension

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # pragma: no cover - depends on the machine
        triton_version = f"not importable ({type(exc).__name__})"
    module, why = load_extension()
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB)")
    devices.append(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
                   f"{torch.get_num_threads()} torch threads")
    return {
        "mlaan_fast": mlaan_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "extension": {
            "loaded": module is not None,
            "path": getattr(module, "__file__", None),
            "cuda_kernels": extension_has_cuda(),
            "detail": why,
        },
        "devices": devices,
        "backends": {k: {"usable": v[0], "reason": v[1]} for k, v in available_backends().items()},
        "forced_backend": os.environ.get("MLAAN_FAST_BACKEND"),
    }


def format_info(info: dict) -> str:
    """Human-readable rendering of :func:`collect_info`."""
    ext = info["extension"]
    lines = [
        f"mlaan_fast {info['mlaan_fast']}  python {info['python']}  torch {info['torch']} "
        f"(CUDA {info['torch_cuda'] or 'none'})  triton {info['triton']}",
        f"extension: {'loaded' if ext['loaded'] else 'NOT loaded'}"
        + (f" from {ext['path']}" if ext["path"] else "")
        + f"; CUDA kernels compiled: {'yes' if ext['cuda_kernels'] else 'no'}",
    ]
    if not ext["loaded"]:
        lines.append(f"  {ext['detail']}")
    lines.append("devices:")
    lines += [f"  {d}" for d in info["devices"]]
    lines.append("backends:")
    for name, b in info["backends"].items():
        lines.append(f"  {name:<9} {'yes' if b['usable'] else 'no ':<3}  {b['reason']}")
    if info["forced_backend"]:
        lines.append(f"forced by MLAAN_FAST_BACKEND: {info['forced_backend']}")
    return "\n".join(lines)
