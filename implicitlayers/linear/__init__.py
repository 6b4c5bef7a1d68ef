r"""Linear solvers: batched, matrix-free solves of :math:`A_b x_b = r_b`.

The adjoint equation of implicit differentiation, :math:`(I - J^\top) u = g`, is linear;
a Krylov solver such as :class:`GMRES` solves it from vector-Jacobian products alone, and
needs only :math:`I - J^\top` invertible. :class:`CG` solves symmetric positive definite
systems (a Tikhonov reconstruction, a symmetric :math:`J`). Subclass
:class:`AbstractLinearSolver` and implement ``solve`` to plug in your own.
"""

from ._base import AbstractLinearSolver, MatVec
from ._cg import CG
from ._gmres import GMRES

__all__ = ["CG", "GMRES", "AbstractLinearSolver", "MatVec"]
