"""DEGRADCell: the defining formula, the step-size parametrisation, and use inside a DEQ."""

import pytest
import torch
from torch import nn

import implicitlayers as il
from implicitlayers.imaging import (
    ContractiveDnCNN,
    DEGRADCell,
    DnCNN,
    GaussianBlur,
    add_noise,
)

F64 = torch.float64


class Scale(nn.Module):
    """R(x) = w * x with a learnable w: a regulariser whose gradient we know."""

    def __init__(self, w=0.3):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=F64))

    def forward(self, x):
        return self.w * x


class Shrink(nn.Module):
    """R(x) = 0.5 x + 0.1 net(x): an untrained DnCNN kept small enough for a contraction."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return 0.5 * x + 0.1 * self.net(x)


def _problem(channels=1, size=16, batch=2):
    A = GaussianBlur(5, 5.0, channels, dtype=F64)
    x_true = torch.rand(batch, channels, size, size, dtype=F64) * 2 - 1
    return A, x_true, add_noise(A(x_true), 0.01)


def test_forward_matches_the_formula():
    A, _, d = _problem()
    R = DnCNN(channels=1, depth=3, width=4, batch_norm=False).double().eval()
    x = torch.rand_like(d) * 2 - 1
    for residual in (False, True):
        cell = DEGRADCell(A, R, step_size=0.3, clamp=None, residual_regularizer=residual)
        reg = x - R(x) if residual else R(x)
        Ax = torch.nn.functional.conv2d(x, A.kernel.view(1, 1, 5, 5), padding=2)
        AtAx_d = torch.nn.functional.conv_transpose2d(Ax - d, A.kernel.view(1, 1, 5, 5), padding=2)
        expected = x - 0.3 * (AtAx_d + reg)
        torch.testing.assert_close(cell(x, d), expected, rtol=1e-6, atol=1e-7)
        assert float(cell.step_size.detach()) == pytest.approx(0.3, rel=1e-6)


@torch.no_grad()
def test_clamp():
    A, _, d = _problem()
    x = 3 * torch.randn_like(d)
    clamped = DEGRADCell(A, Scale(), step_size=0.1)(x, d)
    assert float(clamped.min()) >= -1 and float(clamped.max()) <= 1
    assert float(clamped.abs().max()) == 1.0
    raw = DEGRADCell(A, Scale(), step_size=0.1, clamp=None)(x, d)
    torch.testing.assert_close(clamped, raw.clamp(-1, 1))
    custom = DEGRADCell(A, Scale(), step_size=0.1, clamp=(0.0, 0.5))(x, d)
    assert float(custom.min()) == 0.0 and float(custom.max()) == 0.5
    with pytest.raises(ValueError, match="low < high"):
        DEGRADCell(A, Scale(), clamp=(1.0, -1.0))
    with pytest.raises(TypeError, match="clamp must be a"):
        DEGRADCell(A, Scale(), clamp=1.0)


@pytest.mark.parametrize("max_step_size", [None, 2 / 3])
def test_step_size_stays_positive_after_a_step_that_pushes_it_negative(max_step_size):
    A, _, _ = _problem()
    cell = DEGRADCell(A, Scale(), step_size=0.1, max_step_size=max_step_size)
    opt = torch.optim.SGD(cell.parameters(), lr=100.0)
    for _ in range(3):
        opt.zero_grad()
        cell.step_size.backward()  # d(eta)/d(raw) > 0: SGD drives eta towards -inf
        opt.step()
    assert 0 < float(cell.step_size.detach()) < 1e-3
    opt.zero_grad()
    (-cell.step_size * 1e6).backward()  # and now towards +inf
    opt.step()
    if max_step_size is not None:
        assert 0 < float(cell.step_size.detach()) <= max_step_size


@pytest.mark.parametrize("max_step_size", [None, 2 / 3])
def test_fixed_step_size_is_a_buffer_that_training_leaves_alone(max_step_size):
    A, _, d = _problem()
    cell = DEGRADCell(
        A, Scale(), step_size=0.4, max_step_size=max_step_size, learn_step_size=False
    ).double()
    assert [name for name, _ in cell.named_parameters()] == ["regularizer.w"]
    assert "raw_step_size" in cell.state_dict()
    opt = torch.optim.SGD(cell.parameters(), lr=1.0)
    cell(torch.zeros_like(d), d).square().sum().backward()
    opt.step()
    assert float(cell.step_size) == pytest.approx(0.4, rel=1e-6)
    with pytest.raises(TypeError, match="learn_step_size must be a bool"):
        DEGRADCell(A, Scale(), learn_step_size="no")


def test_step_size_validation():
    A = GaussianBlur(channels=1)
    with pytest.raises(ValueError, match="step_size"):
        DEGRADCell(A, Scale(), step_size=0.0)
    with pytest.raises(ValueError, match="step_size"):
        DEGRADCell(A, Scale(), step_size=0.7, max_step_size=2 / 3)
    with pytest.raises(TypeError, match=r"operator must be an implicitlayers\.imaging\.Linear"):
        DEGRADCell(lambda x: x, Scale())


def test_initial_point_cg_reduces_the_data_residual():
    A, _, d = _problem(channels=3, size=24)
    cell = DEGRADCell(A, Scale())
    adj = cell.initial_point(d)
    torch.testing.assert_close(adj, A.adjoint(d))
    cg = cell.initial_point(d, method="cg", cg_max_iter=11, tikhonov=0.01)
    assert float((A(cg) - d).norm()) < 0.5 * float((A(adj) - d).norm())
    assert not cg.requires_grad
    with pytest.raises(ValueError, match="method must be one of"):
        cell.initial_point(d, method="lsqr")
    with pytest.raises(ValueError, match="cg_max_iter must be >= 1"):
        cell.initial_point(d, method="cg", cg_max_iter=0)


def test_inside_a_deq_with_anderson_and_jfb():
    A = GaussianBlur(5, 5.0, 1)
    x_true = torch.rand(2, 1, 16, 16) * 2 - 1
    d = add_noise(A(x_true), 0.01)
    R = DnCNN(channels=1, depth=3, width=4, batch_norm=False)
    cell = DEGRADCell(A, Shrink(R), step_size=0.5)
    deq = il.DEQ(cell, solver=il.Anderson(max_iter=60, rtol=1e-5), backward=il.JFB())
    z, result = deq(d, z0=cell.initial_point(d))
    assert z.shape == d.shape
    assert bool(result.converged.all())
    loss = (z - x_true).pow(2).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in cell.named_parameters()}
    assert all(float(g.abs().sum()) > 0 for g in grads.values())
    # JFB's defining formula: the gradient of one cell application at the detached fixed point
    cell.zero_grad()
    (cell(result.z.detach(), d) - x_true).pow(2).mean().backward()
    for name, p in cell.named_parameters():
        torch.testing.assert_close(p.grad, grads[name])


def test_contractive_factory_and_its_bound():
    A = GaussianBlur(5, 5.0, 1)
    D = ContractiveDnCNN(channels=1, depth=3, width=4, input_size=(12, 12))
    cell = DEGRADCell.contractive(A, D, step_size=0.5)
    assert cell.residual_regularizer and cell.max_step_size == pytest.approx(2 / 3)
    eta = float(cell.step_size.detach())
    assert cell.lipschitz_bound() == pytest.approx(1 - eta * (1 - D.lipschitz_bound()))
    assert cell.lipschitz_bound() < 1
    with pytest.raises(TypeError, match="ContractiveDnCNN"):
        DEGRADCell.contractive(A, DnCNN(channels=1, depth=3, width=4))
    with pytest.raises(ValueError, match="step_size"):
        DEGRADCell.contractive(A, D, step_size=0.7)
    with pytest.raises(ValueError, match="no Lipschitz guarantee"):
        DEGRADCell(A, D, residual_regularizer=True).lipschitz_bound()
    big = GaussianBlur(5, 5.0, 1)
    big.kernel = big.kernel * 2
    with pytest.raises(ValueError, match="norm_bound"):
        DEGRADCell.contractive(big, D)


def test_anchor_term_moves_the_fixed_point_to_the_closed_form():
    """With R(x) = w x and no clamp, T's fixed point solves (A^T A + (w + lam) I) x = A^T d
    + lam x0: checked against a dense float64 solve, and lam = 0 is the plain cell."""
    A, _, d = _problem(size=8, batch=1)
    x0 = torch.rand_like(d) * 2 - 1
    n = d.numel()
    basis = torch.eye(n, dtype=F64).view(n, 1, 1, 8, 8)
    AtA = torch.stack([A.adjoint(A(b)) for b in basis]).reshape(n, n).T
    rhs = A.adjoint(d).flatten()
    solver = il.Anderson(max_iter=200, rtol=1e-12, atol=1e-12)
    for lam in (0.0, 0.3):
        cell = DEGRADCell(A, Scale(0.3), step_size=0.5, clamp=None, anchor_weight=lam)
        expected = torch.linalg.solve(
            AtA + (0.3 + lam) * torch.eye(n, dtype=F64), rhs + lam * x0.flatten()
        )
        with torch.no_grad():
            z = il.fixed_point(cell, torch.zeros_like(d), d, x0, solver=solver).z
        torch.testing.assert_close(z.flatten(), expected, rtol=1e-8, atol=1e-9)
    # the term is lam (x - anchor), with anchor zeros when not given (Tikhonov)
    x = torch.rand_like(d)
    plain = DEGRADCell(A, Scale(0.3), step_size=0.5, clamp=None)
    anchored = DEGRADCell(A, Scale(0.3), step_size=0.5, clamp=None, anchor_weight=0.2)
    torch.testing.assert_close(anchored(x, d, x0), plain(x, d) - 0.5 * 0.2 * (x - x0))
    torch.testing.assert_close(anchored(x, d), plain(x, d) - 0.5 * 0.2 * x)
    with pytest.raises(ValueError, match="anchor_weight"):
        DEGRADCell(A, Scale(), anchor_weight=-0.1)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_contractive_bound_with_an_anchor_is_certified(lam):
    """bound = max|1 - eta (2 + lam)|, |1 - eta (1 + lam)|) + eta Lip(D), never below what a
    power iteration measures; the anchor lowers it."""
    A = GaussianBlur(5, 5.0, 1, dtype=F64)
    D = ContractiveDnCNN(channels=1, depth=3, width=4, input_size=(12, 12)).double().eval()
    cell = DEGRADCell.contractive(A, D, step_size=0.5, anchor_weight=lam, clamp=None)
    eta, lip_d = float(cell.step_size.detach()), D.lipschitz_bound()
    linear = max(abs(1 - eta * (2 + lam)), abs(1 - eta * (1 + lam)))
    assert cell.lipschitz_bound() == pytest.approx(linear + eta * lip_d)
    d, x0 = torch.rand(2, 1, 12, 12, dtype=F64), torch.rand(2, 1, 12, 12, dtype=F64)
    from implicitlayers.imaging import estimate_lipschitz

    est = estimate_lipschitz(lambda z: cell(z, d, x0), torch.rand_like(d), power_iterations=100)
    assert 0.3 < est <= cell.lipschitz_bound()
    if lam:
        plain = DEGRADCell.contractive(A, D, step_size=0.5)
        assert cell.lipschitz_bound() < plain.lipschitz_bound()
