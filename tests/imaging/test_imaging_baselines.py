"""The comparison-table baselines: direct inverse, gradient descent, TV, Plug-and-Play."""

import itertools

import pytest
import torch

from implicitlayers.imaging import (
    GaussianBlur,
    LinearOperator,
    add_noise,
    direct_inverse,
    estimate_lipschitz,
    gradient_descent,
    operator_norm,
    pnp_deblur,
    psnr,
    tikhonov_cg,
    tv_deblur,
)
from implicitlayers.imaging._baselines import _grad2d, _grad2d_adjoint

F64 = torch.float64


def test_direct_inverse_is_exact_for_a_circular_blur_without_noise():
    A = GaussianBlur(5, 5.0, 3, circular=True, dtype=F64)
    x = torch.rand(2, 3, 16, 20, dtype=F64) * 2 - 1
    assert float((direct_inverse(A, A(x)) - x).abs().max()) < 1e-8
    # ... and amplifies noise: the error dwarfs the noise level, eps tempers it
    d = add_noise(A(x), 0.01)
    rmse = float((direct_inverse(A, d) - x).pow(2).mean().sqrt())
    rmse_eps = float((direct_inverse(A, d, eps=1e-2) - x).pow(2).mean().sqrt())
    assert rmse > 10 * 0.01
    assert rmse_eps < rmse
    with pytest.raises(TypeError, match="LinearOperator"):
        direct_inverse(lambda x: x, d)
    with pytest.raises(TypeError, match=r"transfer_function\(height, width\).*got _Doubled"):
        direct_inverse(_Doubled(), d)  # an operator, but not shift-invariant
    with pytest.raises(ValueError, match="eps"):
        direct_inverse(A, d, eps=-1.0)


def _piecewise_constant():
    img = -torch.ones(1, 1, 32, 32, dtype=F64)
    img[..., 8:20, 6:26] = 0.5
    img[..., 14:28, 12:18] = 1.0
    return img


def test_tv_beats_tikhonov_on_a_piecewise_constant_image():
    A = GaussianBlur(5, 5.0, 1, dtype=F64)
    img = _piecewise_constant()
    d = add_noise(A(img), 0.05, generator=torch.Generator().manual_seed(0))
    tv = tv_deblur(A, d, lam=0.02, max_iter=300)
    tik = tikhonov_cg(A, d, lam=0.03)
    assert float(psnr(tv, img, data_range=2.0)) > float(psnr(tik, img, data_range=2.0)) + 5
    with pytest.raises(ValueError, match="lam"):
        tv_deblur(A, d, lam=0.0)


def test_tv_gradient_adjoint_is_exact():
    x = torch.randn(2, 3, 7, 9, dtype=F64)
    px, py = torch.randn_like(x), torch.randn_like(x)
    gx, gy = _grad2d(x)
    lhs = float((gx * px).sum() + (gy * py).sum())
    rhs = float((x * _grad2d_adjoint(px, py)).sum())
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)


@pytest.mark.parametrize(("step_size", "tikhonov"), [(None, 0.0), (1.0, 0.0), (0.5, 0.1)])
def test_gradient_descent_decreases_the_objective_monotonically(step_size, tikhonov):
    A = GaussianBlur(5, 5.0, 1, dtype=F64)
    x_true = torch.rand(2, 1, 16, 16, dtype=F64) * 2 - 1
    d = add_noise(A(x_true), 0.01)

    def objective(x):
        return float(0.5 * (A(x) - d).pow(2).sum() + 0.5 * tikhonov * x.pow(2).sum())

    values = [objective(A.adjoint(d))]
    gradient_descent(
        A,
        d,
        max_iter=40,
        step_size=step_size,
        tikhonov=tikhonov,
        callback=lambda k, x: values.append(objective(x)),
    )
    assert len(values) == 41
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(values))
    assert values[-1] < 0.8 * values[0]


def test_gradient_descent_with_too_large_a_step_is_not_monotone():
    A = GaussianBlur(5, 5.0, 1, dtype=F64)
    d = torch.randn(1, 1, 16, 16, dtype=F64)
    values = []

    def record(k, x):
        values.append(float((A(x) - d).pow(2).sum()))

    gradient_descent(A, d, max_iter=60, step_size=2.5, callback=record)
    # modes of A^T A with eigenvalue > 0.8 (the smooth ones) grow by |1 - 2.5 lambda| > 1
    assert values[-1] > 100 * values[0]


def test_gradient_descent_default_step_is_one_over_norm_squared():
    A = GaussianBlur(5, 5.0, 1, dtype=F64)
    d = torch.randn(1, 1, 12, 12, dtype=F64)
    torch.testing.assert_close(
        gradient_descent(A, d, max_iter=5), gradient_descent(A, d, max_iter=5, step_size=1.0)
    )
    with pytest.raises(ValueError, match="step_size"):
        gradient_descent(A, d, max_iter=5, step_size=-1.0)


def test_pnp_reduces_to_gradient_descent():
    A = GaussianBlur(5, 5.0, 1, dtype=F64)
    d = add_noise(A(torch.rand(2, 1, 16, 16, dtype=F64)), 0.01)
    gd = gradient_descent(A, d, max_iter=12, step_size=0.8)
    for strength in (0.0, 1.0, 0.3):
        out = pnp_deblur(A, d, lambda v: v, max_iter=12, step_size=0.8, strength=strength)
        torch.testing.assert_close(out, gd)
    # a denoiser that halves its input, at full strength: x <- 0.5 v
    halves = pnp_deblur(A, d, lambda v: 0.5 * v, max_iter=1, step_size=0.8, strength=1.0)
    v = A.adjoint(d) - 0.8 * A.adjoint(A(A.adjoint(d)) - d)
    torch.testing.assert_close(halves, 0.5 * v)
    with pytest.raises(ValueError, match="strength"):
        pnp_deblur(A, d, lambda v: v, strength=1.5)


class _Doubled(LinearOperator):
    """An operator without norm_bound (the default inf): 2 A, so ||2 A|| is a little under 2."""

    def __init__(self):
        super().__init__()
        self.blur = GaussianBlur(5, 5.0, 1, dtype=F64)

    def forward(self, x):
        return 2 * self.blur(x)

    def adjoint(self, y):
        return 2 * self.blur.adjoint(y)


def test_operators_without_norm_bound_use_a_power_estimate():
    op = _Doubled()
    d = torch.randn(1, 1, 16, 16, dtype=F64)
    assert 1.8 < operator_norm(op, d) <= 2.0
    values = []
    gradient_descent(
        op, d, max_iter=20, callback=lambda k, x: values.append(float((op(x) - d).norm()))
    )
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(values))
    assert torch.isfinite(tv_deblur(op, d, lam=0.01, max_iter=20)).all()


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda A, d, n: tikhonov_cg(A, d, max_iter=n), "max_iter"),
        (lambda A, d, n: gradient_descent(A, d, max_iter=n), "max_iter"),
        (lambda A, d, n: tv_deblur(A, d, lam=0.1, max_iter=n), "max_iter"),
        (lambda A, d, n: pnp_deblur(A, d, lambda v: v, max_iter=n), "max_iter"),
        (lambda A, d, n: operator_norm(A, d, power_iterations=n), "power_iterations"),
        (lambda A, d, n: estimate_lipschitz(A, d, power_iterations=n), "power_iterations"),
    ],
)
def test_every_iterative_budget_is_named_in_its_errors(call, name):
    # One vocabulary: max_iter for an iterative method's budget, power_iterations for a
    # power method's; a wrong value is refused naming the argument.
    A, d = GaussianBlur(5, 5.0, 1, dtype=F64), torch.randn(1, 1, 8, 8, dtype=F64)
    with pytest.raises(ValueError, match=rf"{name} must be >= "):
        call(A, d, -1)
    with pytest.raises(TypeError, match=name):
        call(A, d, 2.5)
    assert torch.as_tensor(call(A, d, 3)).isfinite().all()
