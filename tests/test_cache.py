r"""FixedPointCache: stored fixed points as initial states, and what keeps them honest.

On the zoo's affine map :math:`z = W z + U x + b` (:math:`\|W\|_2 = \rho`) the fixed point is
known in closed form, and an iterate with residual :math:`r` is within :math:`r / (1 - \rho)`
of it: a cached start can only change the answer within the solver's tolerance.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from cache_ddp_worker import SHARD, run_ranks
from torch.func import vmap
from zoo import Affine, AffineModule

import implicitlayers as il

F64 = torch.float64
SOLVER = il.Anderson(max_iter=200, rtol=0.0, atol=1e-12)


def make(contraction=0.8, **cache_options):
    problem = Affine.make(n=6, d=3, contraction=contraction)
    cache = il.FixedPointCache(**cache_options)
    deq = il.DEQ(AffineModule(problem), solver=SOLVER, cache=cache)
    return problem, cache, deq


def inputs(batch=4, seed=0):
    return torch.randn(batch, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))


def zeros(batch=4):
    return torch.zeros(batch, 6, dtype=F64)


# --- Reuse --------------------------------------------------------------------------------------


def test_a_repeated_sample_starts_from_its_fixed_point():
    problem, cache, deq = make()
    x = inputs()
    first = deq(x, z0=zeros(), keys=torch.arange(4))
    again = deq(x, z0=zeros(), keys=torch.arange(4))
    assert first.from_cache.tolist() == [False] * 4
    assert again.from_cache.tolist() == [True] * 4
    # Started at z*: converged at the first evaluation.
    assert again.result.n_steps.tolist() == [1] * 4 < first.result.n_steps.tolist()
    torch.testing.assert_close(again.z, problem.solution(x), rtol=0, atol=1e-11)
    assert cache.stats.hits == 4 and cache.stats.misses == 4 and cache.stats.stored == 8


def test_a_cached_start_never_changes_the_answer_beyond_the_tolerance():
    # The parameters move between the solves (a training step): the cached states are no
    # longer fixed points, but the solve from them meets the same tolerance, so it is within
    # atol / (1 - rho) of the new fixed point, as the solve from zeros is.
    _, _, deq = make()
    x = inputs()
    deq(x, z0=zeros(), keys=torch.arange(4))
    with torch.no_grad():
        deq.f.W.mul_(0.98).add_(0.01 * torch.eye(6, dtype=F64))
    cached = deq(x, z0=zeros(), keys=torch.arange(4))
    plain = il.DEQ(deq.f, solver=SOLVER)(x, z0=zeros())
    assert cached.from_cache.all() and cached.result.converged.all()
    eye = torch.eye(6, dtype=F64)
    W = deq.f.W.detach()
    truth = torch.linalg.solve(eye - W, (x @ deq.f.U.T + deq.f.b).detach().T).T
    rho = torch.linalg.matrix_norm(W, 2)
    bound = SOLVER.atol / (1 - rho)
    assert (torch.linalg.vector_norm(cached.z - truth, dim=1) <= bound).all()
    assert (torch.linalg.vector_norm(plain.z - truth, dim=1) <= bound).all()
    assert cached.result.n_f_evals < plain.result.n_f_evals


def test_keys_are_per_sample_and_misses_start_from_the_default():
    problem, cache, deq = make()
    x = inputs(6)
    deq(x[:3], z0=zeros(3), keys=[10, 11, 12])
    out = deq(x[[0, 3, 2, 4]], z0=zeros(), keys=[10, 13, 12, 14])
    assert out.from_cache.tolist() == [True, False, True, False]
    torch.testing.assert_close(out.z, problem.solution(x[[0, 3, 2, 4]]), rtol=0, atol=1e-11)
    assert len(cache) == 5 and 13 in cache and 99 not in cache


def test_fixed_point_takes_the_cache_too():
    problem = Affine.make(n=6, d=3)
    cache = il.FixedPointCache()
    x = inputs()
    first = il.fixed_point(problem, zeros(), x, solver=SOLVER, cache=cache, keys=range(4))
    again = il.fixed_point(problem, zeros(), x, solver=SOLVER, cache=cache, keys=range(4))
    assert again.n_steps.tolist() == [1] * 4 < first.n_steps.tolist()
    torch.testing.assert_close(again.z, problem.solution(x), rtol=0, atol=1e-11)


def test_pytree_states_are_cached_whole():
    cache = il.FixedPointCache()

    def f(state, x):
        return {"a": 0.5 * state["b"].mean(1, keepdim=True) + x, "b": 0.5 * state["a"].repeat(1, 2)}

    deq = il.DEQ(f, solver=SOLVER, cache=cache)
    x = inputs(2)[:, :1]
    z0 = {"a": torch.zeros(2, 1, dtype=F64), "b": torch.zeros(2, 2, dtype=F64)}
    first = deq(x, z0=z0, keys=["u", "v"])
    again = deq(x, z0=z0, keys=["u", "v"])
    assert again.from_cache.all() and again.result.n_steps.tolist() == [1, 1]
    # z = (a, b): a = b/2 + x, b = a/2 (both columns): a = 4x/3.
    torch.testing.assert_close(again.z["a"], 4 * x / 3, rtol=0, atol=1e-11)
    start, hit = cache.initial(["v", "w"], z0)
    assert hit.tolist() == [True, False]
    torch.testing.assert_close(start["b"][0], first.z["b"][1], rtol=0, atol=0)
    assert start["a"][1].item() == 0.0


# --- Staleness ----------------------------------------------------------------------------------


def test_an_entry_older_than_max_age_steps_is_dropped():
    _, cache, deq = make(max_age=2)
    x = inputs()
    deq(x, z0=zeros(), keys=torch.arange(4))
    cache.step(2)
    assert deq(x, z0=zeros(), keys=torch.arange(4)).from_cache.all()  # age 2: kept
    # (that call stored the samples again, at step 2)
    cache.step(3)
    out = deq(x, z0=zeros(), keys=torch.arange(4))  # age 3: dropped
    assert not out.from_cache.any() and cache.stats.stale == 4


def test_the_optimizer_counts_the_steps():
    cache = il.FixedPointCache(max_age=0)
    w = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=0.1)
    handle = cache.count_steps(optimizer)
    for _ in range(3):
        w.sum().backward()
        optimizer.step()
    handle.remove()
    optimizer.step()
    assert cache.steps == 3


def test_an_entry_worse_than_the_default_start_is_not_used():
    _, cache, deq = make()
    x = inputs()
    garbage = torch.full((4, 6), 1e3, dtype=F64)
    cache.store(torch.arange(4), garbage, mask=torch.tensor([True, True, False, False]))
    out = deq(x, z0=zeros(), keys=torch.arange(4))
    plain = il.DEQ(deq.f, solver=SOLVER)(x, z0=zeros())
    assert not out.from_cache.any()
    assert cache.stats.worse == 2 and cache.stats.hits == 0 and cache.stats.check_evaluations == 2
    # The check costs two evaluations, not the solve: the same iterations as without a cache.
    assert out.result.n_steps.tolist() == plain.result.n_steps.tolist()
    torch.testing.assert_close(out.z, plain.z, rtol=0, atol=0)


def test_without_the_check_an_entry_is_used_as_it_is():
    _, cache, deq = make(check=False)
    x = inputs()
    cache.store(torch.arange(4), torch.full((4, 6), 1e3, dtype=F64))
    out = deq(x, z0=zeros(), keys=torch.arange(4))
    assert out.from_cache.all() and cache.stats.check_evaluations == 0


def test_failed_samples_are_not_stored():
    # A map that diverges for sample 1 (its input is huge and f is expanding there).
    cache = il.FixedPointCache()

    def f(z, x):
        return torch.where(x > 10, 3.0 * z + 1.0, 0.5 * z + x)

    solver = il.Picard(max_iter=50, on_unconverged="ignore")
    x = torch.tensor([[1.0], [100.0]], dtype=F64)
    _, result = il.DEQ(f, solver=solver, cache=cache)(x, keys=["ok", "bad"])
    assert result.statuses()[1] == il.Status.DIVERGED
    assert "ok" in cache and "bad" not in cache


# --- Memory: bounded, evicted, stored where asked -----------------------------------------------


def rows(value, batch=1):
    return torch.full((batch, 6), float(value), dtype=F64)


def test_a_full_cache_evicts_the_least_recently_used_entry():
    cache = il.FixedPointCache(max_entries=3)
    for k in range(3):
        cache.store([k], rows(k))
    cache.initial([0], rows(-1))  # 0 is now the most recently used
    cache.store([3], rows(3))
    assert sorted(cache.keys()) == [0, 2, 3] and cache.stats.evicted == 1  # 1 was evicted
    start, hit = cache.initial([0, 1, 2, 3], rows(-1, 4))
    assert hit.tolist() == [True, False, True, True]
    assert start[:, 0].tolist() == [0.0, -1.0, 2.0, 3.0]


def test_without_eviction_a_full_cache_keeps_what_it_holds():
    cache = il.FixedPointCache(max_entries=2, eviction="none")
    cache.store([0, 1, 2], torch.arange(3, dtype=F64)[:, None].repeat(1, 6))
    assert len(cache) == 2 and 2 not in cache
    cache.store([1], rows(7))  # an update of a held key is stored
    assert cache.initial([1], rows(0))[0][0, 0].item() == 7.0


def test_stale_entries_make_room_before_eviction():
    cache = il.FixedPointCache(max_entries=2, max_age=1, eviction="none")
    cache.store([0, 1], rows(0, 2))
    cache.step(2)
    cache.store([2], rows(2))
    assert 2 in cache and cache.stats.stale == 2 and cache.stats.evicted == 0


def test_states_are_stored_on_the_device_and_in_the_dtype_asked():
    problem = Affine.make(n=6, d=3)
    cache = il.FixedPointCache(dtype=torch.bfloat16, device="cpu")
    deq = il.DEQ(AffineModule(problem), solver=SOLVER, cache=cache)
    x = inputs()
    deq(x, z0=zeros(), keys=torch.arange(4))
    assert cache.state_dict()["states"].dtype == torch.bfloat16
    out = deq(x, z0=zeros(), keys=torch.arange(4))
    # A bfloat16 start (about 3 digits) still solves to the float64 tolerance.
    assert out.from_cache.all() and out.z.dtype == F64
    assert out.result.n_steps.min() > 1
    torch.testing.assert_close(out.z, problem.solution(x), rtol=0, atol=1e-10)


def test_the_storage_grows_with_the_entries_not_with_max_entries():
    cache = il.FixedPointCache(max_entries=10**6)
    cache.store(range(20), torch.zeros(20, 6, dtype=F64))
    assert 20 * 6 * 8 <= cache.nbytes <= 40 * 6 * 8


# --- Saving and distributed training --------------------------------------------------------------


def test_state_dict_round_trip(tmp_path):
    cache = il.FixedPointCache(max_age=5)
    cache.store([3, "a", (1, 2)], torch.randn(3, 6, dtype=F64))
    cache.step(4)
    cache.store([3], rows(9))
    torch.save(cache.state_dict(), tmp_path / "cache.pt")
    restored = il.FixedPointCache(max_age=5)
    restored.load_state_dict(torch.load(tmp_path / "cache.pt", weights_only=True))
    keys = [3, "a", (1, 2), "missing"]
    want, want_hit = cache.initial(keys, rows(0, 4))
    got, got_hit = restored.initial(keys, rows(0, 4))
    assert torch.equal(got, want) and torch.equal(got_hit, want_hit)
    assert restored.steps == 4 and restored.stats.stored == cache.stats.stored
    # The ages travel with the entries: two steps on, "a" and (1, 2) (stored at step 0) are
    # too old, 3 (stored at step 4) is not.
    restored.step(2)
    assert restored.initial(keys, rows(0, 4))[1].tolist() == [True, False, False, False]


def test_a_smaller_cache_loads_the_most_recent_entries():
    cache = il.FixedPointCache()
    cache.store(range(5), torch.arange(5, dtype=F64)[:, None].repeat(1, 6))
    small = il.FixedPointCache(max_entries=2)
    small.load_state_dict(cache.state_dict())
    assert small.keys() == [3, 4]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_keeps_one_cache_per_rank(tmp_path):
    # Two processes (gloo), each training on its own shard for two epochs: each rank's cache
    # holds its shard's keys only, hits all of them in the second epoch, and saves and loads
    # on its own.
    mp.spawn(run_ranks, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        report = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert sorted(report["keys"]) == list(SHARD[rank])
        assert report["hits_second_epoch"] == len(SHARD[rank])
        assert report["reloaded_equal"]


# --- Errors ---------------------------------------------------------------------------------------


def test_misuse_is_refused_by_name():
    problem, cache, deq = make()
    x = inputs()
    with pytest.raises(ValueError, match="no cache"):
        il.DEQ(AffineModule(problem))(x, z0=zeros(), keys=torch.arange(4))
    with pytest.raises(ValueError, match="3 keys for a batch of 4"):
        deq(x, z0=zeros(), keys=[0, 1, 2])
    with pytest.raises(TypeError, match="hashable"):
        deq(x, z0=zeros(), keys=[{}, 1, 2, 3])
    with pytest.raises(ValueError, match="cache and keys go together"):
        il.fixed_point(problem, zeros(), x, cache=cache)
    deq(x, z0=zeros(), keys=torch.arange(4))
    with pytest.raises(ValueError, match="6 features per sample, got a state of 5"):
        cache.store([0], torch.zeros(1, 5, dtype=F64))
    with pytest.raises(TypeError, match="FixedPointCache"):
        il.DEQ(AffineModule(problem), cache={})
    with pytest.raises(ValueError, match="eviction"):
        il.FixedPointCache(eviction="fifo")


def test_under_vmap_the_cache_is_refused():
    _, _, deq = make()
    with pytest.raises(RuntimeError, match=r"torch\.func"):
        vmap(lambda x: deq(x[None], z0=zeros(1), keys=[0]).z)(inputs())
