"""Warnings attributed to the user's line, however deep in the library they are raised."""

from __future__ import annotations

import os
import sys
import warnings

import torch

#: Frames in these folders are skipped: the library's own, and torch's (``nn.Module.__call__``
#: between the user's ``deq(x)`` and ``DEQ.forward``).
_SKIPPED = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__)
)


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` with the ``stacklevel`` of the first frame outside this package and
    torch.

    A fixed ``stacklevel`` breaks whenever a call path gains a frame (a refactor, a wrapper,
    ``DEQ`` calling ``fixed_point``); walking the stack keeps the warning on the user's line
    from every entry point. (Python 3.12's ``skip_file_prefixes`` does this; 3.10 lacks it.)
    """
    frame = sys._getframe(0)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
