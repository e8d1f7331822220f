"""Per-device CUDA streams the runtime owns (the models never create or cache streams)."""
from __future__ import annotations

import torch

_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The second stream of a CUDA ``device`` (one per device): the heads run there with ``overlap``."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"side_stream: a CUDA device is needed, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]
