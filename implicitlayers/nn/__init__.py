"""Layers and tools that keep ``f`` one map through a deep equilibrium model's forward.

A DEQ calls ``f`` many times per forward; :func:`one_map` makes parametrized weights
(``spectral_norm``, ``weight_norm``) and :class:`VariationalDropout` masks the same at every
one of those calls, and new at the next forward.
"""

from ._certificate import MonotoneCertificate
from ._dropout import VariationalDropout, VariationalDropout2d
from ._lben import LBEN
from ._monotone import MonotoneCell, MonotoneConv2d, MonotoneLinear
from ._one_map import one_map
from ._splitting import ForwardBackward, PeacemanRachford

__all__ = [
    "LBEN",
    "ForwardBackward",
    "MonotoneCell",
    "MonotoneCertificate",
    "MonotoneConv2d",
    "MonotoneLinear",
    "PeacemanRachford",
    "VariationalDropout",
    "VariationalDropout2d",
    "one_map",
]
