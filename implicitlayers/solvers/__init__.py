"""Fixed-point solvers: one algorithm per module, one shared driver loop.

Subclass :class:`AbstractSolver` and implement ``init`` and ``step`` to plug in your own.
"""

from ._anderson import Anderson
from ._base import AbstractSolver, SolverState
from ._broyden import Broyden
from ._estimate import InverseEstimate
from ._names import SOLVERS
from ._picard import Picard

__all__ = [
    "SOLVERS",
    "AbstractSolver",
    "Anderson",
    "Broyden",
    "InverseEstimate",
    "Picard",
    "SolverState",
]
