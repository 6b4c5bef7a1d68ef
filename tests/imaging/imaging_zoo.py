"""Operators the imaging tests share."""

import torch.nn.functional as F

from implicitlayers.imaging import LinearOperator


class Downsample(LinearOperator):
    """2x average pooling; adjoint: nearest upsampling / 4; norm 1/2 (a constant image)."""

    def forward(self, x):
        return F.avg_pool2d(x, 2)

    def adjoint(self, y):
        return F.interpolate(y, scale_factor=2, mode="nearest") / 4

    def norm_bound(self):
        return 0.5
