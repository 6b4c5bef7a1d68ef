"""Backward rules: how a fixed point is differentiated.

Subclass :class:`AbstractBackward` and implement ``adjoint`` (and ``tangent``, for forward
mode) to plug in your own.
"""

from ._base import JVP, VJP, AbstractBackward
from ._implicit import ImplicitDifferentiation
from ._jfb import JFB
from ._names import BACKWARDS
from ._neumann import Neumann
from ._phantom import NeumannPhantom, PhantomGradient
from ._shine import SHINE, SHINEResult

__all__ = [
    "BACKWARDS",
    "JFB",
    "JVP",
    "SHINE",
    "VJP",
    "AbstractBackward",
    "ImplicitDifferentiation",
    "Neumann",
    "NeumannPhantom",
    "PhantomGradient",
    "SHINEResult",
]
