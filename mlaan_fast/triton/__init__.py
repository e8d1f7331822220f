"""Triton kernels and their launchers, one module per op."""
import os

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    from mlaan_fast.triton._interpreter import install as _install_interpreter_fix

    _install_interpreter_fix()
