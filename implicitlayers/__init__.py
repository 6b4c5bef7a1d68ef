"""implicitlayers: implicit layers (deep equilibrium models) for PyTorch.

Wrap any ``f(z, *inputs)`` in :class:`DEQ` and its output becomes the fixed point
``z* = f(z*, *inputs)``, found by a pluggable solver and differentiated by a pluggable
backward rule.
"""

import logging
from importlib.metadata import PackageNotFoundError, version

from . import diagnostics as diagnostics
from . import linear as linear
from . import nn as nn
from ._cache import CacheStats, FixedPointCache
from ._deq import DEQ, DEQOutput
from ._errors import ConvergenceError, ConvergenceWarning
from ._fixed_point import fixed_point
from ._monotone_deq import CertifiedOutput, MonotoneDEQ
from ._result import SolverResult, Status
from ._unroll import unroll
from .backward import (
    JFB,
    SHINE,
    AbstractBackward,
    ImplicitDifferentiation,
    Neumann,
    NeumannPhantom,
    PhantomGradient,
)
from .linear import GMRES
from .solvers import AbstractSolver, Anderson, Broyden, Picard

try:
    __version__ = version("implicitlayers")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "DEQ",
    "GMRES",
    "JFB",
    "SHINE",
    "AbstractBackward",
    "AbstractSolver",
    "Anderson",
    "Broyden",
    "CacheStats",
    "CertifiedOutput",
    "ConvergenceError",
    "ConvergenceWarning",
    "DEQOutput",
    "FixedPointCache",
    "ImplicitDifferentiation",
    "MonotoneDEQ",
    "Neumann",
    "NeumannPhantom",
    "PhantomGradient",
    "Picard",
    "SolverResult",
    "Status",
    "__version__",
    "fixed_point",
    "unroll",
]
