"""torch.compile for a LocalModel's training step: what is compiled, and the setting it runs under.

Each part (a backbone module, a LAM, an auxiliary head: see PARTS) gets a compiled forward of its
own, used in training mode; in eval mode the part runs eagerly (evaluation would compile a second
set of graphs, and more for a last partial batch). Module hooks stay outside.

The forward-once schedule back-propagates through a module's graph twice (an input-only VJP with
``retain_graph=True``, then the parameter backward), which AOTAutograd's donated buffers forbid,
so a compiled model's steps run with them off (:func:`compiled_step`), and only those steps.
"""
from __future__ import annotations

import types
from contextlib import nullcontext

import torch
import torch._functorch.config as functorch_config
from torch import nn

PARTS = ("modules", "lams", "heads")


def _own_code(fn):
    """A function calling ``fn`` whose code object is its own.

    Dynamo keeps one cache per code object, and a model's modules share ``nn.Sequential.forward``:
    compiled alike, they would get graphs for dynamic shapes, and past ``recompile_limit`` (8)
    entries the remaining ones would run eagerly."""

    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    code = call.__code__.replace()
    return types.FunctionType(code, call.__globals__, call.__name__, None, call.__closure__)


def _compiled_forward(module: nn.Module, **kwargs):
    """``module``'s forward, compiled in training mode and eager in eval mode."""
    eager = module.forward
    compiled = torch.compile(_own_code(eager), **kwargs)

    def forward(*args, **kw):
        return compiled(*args, **kw) if module.training else eager(*args, **kw)

    return forward


def parts_of(model, parts) -> list[nn.Module]:
    """The submodules of ``model`` that ``parts`` (a subset of PARTS) names."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"compile: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    chosen = []
    if "modules" in parts:
        chosen += list(model.local_modules)
    if "lams" in parts:
        chosen += list(model.lams.values())
    if "heads" in parts:
        chosen += list(model.ind_heads.values()) + list(model.casc_heads.values())
    return chosen


def compile_parts(model, parts=PARTS, **kwargs) -> None:
    """Give every part named in ``parts`` a ``torch.compile(**kwargs)`` forward for training mode."""
    for module in parts_of(model, parts):
        module.forward = _compiled_forward(module, **kwargs)


def compiled_step():
    """The context a compiled model's ``local_step`` runs in: AOTAutograd's donated buffers off.

    torch reads the flag when it compiles a graph and again at each backward, so it must cover
    the whole step."""
    if not hasattr(functorch_config, "donated_buffer"):  # a torch without donated buffers
        return nullcontext()
    return functorch_config.patch(donated_buffer=False)
