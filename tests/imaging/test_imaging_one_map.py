"""NormalizedConv2d in a DEQ: one power step per forward, one map for the solve and the
gradient (the contract of ``implicitlayers.nn.one_map``)."""

import copy

import torch
from imaging_zoo import Downsample

import implicitlayers as il
from implicitlayers.imaging import ContractiveDnCNN, DEGRADCell, NormalizedConv2d

F64 = torch.float64


def _setup(seed=0):
    """A contractive DE-GRAD cell whose power vectors are far from converged (2 warm-up
    steps), so that every power step visibly changes the map."""
    torch.manual_seed(seed)
    A = Downsample()
    D = ContractiveDnCNN(channels=1, depth=3, width=4, warmup_iterations=2, input_size=(8, 8))
    cell = DEGRADCell.contractive(A, D.to(F64), step_size=0.5, clamp=None).to(F64)
    d = A(torch.rand(2, 1, 8, 8, dtype=F64) * 2 - 1)
    return cell, D, d


def _convs(module):
    return [m for m in module.modules() if isinstance(m, NormalizedConv2d)]


def _after_steps(D, steps):
    """The power vectors of a copy of ``D`` after ``steps`` more steps per layer."""
    other = copy.deepcopy(D)
    for conv in _convs(other):
        conv.calibrate(conv.input_size, steps)
    return [conv.u for conv in _convs(other)]


def _solver():
    return il.Anderson(max_iter=300, rtol=1e-12, atol=0.0)


def _implicit():
    gmres = il.GMRES(rtol=1e-12, atol=0.0, max_iter=500, restart=64)
    return il.ImplicitDifferentiation(solver=gmres)


def test_train_mode_deq_takes_exactly_one_power_step_per_forward():
    cell, D, d = _setup()
    cell.train()
    one, two = _after_steps(D, 1), _after_steps(D, 2)
    assert not any(torch.equal(a, b) for a, b in zip(one, two, strict=True))  # steps show
    deq = il.DEQ(cell, solver=_solver(), backward=il.PhantomGradient(steps=3))
    z, result = deq(d, z0=cell.initial_point(d))
    z.square().sum().backward()  # k = 3 differentiable calls of f, and their backward
    assert result.n_f_evals > 3
    for conv, expected in zip(_convs(D), one, strict=True):
        assert torch.equal(conv.u, expected)
    # The next forward takes the next step, and a plain call after it advances again.
    two_more = _after_steps(D, 1)
    deq(d, z0=cell.initial_point(d))
    assert all(torch.equal(c.u, e) for c, e in zip(_convs(D), two_more, strict=True))
    conv = _convs(D)[0]
    u = conv.u.clone()
    conv(torch.zeros(1, 1, 8, 8, dtype=F64, requires_grad=True))
    assert not torch.equal(conv.u, u)


def test_eval_mode_and_no_grad_deq_take_no_power_step():
    cell, D, d = _setup()
    before = [c.u.clone() for c in _convs(D)]
    deq = il.DEQ(cell, solver=_solver(), backward=il.JFB())
    cell.eval()
    deq(d, z0=cell.initial_point(d))
    cell.train()
    with torch.no_grad():
        deq(d, z0=cell.initial_point(d))
    assert all(torch.equal(c.u, b) for c, b in zip(_convs(D), before, strict=True))


def test_every_call_in_one_forward_sees_one_sigma():
    cell, D, d = _setup()
    cell.train()
    seen = []
    layer = _convs(D)[1]
    layer.register_forward_pre_hook(lambda m, args: seen.append(m.sigma().detach().clone()))
    deq = il.DEQ(cell, solver=_solver(), backward=il.PhantomGradient(steps=2))
    _, result = deq(d, z0=cell.initial_point(d))
    assert len(seen) == result.n_f_evals + 2  # the solve's calls and the two unrolled steps
    assert all(torch.equal(s, seen[0]) for s in seen)


def test_nested_one_map_still_one_step():
    cell, D, d = _setup()
    cell.train()
    one = _after_steps(D, 1)
    deq = il.DEQ(cell, solver=_solver(), backward=il.JFB())
    with il.nn.one_map(cell):
        deq(d, z0=cell.initial_point(d))
        deq(d, z0=cell.initial_point(d))
    assert all(torch.equal(c.u, e) for c, e in zip(_convs(D), one, strict=True))


def test_train_mode_reported_residual_holds_for_the_cell_after_forward():
    cell, _, d = _setup()
    cell.train()
    deq = il.DEQ(cell, solver=_solver(), backward=_implicit())
    z, result = deq(d, z0=cell.initial_point(d))
    assert bool(result.converged.all())
    with torch.no_grad():
        residual = torch.linalg.vector_norm((cell(z, d) - z).flatten(1), dim=1)
    assert torch.equal(residual, result.residual)


def test_train_mode_gradcheck_matches_the_solved_map():
    cell, D, d = _setup()
    cell.train()
    start = [c.u.clone() for c in _convs(D)]
    deq = il.DEQ(cell, solver=_solver(), backward=_implicit())

    def fn(dd):
        # Every evaluation from the same power vectors: one step at entry, then one map.
        for conv, u in zip(_convs(D), start, strict=True):
            conv.u = u.clone()
        return deq(dd, z0=cell.initial_point(dd.detach()))[0]

    dd = d[:1].clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (dd,), eps=1e-6, atol=1e-7, rtol=1e-6)
