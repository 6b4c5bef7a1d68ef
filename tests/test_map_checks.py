"""What the library checks about f at run time, cheaply, so that no wrong answer is reported
as SUCCESS: its output dtype, whether it is one deterministic map, and whether it treats the
samples independently when told so."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import implicitlayers as il
from implicitlayers._attach import _WARNED

F64 = torch.float64
TIGHT = il.Anderson(max_iter=200, rtol=1e-10, atol=0.0)


# --- A complex f on a real state is refused, on every path -------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"host_reads": False}, {"independent_samples": True}],
    ids=["host", "sync-free", "compacted"],
)
def test_a_complex_f_on_a_real_state_is_refused(options):
    # z = 0.5 z + x has the fixed point 2x; cast to real, the loop used to return 2 Re(x)
    # with SUCCESS.
    x = torch.tensor([[1.0 + 2.0j], [3.0 - 1.0j]], dtype=torch.complex128)
    with pytest.raises(TypeError, match=r"f returned a torch.complex128 state for a "
                       r"torch.float64 state: its imaginary part would be dropped"):  # fmt: skip
        il.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(2, 1, dtype=F64), x, **options)


def test_a_complex_f_is_refused_by_the_deq_and_a_complex_state_names_the_fix():
    x = torch.tensor([[1.0 + 2.0j]], dtype=torch.complex128)
    deq = il.DEQ(lambda z, x: 0.5 * z + x)
    with pytest.raises(TypeError, match="imaginary part would be dropped"):
        deq(x, z0=torch.zeros(1, 1, dtype=F64))
    with pytest.raises(TypeError, match=r"real floating-point .* torch.view_as_real"):
        deq(x)  # the default z0 is complex, like x


def test_the_real_and_imaginary_parts_as_a_real_state_solve_the_complex_problem():
    # The fix the error names: z = 0.5 z + x as a (re, im) tuple state.
    x = torch.tensor([[1.0 + 2.0j], [3.0 - 1.0j]], dtype=torch.complex128)

    def f(z, x):
        re, im = z
        return 0.5 * re + x.real, 0.5 * im + x.imag

    r = il.fixed_point(f, (torch.zeros(2, 1, dtype=F64),) * 2, x, solver=TIGHT)
    torch.testing.assert_close(torch.complex(*r.z), 2 * x, rtol=1e-9, atol=0)


def test_a_wider_real_f_is_solved_in_the_state_dtype():
    # A float64 f(z) for a float32 state is a precision choice (the state's dtype decides),
    # not a loss of kind: solved, in float32.
    x = torch.tensor([[1.0]], dtype=F64)
    r = il.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(1, 1), x, solver=TIGHT)
    assert r.z.dtype == torch.float32 and r.converged.all() and r.z.item() == 2.0


def test_running_rows_select_the_inputs_batched_like_the_state_only():
    # A batch of 4 states of 2 features, an input batched like them and a shared (2,) shift:
    # the samples stop at different steps, and only the batched input is cut to the running
    # rows (a shift whose length is the feature count is shared, not a batch).
    x = torch.tensor([[1.0, 0.0], [10.0, 5.0], [100.0, 0.0], [1000.0, 1.0]], dtype=F64)
    shift = torch.tensor([0.5, -2.0], dtype=F64)
    solver = il.Picard(max_iter=200, rtol=0.0, atol=1e-9)  # the larger, the more steps
    r = il.fixed_point(
        lambda z, x, s: 0.5 * z + x + s, torch.zeros(4, 2, dtype=F64), x, shift,
        solver=solver, independent_samples=True,
    )  # fmt: skip
    assert len(set(r.n_steps.tolist())) > 1 and r.converged.all()
    torch.testing.assert_close(r.z, 2 * (x + shift), rtol=0, atol=4e-9)  # twice atol


# --- A random f does not pass silently ------------------------------------------------------


class DropoutCell(nn.Module):
    """A contraction with dropout inside: a new mask at every call in training mode."""

    def __init__(self, dropout: nn.Module) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8, dtype=F64)
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, 2))
        self.drop = dropout

    def forward(self, z, x):
        return self.drop(torch.tanh(self.lin(z) + x))


@pytest.fixture
def fresh_warnings():
    _WARNED.clear()
    yield
    _WARNED.clear()


def test_nn_dropout_in_f_is_named_with_the_fix(fresh_warnings):
    torch.manual_seed(0)
    deq = il.DEQ(DropoutCell(nn.Dropout(0.1)), solver=il.Anderson(max_iter=30, rtol=1e-3))
    x = torch.randn(16, 8, dtype=F64)
    with pytest.warns(il.ConvergenceWarning, match=r"f is not one deterministic map: .* "
                      r"implicitlayers\.nn\.VariationalDropout"):  # fmt: skip
        deq(x)
    # Once per process: the next forward is quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq(x)


def test_variational_dropout_and_eval_mode_are_one_map_and_stay_quiet(fresh_warnings):
    torch.manual_seed(0)
    x = torch.randn(16, 8, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq = il.DEQ(DropoutCell(il.nn.VariationalDropout(0.1)), solver=TIGHT)
        _, result = deq(x)
        assert result.converged.all()
        deq = il.DEQ(DropoutCell(nn.Dropout(0.1)).eval(), solver=TIGHT)
        _, result = deq(x)
        assert result.converged.all()
        # Batch norm in training mode couples the samples but is deterministic: quiet too.
        bn = nn.Sequential(nn.Linear(8, 8, dtype=F64), nn.BatchNorm1d(8, dtype=F64))
        deq = il.DEQ(lambda z, x: 0.3 * torch.tanh(bn(z)) + x, solver=TIGHT)
        deq(x)


# --- independent_samples=True on an f that couples the samples raises -----------------------


def test_independent_samples_on_a_coupled_f_raises_with_the_fix():
    # The batches guide's own example: a batch mean. Alone, each sample converges to a fixed
    # point of its own sub-batch map; the returned batch is no fixed point of the whole map
    # (residual 14 to 24 where the solve reported 1e-9 and SUCCESS).
    f = lambda z, x: 0.5 * z + x + 0.4 * z.mean(0, keepdim=True)  # noqa: E731
    x = torch.tensor([[1.0], [2.0], [3.0], [40.0]], dtype=F64)
    solver = il.Anderson(max_iter=300, rtol=1e-6, atol=0.0)
    message = (
        r"independent_samples=True, but f couples the samples: 4 samples \(0, 1, 2, 3\).*"
        r"solve with independent_samples=False"
    )
    z0 = torch.zeros(4, 1, dtype=F64)
    with pytest.raises(ValueError, match=message):
        il.fixed_point(f, z0, x, solver=solver, independent_samples=True)
    # The default path solves it.
    r = il.fixed_point(f, torch.zeros(4, 1, dtype=F64), x, solver=solver)
    assert r.converged.all()
    residual = (f(r.z, x) - r.z).abs().squeeze(1)
    assert (residual <= 1e-6 * f(r.z, x).abs().squeeze(1)).all()


def test_independent_samples_on_an_independent_f_keeps_every_result():
    # The check evaluates the whole returned batch once, and a sub-batch rounding differently
    # from the whole batch is no coupling.
    gen = torch.Generator().manual_seed(0)
    W = 0.5 * torch.linalg.qr(torch.randn(32, 32, generator=gen))[0]
    x = torch.randn(64, 32, generator=gen)
    rates = torch.linspace(0.1, 0.95, 64)[:, None]
    f = lambda z, x, r: torch.tanh(r * (z @ W.T) + x)  # noqa: E731
    solver = il.Picard(max_iter=500, rtol=1e-6)
    dense = il.fixed_point(f, torch.zeros(64, 32), x, rates, solver=solver)
    sparse = il.fixed_point(f, torch.zeros(64, 32), x, rates, solver=solver,
                            independent_samples=True)  # fmt: skip
    assert sparse.converged.all() and torch.equal(sparse.n_steps, dense.n_steps)
    assert sparse.n_f_evals == int(sparse.n_steps.max()) + 1
