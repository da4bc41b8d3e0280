"""Timestep samplers: reference semantics, one collective per update, bit-identical ranks,
checkpoint round trips across world sizes, unbiased importance weights."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from pydantic import ValidationError

from iddpm_ds.diffusion.timestep_sampler import (
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    build_schedule_sampler,
)
from iddpm_ds.spec.base import Spec
from iddpm_ds.spec.sampler import SamplerSpec
from iddpm_ds.testing import ReferenceSecondMoment
from mp_utils import run_ranks


def _resampler(T=7, H=4, u=0.01, capacity=64, seed=0, rank=0, **kw) -> LossSecondMomentResampler:
    return LossSecondMomentResampler(T, device="cpu", seed=seed, rank=rank, history_per_term=H,
                                     uniform_prob=u, max_local_batch=capacity, **kw)


def _assert_matches_reference(sampler: LossSecondMomentResampler,
                              ref: ReferenceSecondMoment) -> None:
    state = sampler.state_dict()
    # History and counts are pure data movement: they must agree exactly.
    assert torch.equal(state["loss_history"], torch.from_numpy(ref.history))
    assert torch.equal(state["loss_counts"], torch.from_numpy(ref.counts))
    assert bool(sampler.warmed_up) == ref.warmed_up()
    # Same formula, but torch and numpy may sum 4..10 terms in a different order.
    np.testing.assert_allclose(sampler.weights().numpy(), ref.weights(), rtol=1e-13, atol=0)


def _random_steps(world: int, n_steps: int, T: int, capacity: int, seed: int) -> list:
    """Per step, per rank: (t int64, loss float32) of a random size in [0, capacity]."""
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(n_steps):
        step = []
        for _ in range(world):
            n = int(rng.integers(0, capacity + 1))
            t = rng.integers(0, T, size=n).astype(np.int64)
            loss = np.exp(rng.normal(size=n) * 2).astype(np.float32) * (1 + t)
            step.append((t, loss))
        steps.append(step)
    # Unequal sizes are the point: make sure the ranks really differ at least once.
    assert any(len({len(t) for t, _ in step}) > 1 for step in steps)
    return steps


# --- spec ------------------------------------------------------------------------------------
def test_spec_defaults_shorthand_and_strictness():
    spec = SamplerSpec()
    assert (spec.name, spec.history_per_term, spec.uniform_prob) == ("uniform", 10, 0.001)
    assert SamplerSpec.model_validate("loss-second-moment").name == "loss-second-moment"

    class Parent(Spec):
        schedule_sampler: SamplerSpec = SamplerSpec()
        """The sampler."""

    nested = Parent.model_validate({"schedule_sampler": "loss-second-moment"})
    assert nested.schedule_sampler == SamplerSpec(name="loss-second-moment")
    for bad in ({"name": "importance"}, {"history_per_term": 0}, {"uniform_prob": 1.5},
                {"uniform_prob": -0.1}, {"histroy_per_term": 5}, "second-moment"):
        with pytest.raises(ValidationError):
            SamplerSpec.model_validate(bad)
    assert all(f.description for f in SamplerSpec.model_fields.values())


def test_build_from_spec():
    uniform = build_schedule_sampler(SamplerSpec(), 10, device=torch.device("cpu"), seed=0, rank=0)
    assert type(uniform) is UniformSampler
    spec = SamplerSpec(name="loss-second-moment", history_per_term=3, uniform_prob=0.2)
    aware = build_schedule_sampler(spec, 10, device=torch.device("cpu"), seed=0, rank=0,
                                   max_local_batch=8)
    assert isinstance(aware, LossSecondMomentResampler) and isinstance(aware, ScheduleSampler)
    assert (aware.history_per_term, aware.uniform_prob, aware.max_local_batch) == (3, 0.2, 8)


# --- uniform sampler ---------------------------------------------------------------------------
def test_uniform_sampler_semantics(tmp_path):
    T = 13
    sampler = UniformSampler(T, device="cpu", seed=5, rank=0)
    t, weights = sampler.sample(20000)
    assert t.dtype == torch.int64 and weights.dtype == torch.float32 and t.shape == (20000,)
    assert int(t.min()) == 0 and int(t.max()) == T - 1
    assert torch.equal(weights, torch.ones(20000))
    freq = torch.bincount(t, minlength=T).double() / 20000  # each ~ 1/13 +- 0.002
    assert torch.allclose(freq, torch.full((T,), 1 / T, dtype=torch.float64), atol=0.01)
    sampler.update_with_local_losses(t[:5], torch.rand(5))  # no-op, no collective
    m = sampler.metrics()
    assert math.isclose(float(m["entropy"]), math.log(T), rel_tol=1e-6)
    assert float(m["warmup_fraction"]) == 1.0
    assert float(m["weight_min"]) == float(m["weight_max"]) == 1.0
    assert bool(sampler.warmed_up)
    torch.save(sampler.state_dict(), tmp_path / "u.pt")
    sampler.load_state_dict(torch.load(tmp_path / "u.pt", weights_only=True))
    with pytest.raises(ValueError):
        UniformSampler(T + 1, device="cpu", seed=5, rank=0).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError):
        _resampler(T=T).load_state_dict(sampler.state_dict())


def test_streams_differ_by_rank_and_repeat_by_seed():
    draws = [UniformSampler(100, device="cpu", seed=s, rank=r).sample(64)[0] for s, r in
             [(0, 0), (0, 0), (0, 1), (1, 0)]]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[3])


# --- loss-aware update -----------------------------------------------------------------------
@pytest.mark.parametrize("T,H,dtype", [(1, 1, torch.float64), (5, 3, torch.float64),
                                       (50, 10, torch.float64), (6, 2, torch.float32)])
def test_vectorised_update_equals_sequential_reference(T, H, dtype):
    sampler = _resampler(T=T, H=H, u=0.001, capacity=80, history_dtype=dtype)
    ref = ReferenceSecondMoment(T, H, 0.001)
    rng = np.random.default_rng(T * 100 + H)
    for i in range(40):
        # Bursts (even i): many hits of few timesteps in one update exceed H (only the
        # newest H survive); odd i cover every timestep so that the sampler warms up.
        n = int(rng.integers(0, 81)) if i % 2 == 0 else 80
        t = rng.integers(0, max(1, T // int(rng.integers(2, 6))) if i % 2 == 0 else T, size=n)
        loss = rng.random(n) * 10 ** rng.uniform(-3, 3, size=n)
        sampler.update_with_local_losses(torch.from_numpy(t), torch.from_numpy(loss))
        ref.update_with_all_losses(t, loss)
        if dtype == torch.float64:
            _assert_matches_reference(sampler, ref)
        else:
            assert torch.equal(sampler.history(), torch.from_numpy(ref.history).float())
    assert bool(sampler.warmed_up)


def test_warmup_is_uniform_until_every_timestep_is_full():
    T, H = 5, 3
    sampler = _resampler(T=T, H=H, u=0.0)
    t = torch.arange(T - 1).repeat(H)  # every t but the last, H times
    sampler.update_with_local_losses(t, (t + 1).double() ** 2)
    assert not bool(sampler.warmed_up)
    assert torch.equal(sampler.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    assert float(sampler.metrics()["warmup_fraction"]) == pytest.approx((T - 1) / T)
    sampler.update_with_local_losses(torch.full((H,), T - 1), torch.full((H,), 25.0))
    assert bool(sampler.warmed_up)
    # Constant history (t+1)^2 -> rms (t+1)^2 -> p proportional to (t+1)^2.
    expected = torch.arange(1, T + 1, dtype=torch.float64) ** 2
    torch.testing.assert_close(sampler.probabilities(), expected / expected.sum(),
                               rtol=1e-14, atol=0)


def test_non_finite_losses_are_ignored():
    sampler = _resampler(T=3, H=2)
    sampler.update_with_local_losses(torch.tensor([0, 0, 1, 2, 2]),
                                     torch.tensor([1.0, math.nan, 2.0, math.inf, 3.0]))
    assert sampler.counts().tolist() == [1, 1, 1]
    assert sampler.history()[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_local_batch_above_capacity_raises():
    sampler = _resampler(capacity=4)
    with pytest.raises(ValueError, match="max_local_batch"):
        sampler.update_with_local_losses(torch.zeros(5, dtype=torch.int64), torch.ones(5))


def test_metrics_are_the_documented_quantities():
    T = 4
    sampler = _resampler(T=T, H=1, u=0.1)
    sampler.update_with_local_losses(torch.arange(T), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    p = (torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64) / 10) * 0.9 + 0.1 / T
    m = sampler.metrics()
    assert all(v.shape == () and v.dtype == torch.float32 for v in m.values())
    assert float(m["warmup_fraction"]) == 1.0
    assert float(m["entropy"]) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)
    assert float(m["weight_min"]) == pytest.approx(1 / (T * float(p.max())), rel=1e-6)
    assert float(m["weight_max"]) == pytest.approx(1 / (T * float(p.min())), rel=1e-6)


def test_importance_weights_are_unbiased():
    """E_p[w_t loss_t] = sum_t p_t loss_t / (T p_t) = mean_t loss_t, for any loss."""
    T, n_draws = 40, 400_000
    sampler = _resampler(T=T, H=10, u=0.001, seed=123)
    rng = np.random.default_rng(0)
    scale = np.exp(rng.normal(size=T) * 1.5)  # per-t loss scales spanning ~2 decades
    for _ in range(10):
        t = np.arange(T)
        losses = torch.from_numpy(scale * rng.random(T))
        sampler.update_with_local_losses(torch.from_numpy(t), losses)
    assert bool(sampler.warmed_up)
    p = sampler.probabilities()
    loss_t = torch.from_numpy(scale * (1 + rng.random(T)))  # a loss the sampler did not see
    # Exact identity first, then the Monte Carlo estimate from sample().
    assert float((p / (T * p) * loss_t).sum()) == pytest.approx(float(loss_t.mean()), rel=1e-12)
    t, weights = zip(*(sampler.sample(40_000) for _ in range(n_draws // 40_000)))
    t, weights = torch.cat(t), torch.cat(weights).double()
    estimate = float((weights * loss_t[t]).mean())
    var = float((p * (loss_t / (T * p)) ** 2).sum() - loss_t.mean() ** 2)
    stderr = math.sqrt(var / n_draws)
    # Tolerance: 5 standard errors of the estimator (deterministic with the fixed seed).
    assert abs(estimate - float(loss_t.mean())) < 5 * stderr
    assert stderr < 0.01 * float(loss_t.mean())  # the test has teeth: well under 1%
    freq = torch.bincount(t, minlength=T).double() / n_draws
    assert float((freq - p).abs().max()) < 5 * math.sqrt(float(p.max()) / n_draws)
    # Weights returned with the draws are 1/(T p_t) of the drawn t.
    torch.testing.assert_close(weights, (1 / (T * p[t])).float().double())


def test_state_round_trip_resumes_bit_identically(tmp_path):
    T, H = 9, 4
    a = _resampler(T=T, H=H, capacity=30, seed=1)
    rng = np.random.default_rng(1)
    batches = [(torch.from_numpy(rng.integers(0, T, 30)), torch.from_numpy(rng.random(30)))
               for _ in range(12)]
    for t, loss in batches[:5]:  # ring phase is now arbitrary, not 0
        a.update_with_local_losses(t, loss)
    torch.save({"sampler": a.state_dict(), "rng": a.rng_state()}, tmp_path / "s.pt")
    ckpt = torch.load(tmp_path / "s.pt", weights_only=True)
    b = _resampler(T=T, H=H, capacity=30, seed=99)
    b.load_state_dict(ckpt["sampler"])
    b.set_rng_state(ckpt["rng"])
    assert bool(b.warmed_up) and torch.equal(a.weights(), b.weights())
    for t, loss in batches[5:]:
        a.update_with_local_losses(t, loss)
        b.update_with_local_losses(t, loss)
        assert torch.equal(a.weights(), b.weights())
    assert all(torch.equal(x, y) for x, y in zip(a.sample(50), b.sample(50)))
    with pytest.raises(ValueError):
        _resampler(T=T, H=H + 1).load_state_dict(ckpt["sampler"])


def test_loads_reference_layout_numpy_state():
    """NumPy 2 (no np.int): a history in the reference's numpy layout loads as is."""
    assert int(np.__version__.split(".")[0]) >= 2
    ref = ReferenceSecondMoment(6, 3, 0.001)
    rng = np.random.default_rng(2)
    ref.update_with_all_losses(rng.integers(0, 6, 40), rng.random(40))
    sampler = _resampler(T=6, H=3, u=0.001)
    sampler.load_state_dict({"name": "loss-second-moment", "num_timesteps": 6,
                             "loss_history": ref.history, "loss_counts": ref.counts})
    _assert_matches_reference(sampler, ref)


# --- multiple processes ------------------------------------------------------------------------
_COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
                "all_gather_coalesced", "all_reduce", "all_reduce_coalesced", "all_to_all",
                "all_to_all_single", "barrier", "monitored_barrier", "broadcast",
                "broadcast_object_list", "gather", "gather_object", "reduce", "reduce_scatter",
                "reduce_scatter_tensor", "scatter", "scatter_object_list", "send", "recv",
                "isend", "irecv", "batch_isend_irecv")


def _patch_collectives(calls: list) -> None:
    """Wrap every torch.distributed collective so that outermost calls are recorded."""
    import torch.distributed.distributed_c10d as c10d

    depth = [0]
    for name in _COLLECTIVES:
        original = getattr(c10d, name, None) or getattr(dist, name, None)
        if original is None:
            continue

        def wrapper(*args, __name=name, __original=original, **kwargs):
            if depth[0] == 0:
                calls.append(__name)
            depth[0] += 1
            try:
                return __original(*args, **kwargs)
            finally:
                depth[0] -= 1

        for module in (dist, c10d):
            if hasattr(module, name):
                setattr(module, name, wrapper)


def _updates_worker(rank: int, world: int, steps: list, capacity: int, load_path, save_path):
    group = dist.distributed_c10d._get_default_group()
    sampler = _resampler(T=7, H=4, u=0.01, capacity=capacity, seed=7, rank=rank)
    if load_path:
        sampler.load_state_dict(torch.load(load_path, weights_only=True))
    loaded_weights = sampler.weights().clone()
    all_reduce = dist.all_reduce  # unwrapped: stands for DeepSpeed's gradient reduction
    calls: list = []
    _patch_collectives(calls)
    seq_deltas, reduced = [], []
    for step in steps:
        t, loss = step[rank]
        before = group._get_sequence_number_for_group()
        sampler.update_with_local_losses(torch.from_numpy(t), torch.from_numpy(loss))
        seq_deltas.append(group._get_sequence_number_for_group() - before)
        grad = torch.full((3,), float(rank + 1))
        all_reduce(grad)  # another collective while the sampler's gather is in flight
        reduced.append(float(grad[0]))
    aware_calls = list(calls)
    uniform = UniformSampler(7, device="cpu", seed=7, rank=rank)
    before = group._get_sequence_number_for_group()
    uniform.update_with_local_losses(torch.from_numpy(steps[0][rank][0]),
                                     torch.from_numpy(steps[0][rank][1]))
    uniform_collectives = (group._get_sequence_number_for_group() - before
                           + len(calls) - len(aware_calls))
    if save_path and rank == 0:
        torch.save(sampler.state_dict(), save_path)
    return {"loaded_weights": loaded_weights, "weights": sampler.weights(),
            "state": sampler.state_dict(), "calls": aware_calls, "seq_deltas": seq_deltas,
            "uniform_collectives": uniform_collectives, "draws": sampler.sample(32)[0],
            "reduced": reduced}


def _check_ranks(results: list, steps: list, ref: ReferenceSecondMoment) -> None:
    for step in steps:  # the single-process computation from the concatenated losses
        ref.update_with_all_losses(np.concatenate([t for t, _ in step]),
                                   np.concatenate([loss for _, loss in step]))
    for res in results:
        assert torch.equal(res["weights"], results[0]["weights"])  # bit-identical on all ranks
        assert torch.equal(res["state"]["loss_history"], results[0]["state"]["loss_history"])
        assert res["seq_deltas"] == [1] * len(steps)  # process-group sequence: one collective
        assert len(res["calls"]) == len(steps)
        assert set(res["calls"]) <= {"all_gather_single", "all_gather_into_tensor"}
        assert res["uniform_collectives"] == 0
        assert res["reduced"] == [len(results) * (len(results) + 1) / 2] * len(steps)
    assert not torch.equal(results[0]["draws"], results[1]["draws"])  # per-rank streams
    sampler = _resampler(T=7, H=4, u=0.01)
    sampler.load_state_dict(results[0]["state"])
    _assert_matches_reference(sampler, ref)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    capacity = 12
    steps = _random_steps(world=2, n_steps=8, T=7, capacity=capacity, seed=10)
    ckpt = tmp_path_factory.mktemp("sampler") / "sampler.pt"
    results = run_ranks(_updates_worker, 2, steps, capacity, None, str(ckpt))
    return steps, ckpt, results


@pytest.mark.slow
def test_two_ranks_unequal_batches_one_collective_match_reference(two_rank_run):
    steps, _, results = two_rank_run
    ref = ReferenceSecondMoment(7, 4, 0.01)
    _check_ranks(results, steps, ref)
    assert bool(results[0]["state"]["loss_counts"].eq(4).all())  # warmed up: weights non-trivial
    assert not torch.equal(results[0]["weights"], torch.ones(7, dtype=torch.float64))


@pytest.mark.slow
def test_resume_two_rank_checkpoint_on_three_ranks(two_rank_run):
    steps2, ckpt, results2 = two_rank_run
    capacity = 9  # capacity is per process, not part of the checkpoint
    steps3 = _random_steps(world=3, n_steps=5, T=7, capacity=capacity, seed=11)
    results3 = run_ranks(_updates_worker, 3, steps3, capacity, str(ckpt), None)
    for res in results3:
        assert torch.equal(res["loaded_weights"], results2[0]["weights"])  # exactly as warm
    ref = ReferenceSecondMoment(7, 4, 0.01)
    ref.update_with_all_losses(*(np.concatenate(x) for x in zip(*[
        (t, loss) for step in steps2 for t, loss in step])))
    _check_ranks(results3, steps3, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_update_matches_reference_without_host_sync():
    """On CUDA, index_put_ with duplicate indices has no defined winner: only the newest H
    losses per timestep may be written. Also: no host sync in sample/update."""
    T, H = 6, 3
    sampler = LossSecondMomentResampler(T, device="cuda", seed=0, rank=0, history_per_term=H,
                                        uniform_prob=0.01, max_local_batch=4096)
    ref = ReferenceSecondMoment(T, H, 0.01)
    rng = np.random.default_rng(3)
    for _ in range(20):
        t = rng.integers(0, T, size=4096)  # ~680 arrivals per timestep per update
        loss = rng.random(4096)
        t_cuda, loss_cuda = torch.from_numpy(t).cuda(), torch.from_numpy(loss).cuda()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sampler.update_with_local_losses(t_cuda, loss_cuda)
            draws, weights = sampler.sample(512)
            sampler.metrics()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        ref.update_with_all_losses(t, loss)
        assert draws.is_cuda and weights.is_cuda
        state = sampler.state_dict()
        assert torch.equal(state["loss_history"], torch.from_numpy(ref.history))
        assert torch.equal(state["loss_counts"], torch.from_numpy(ref.counts))
