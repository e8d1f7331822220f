"""mlaan_fast: fast, memory-lean supervised local learning (MLAAN, DGL, InfoPro) for PyTorch."""
__version__ = "0.1.0"

from mlaan_fast import ops  # noqa: E402,F401
