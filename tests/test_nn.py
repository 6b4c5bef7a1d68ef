"""``implicitlayers.nn``: one map per forward for parametrized weights and dropout.

The spectral-norm cells get a weight whose two largest singular values are close (1 and 0.98),
so the power iteration is far from converged after its 15 warm-up steps and every further step
changes the weight in the last bits: without ``one_map`` the weight visibly moves at each call.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import implicitlayers as il
from implicitlayers.nn import VariationalDropout, VariationalDropout2d, one_map

DTYPE = torch.float64
N = 6  # state width of the linear cells; channels of the conv cells


def slow_power_iteration_matrix(rows: int, cols: int) -> Tensor:
    """A ``(rows, cols)`` matrix with singular values 1, 0.98, 0.5, 0.4, ..."""
    u, _ = torch.linalg.qr(torch.randn(rows, rows, dtype=DTYPE))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, dtype=DTYPE))
    k = min(rows, cols)
    s = torch.tensor([1.0, 0.98] + [0.5 - 0.1 * i for i in range(k - 2)], dtype=DTYPE)
    return u[:, :k] @ torch.diag(s) @ v[:, :k].T


class Cell(nn.Module):
    """``tanh(0.9 * layer(z) + x)`` that records the weight value each call reads."""

    def __init__(self, kind: str, norm: str = "spectral") -> None:
        super().__init__()
        if kind == "linear":
            layer: nn.Module = nn.Linear(N, N, dtype=DTYPE)
        else:
            layer = nn.Conv2d(N, N, 3, padding=1, dtype=DTYPE)
        with torch.no_grad():
            shape = layer.weight.shape
            layer.weight.copy_(slow_power_iteration_matrix(shape[0], shape[1:].numel()).view(shape))
        self.kind = kind
        self.layer = spectral_norm(layer) if norm == "spectral" else weight_norm(layer)
        self.seen: list[Tensor] = []

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        w = self.layer.weight  # read once per call
        self.seen.append(w.detach().clone())
        if self.kind == "linear":
            out = F.linear(z, w, self.layer.bias)
        else:
            out = F.conv2d(z, w, self.layer.bias, padding=1)
        return torch.tanh(0.9 * out + x)

    def state_shape(self) -> tuple[int, ...]:
        return (3, N) if self.kind == "linear" else (2, N, 5, 5)


def power_u(cell: Cell) -> Tensor:
    u: Tensor = cell.layer.parametrizations.weight[0]._u
    return u.clone()


def all_equal(tensors: list[Tensor]) -> bool:
    return all(torch.equal(tensors[0], t) for t in tensors[1:])


KINDS = pytest.mark.parametrize("kind", ["linear", "conv"])


# --- spectral_norm -------------------------------------------------------------------------


@KINDS
def test_without_one_map_spectral_norm_moves_at_every_call(kind: str):
    cell = Cell(kind).train()
    x = torch.randn(cell.state_shape(), dtype=DTYPE)
    z = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(6):
            z = cell(z, x)
    assert all(not torch.equal(a, b) for a, b in zip(cell.seen[:-1], cell.seen[1:], strict=True))


@KINDS
def test_one_map_freezes_spectral_norm_and_advances_the_power_iteration_once(kind: str):
    cell = Cell(kind).train()
    once = copy.deepcopy(cell)
    u0 = power_u(cell)
    once(torch.zeros(cell.state_shape(), dtype=DTYPE), torch.zeros(cell.state_shape(), dtype=DTYPE))
    x = torch.randn(cell.state_shape(), dtype=DTYPE)
    z = torch.zeros_like(x)
    with one_map(cell):
        with torch.no_grad():
            for _ in range(17):
                z = cell(z, x)
        cell(z, x)
    assert len(cell.seen) == 18
    assert all_equal(cell.seen)
    # One step of the power iteration: the same _u as one plain training-mode call.
    assert not torch.equal(power_u(cell), u0)
    assert torch.equal(power_u(cell), power_u(once))
    assert torch.equal(cell.seen[0], once.seen[0])


@KINDS
def test_one_map_sends_the_gradient_to_the_original_weight(kind: str):
    cell = Cell(kind).train()
    reference = copy.deepcopy(cell)  # same weight and power-iteration buffers
    x = torch.randn(cell.state_shape(), dtype=DTYPE)
    z = torch.zeros_like(x)
    with one_map(cell):
        with torch.no_grad():  # like a solver
            for _ in range(10):
                z = cell(z, x)
        out = cell(z.detach(), x)
    (out**2).sum().backward()

    # A plain single training-mode call advances the power iteration once as well.
    (reference(z.detach(), x) ** 2).sum().backward()
    assert torch.equal(cell.seen[-1], reference.seen[-1])

    grad = cell.layer.parametrizations.weight.original.grad
    assert grad is not None
    assert grad.abs().max() > 0
    torch.testing.assert_close(grad, reference.layer.parametrizations.weight.original.grad)
    torch.testing.assert_close(cell.layer.bias.grad, reference.layer.bias.grad)


def test_plain_parametrize_cached_loses_the_gradient_under_no_grad():
    # Why one_map fills the cache itself: torch caches whatever the first access computed.
    cell = Cell("linear").train()
    x = torch.randn(cell.state_shape(), dtype=DTYPE)
    with parametrize.cached():
        with torch.no_grad():
            z = cell(torch.zeros_like(x), x)
        out = cell(z, x)
    out.sum().backward()
    assert cell.layer.bias.grad is not None  # the bias is no parametrization: it trains
    assert cell.layer.parametrizations.weight.original.grad is None


def test_one_map_entered_under_no_grad_still_builds_the_graph():
    cell = Cell("linear").train()
    x = torch.randn(cell.state_shape(), dtype=DTYPE)
    with torch.no_grad(), one_map(cell):
        z = cell(torch.zeros_like(x), x)
        with torch.enable_grad():
            out = cell(z, x)
    out.sum().backward()
    grad = cell.layer.parametrizations.weight.original.grad
    assert grad is not None and grad.abs().max() > 0


def test_eval_mode_spectral_norm_keeps_its_buffers():
    cell = Cell("conv").eval()
    u0 = power_u(cell)
    x = torch.randn(cell.state_shape(), dtype=DTYPE)
    with one_map(cell):
        for _ in range(3):
            cell(x, x)
    assert torch.equal(power_u(cell), u0)
    assert all_equal(cell.seen)


def test_each_one_map_is_one_forward():
    cell = Cell("linear").train()
    x = torch.randn(cell.state_shape(), dtype=DTYPE)
    for _ in range(2):
        with one_map(cell):
            cell(x, x)
            cell(x, x)
    first, second = cell.seen[:2], cell.seen[2:]
    assert all_equal(first) and all_equal(second)
    assert not torch.equal(first[0], second[0])  # the power iteration advanced once more
    assert cell.layer.weight is not cell.layer.weight  # the cache is gone after exit


def test_one_map_refuses_a_cache_filled_without_history():
    cell = Cell("linear").train()
    with parametrize.cached():
        with torch.no_grad():
            cell.layer.weight  # noqa: B018 - fills torch's cache without autograd history
        message = r"'layer\.weight' \(ParametrizedLinear\) was already cached"
        with pytest.raises(RuntimeError, match=message), one_map(cell):
            pass
    with one_map(cell):  # the failed entry left nothing behind
        assert cell.layer.weight.requires_grad


# --- weight_norm ---------------------------------------------------------------------------


@KINDS
def test_one_map_caches_weight_norm_and_sends_gradients_to_both_originals(kind: str):
    cell = Cell(kind, norm="weight").train()
    reference = copy.deepcopy(cell)
    assert cell.layer.weight is not cell.layer.weight  # recomputed at every access
    x = torch.randn(cell.state_shape(), dtype=DTYPE)
    z = torch.zeros_like(x)
    with one_map(cell):
        w = cell.layer.weight
        with torch.no_grad():
            for _ in range(10):
                z = cell(z, x)
        out = cell(z.detach(), x)
        assert cell.layer.weight is w
    assert all_equal(cell.seen)
    (out**2).sum().backward()
    (reference(z.detach(), x) ** 2).sum().backward()
    for name in ("original0", "original1"):
        grad = getattr(cell.layer.parametrizations.weight, name).grad
        assert grad is not None and grad.abs().max() > 0
        torch.testing.assert_close(
            grad, getattr(reference.layer.parametrizations.weight, name).grad
        )


# --- DEQ -----------------------------------------------------------------------------------


def test_a_deq_forward_inside_one_map_sees_one_weight():
    cell = Cell("conv").train()
    deq = il.DEQ(cell, solver=il.Anderson(max_iter=40, rtol=1e-6))
    x = torch.randn(cell.state_shape(), dtype=DTYPE)
    with one_map(deq):
        z, result = deq(x)
    assert bool(result.converged.all())
    assert len(cell.seen) > 3
    assert all_equal(cell.seen)
    z.sum().backward()
    grad = cell.layer.parametrizations.weight.original.grad
    assert grad is not None and grad.abs().max() > 0


# --- variational dropout -------------------------------------------------------------------


def test_dropout_mask_is_one_per_one_map_and_used_by_the_differentiable_call():
    drop = VariationalDropout(p=0.5)
    x = torch.randn(50, 40, dtype=DTYPE)
    with one_map(drop):
        with torch.no_grad():
            outs = [drop(x) for _ in range(5)]
        mask = drop.mask
        assert mask is not None
        x_grad = x.clone().requires_grad_()
        out = drop(x_grad)
    assert all_equal([*outs, out.detach()])
    assert torch.equal(out.detach(), x * mask)
    out.sum().backward()
    assert torch.equal(x_grad.grad, mask)
    with one_map(drop):
        drop(x)
    assert drop.mask is not None
    assert not torch.equal(drop.mask, mask)  # a new mask at the next forward


def test_dropout_mask_persists_until_reset_mask():
    drop = VariationalDropout(p=0.3)
    x = torch.ones(20, 30)
    first = drop(x)
    assert torch.equal(drop(x), first)
    drop.reset_mask()
    assert drop.mask is None
    assert not torch.equal(drop(x), first)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_dropout_scales_kept_units_by_one_over_one_minus_p(p: float):
    drop = VariationalDropout(p=p)
    y = drop(torch.ones(200, 100))
    kept = y[y != 0]
    assert torch.equal(kept, torch.full_like(kept, 1.0 / (1.0 - p)))
    dropped = 1.0 - kept.numel() / y.numel()
    assert abs(dropped - p) < 4.0 * math.sqrt(p * (1 - p) / y.numel())
    assert abs(y.mean().item() - 1.0) < 0.05


def test_dropout_is_the_identity_in_eval_mode_and_for_p_zero():
    x = torch.randn(4, 5)
    assert VariationalDropout(0.5).eval()(x) is x
    assert VariationalDropout2d(0.5).eval()(x) is x
    assert VariationalDropout(0.0)(x) is x
    assert VariationalDropout2d(0)(x) is x


def test_dropout_mask_follows_the_input_dtype_and_stays_out_of_the_state_dict():
    drop = VariationalDropout(0.5)
    drop(torch.ones(3, 4, dtype=DTYPE))
    assert drop.mask is not None and drop.mask.dtype == DTYPE
    assert "mask" not in drop.state_dict()
    assert repr(drop) == "VariationalDropout(p=0.5)"


@pytest.mark.parametrize("cls", [VariationalDropout, VariationalDropout2d])
def test_dropout_refuses_a_new_shape_until_reset(cls: type[VariationalDropout]):
    drop = cls(0.5)
    drop(torch.ones(4, 3, 5, 5))
    message = r"shape \(4, 3, 5, 5\) but got an input of shape \(2, 3, 5, 5\).*reset_mask\(\)"
    with pytest.raises(ValueError, match=message):
        drop(torch.ones(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"\(4, 3, 5, 5\).*\(4, 3, 6, 6\)"):
        drop(torch.ones(4, 3, 6, 6))
    drop.reset_mask()
    assert drop(torch.ones(2, 3, 5, 5)).shape == (2, 3, 5, 5)


def test_dropout2d_mask_is_constant_over_the_spatial_dims():
    drop = VariationalDropout2d(p=0.5)
    x = torch.randn(8, 16, 7, 9)
    y = drop(x)
    mask = drop.mask
    assert mask is not None and mask.shape == (8, 16, 1, 1)
    assert torch.equal(y, x * mask)
    ratio = drop(torch.ones(8, 16, 7, 9))
    assert torch.equal(ratio, ratio[:, :, :1, :1].expand_as(ratio))
    assert 0 < int((mask == 0).sum()) < mask.numel()  # some channels dropped, some kept


def test_dropout2d_needs_feature_maps():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\), got shape \(4, 5\)"):
        VariationalDropout2d(0.5)(torch.ones(4, 5))


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_dropout_validates_p(p: float):
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        VariationalDropout(p)


@pytest.mark.parametrize("p", ["0.5", True, None])
def test_dropout_rejects_a_non_number_p(p: object):
    with pytest.raises(TypeError, match="p must be a float"):
        VariationalDropout2d(p)  # type: ignore[arg-type]


def test_dropout_rejects_integer_inputs():
    with pytest.raises(TypeError, match="floating-point input"):
        VariationalDropout(0.5)(torch.ones(3, dtype=torch.int64))


# --- nesting and plain modules -------------------------------------------------------------


class DropCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = Cell("conv")
        self.drop = VariationalDropout2d(0.5)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.drop(self.cell(z, x))


def test_nested_one_map_neither_redraws_masks_nor_refills_the_cache():
    model = DropCell().train()
    u0 = power_u(model.cell)
    x = torch.randn(model.cell.state_shape(), dtype=DTYPE)
    with one_map(model):
        u1 = power_u(model.cell)
        out = model(x, x)
        mask = model.drop.mask
        for inner in (model, model.cell, model.drop):
            with one_map(inner):
                assert model.drop.mask is mask
                assert torch.equal(model(x, x), out)
        assert torch.equal(model(x, x), out)  # the inner exits kept the outer's cache
        assert model.drop.mask is mask
    assert not torch.equal(u1, u0)
    assert torch.equal(power_u(model.cell), u1)  # advanced once, at the outer entry
    assert all_equal(model.cell.seen)


def test_one_map_of_a_submodule_first_then_the_parent():
    model = DropCell().train()
    x = torch.randn(model.cell.state_shape(), dtype=DTYPE)
    with one_map(model.cell):
        w = model.cell.layer.weight
        with one_map(model):  # covers only the not yet covered parts: the dropout
            model(x, x)
            assert model.cell.layer.weight is w
        assert model.cell.layer.weight is w


def test_an_error_inside_one_map_leaves_nothing_behind():
    model = DropCell().train()
    x = torch.randn(model.cell.state_shape(), dtype=DTYPE)
    with pytest.raises(KeyError), one_map(model):
        model(x, x)
        raise KeyError("boom")
    mask = model.drop.mask
    with one_map(model):
        assert model.drop.mask is None  # covered again: the mask was reset
        model(x, x)
    assert model.drop.mask is not mask


def test_one_map_of_a_plain_module_changes_nothing():
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    expected = lin(x)
    with one_map(lin):
        out = lin(x)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert lin.weight.grad is not None


def test_one_map_rejects_a_plain_callable():
    with pytest.raises(TypeError, match=r"module must be an nn\.Module"):  # noqa: SIM117
        with one_map(torch.tanh):  # type: ignore[arg-type]
            pass
