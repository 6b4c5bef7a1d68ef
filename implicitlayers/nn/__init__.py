"""Layers and tools that keep ``f`` one map through a deep equilibrium model's forward.

A DEQ calls ``f`` many times per forward; :func:`one_map` makes parametrized weights
(``spectral_norm``, ``weight_norm``) and :class:`VariationalDropout` masks the same at every
one of those calls, and new at the next forward.
"""

from ._dropout import VariationalDropout, VariationalDropout2d
from ._one_map import one_map

__all__ = ["VariationalDropout", "VariationalDropout2d", "one_map"]
