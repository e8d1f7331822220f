"""Interpreter-only shim (TRITON_INTERPRET=1): runtime scalars as loop bounds on tritons before the fix.

The interpreter holds a scalar kernel argument (``N``, ``HW``, ``b_stop``) as a one-element 1-D
numpy array, and up to triton 3.6 its ``tensor.__index__`` was ``int(array)``, which numpy >= 2.4
refuses ("only 0-dimensional arrays can be converted to Python scalars"). Every
``range(0, N, BLOCK)`` over a runtime ``N`` goes through ``__index__``, so such kernels died in the
interpreter. Triton fixed it upstream (triton-lang/triton#9171, #9172: ``int(array.squeeze())``);
``install`` adds the same one-line fix to the interpreter's per-launch patching of
``tl.tensor``. Only ``triton.runtime.interpreter`` is touched: compiled kernels are unchanged.
"""
from __future__ import annotations

import numpy as np


def _needs_fix() -> bool:
    try:
        int(np.array([0]))
    except TypeError:
        return True
    return False


def install() -> bool:
    """Make the interpreter's ``tl.tensor.__index__`` accept one-element arrays; True if patched."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_mlaan_index_fix", False) or not _needs_fix():
        return False

    def index(self):
        return int(np.asarray(self.handle.data).squeeze())

    def patch_lang_tensor(tensor, *args, **kwargs):
        original(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if scope is not None:  # triton >= 3.4 restores patched attributes after each launch
            scope.set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patch_lang_tensor._mlaan_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
