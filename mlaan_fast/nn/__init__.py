"""Modules: auxiliary heads, EMA shadows, LAM."""
from mlaan_fast.nn.dgl_head import DGLAuxHead  # noqa: E402
from mlaan_fast.nn.infopro_head import InfoProAuxHead  # noqa: E402
from mlaan_fast.nn.lam import LAM  # noqa: E402
from mlaan_fast.nn.ema_shadow import EMAShadow  # noqa: E402,F401
from mlaan_fast.nn.linear_head import LinearAuxHead  # noqa: E402,F401
