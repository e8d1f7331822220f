"""Modules: auxiliary heads, EMA shadows, LAM."""
from mlaan_fast.nn.dgl_head import DGLAuxHead
from mlaan_fast.nn.ema_shadow import EMAShadow
from mlaan_fast.nn.infopro_head import InfoProAuxHead
from mlaan_fast.nn.lam import LAM
from mlaan_fast.nn.linear_head import LinearAuxHead

__all__ = ["LAM", "DGLAuxHead", "EMAShadow", "InfoProAuxHead", "LinearAuxHead"]
