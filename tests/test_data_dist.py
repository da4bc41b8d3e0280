"""Data module across real rank processes (tests/mp_utils.run_ranks, gloo) with 2 loader
workers each: exactly-once epochs, equal batch counts, eval coverage, resuming the data
position at the same and at other world sizes (2 -> 2, 2 -> 3 -> 1), and resuming at the
same layout to exactly the batches of a run that never stopped (0 and 2 workers)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as torch_dist

from iddpm_ds.data import build_eval_stream, build_train_stream
from iddpm_ds.spec.data import DataSpec
from mp_utils import run_ranks
from test_data_helpers import first_difference, id_shards, resume_chain

pytestmark = pytest.mark.slow


def _labels(stream, batches: int) -> list[list[int]]:
    return [c["y"].tolist() for _, (_, c) in zip(range(batches), stream)]


def _epochs_of(rank: int, world: int, shards: list[str], batch: int, epochs: int) -> dict:
    spec = DataSpec(shards=shards, num_workers=2, shuffle_buffer=16)
    stream = build_train_stream(spec, image_size=8, class_cond=True, batch_size=batch, rank=rank,
                                world_size=world, seed=3)
    per_epoch = []
    for _ in range(epochs):
        per_epoch.append(_labels(stream, stream.batches_per_epoch))
    out = {"batches": stream.batches_per_epoch, "epochs": per_epoch, "stats": stream.stats()}
    stream.close()
    return out


def _coverage_job(rank: int, world: int, data: dict) -> dict:
    result = {name: _epochs_of(rank, world, shards, batch, epochs)
              for name, (shards, batch, epochs) in data["train"].items()}
    spec = DataSpec(shards=data["eval"], eval_shards=data["eval"], num_workers=2)
    ev = build_eval_stream(spec, image_size=8, class_cond=True, batch_size=4, rank=rank,
                           world_size=world)
    result["eval"] = {"labels": [c["y"].tolist() for _, c in ev], "batches": ev.batches,
                      "max_batches": ev.max_batches,
                      "padded": [(c["y"].tolist(), m.tolist()) for _, c, m in ev.padded()]}
    return result


@pytest.fixture(scope="module")
def coverage(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("shards")
    data = {"train": {
        "uneven": (id_shards(folder, [37, 5, 54], prefix="u"), 4, 2),    # 96 = 2 ranks x 12 x 4
        "one_shard": (id_shards(folder, [40], prefix="o"), 3, 1),        # 1 shard, 4 consumers
        "remainder": (id_shards(folder, [7, 30, 2], prefix="r"), 5, 1),  # 39: 30 used, 9 dropped
    }, "eval": id_shards(folder, [11, 2, 6], prefix="e")}
    return {"ranks": run_ranks(_coverage_job, 2, data), "data": data}


def test_each_sample_exactly_once_per_epoch_two_ranks_two_workers(coverage) -> None:
    ranks = coverage["ranks"]
    assert ranks[0]["uneven"]["batches"] == ranks[1]["uneven"]["batches"] == 12
    for epoch in range(2):
        labels = [v for r in ranks for batch in r["uneven"]["epochs"][epoch] for v in batch]
        assert sorted(labels) == list(range(96))
    first = [v for batch in ranks[0]["uneven"]["epochs"][0] for v in batch]
    second = [v for batch in ranks[0]["uneven"]["epochs"][1] for v in batch]
    assert first != second  # epochs are reshuffled
    assert all(r["uneven"]["stats"]["epoch"] == 2 and r["uneven"]["stats"]["corrupt_samples"] == 0
               for r in ranks)


def test_equal_batch_counts_with_fewer_shards_than_consumers_and_a_remainder(coverage) -> None:
    ranks = coverage["ranks"]
    for name, batches, used, total in (("one_shard", 6, 36, 40), ("remainder", 3, 30, 39)):
        assert [r[name]["batches"] for r in ranks] == [batches, batches]
        labels = [v for r in ranks for batch in r[name]["epochs"][0] for v in batch]
        assert len(labels) == len(set(labels)) == used and set(labels) <= set(range(total))
        sizes = {len(batch) for r in ranks for batch in r[name]["epochs"][0]}
        assert len(sizes) == 1
        assert all(r[name]["stats"]["epoch"] == 1 for r in ranks)  # epoch ended on every rank


def test_eval_covers_each_held_out_sample_once(coverage) -> None:
    evals = [r["eval"] for r in coverage["ranks"]]
    labels = [v for e in evals for batch in e["labels"] for v in batch]
    assert sorted(labels) == list(range(19))
    assert [e["batches"] for e in evals] == [3, 3] and evals[0]["max_batches"] == 3
    masked = [v for e in evals for ys, mask in e["padded"] for v, m in zip(ys, mask) if m]
    assert sorted(masked) == list(range(19)) and all(len(e["padded"]) == 3 for e in evals)


def _gather(obj) -> list:
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def _phase(rank: int, world: int, shards: list[str], batch: int, states: list | None,
           batches: int | None) -> tuple[list[int], dict, int]:
    spec = DataSpec(shards=shards, num_workers=2, shuffle_buffer=16)
    stream = build_train_stream(spec, image_size=8, class_cond=True, batch_size=batch, rank=rank,
                                world_size=world, seed=9)
    if states is not None:
        stream.load_state_dict(states)
    take = stream.batches_left_in_epoch if batches is None else batches
    seen = [v for b in _labels(stream, take) for v in b]
    state, epoch = stream.state_dict(), stream.stats()["epoch"]
    stream.close()
    return seen, state, epoch


def _two_rank_job(rank: int, world: int, shards: list[str]) -> dict:
    seen, state, _ = _phase(rank, world, shards, 4, None, 7)
    states = _gather(state)
    again, _, epoch = _phase(rank, world, shards, 4, states, None)  # same world size
    return {"seen": seen, "states": states, "rest_same_world": again, "epoch_after": epoch}


def _three_rank_job(rank: int, world: int, shards: list[str], states: list) -> dict:
    seen, state, _ = _phase(rank, world, shards, 5, states, 2)  # other world and batch size
    return {"seen": seen, "states": _gather(state)}


def test_resume_same_and_other_world_size(tmp_path: Path) -> None:
    shards = id_shards(tmp_path, [50, 3, 41, 26])  # 120 samples, 15 batches/rank at 2 x 4
    two = run_ranks(_two_rank_job, 2, shards)
    before = [v for r in two for v in r["seen"]]
    assert len(before) == len(set(before)) == 2 * 7 * 4
    same = before + [v for r in two for v in r["rest_same_world"]]
    assert sorted(same) == list(range(120)) and all(r["epoch_after"] == 1 for r in two)

    three = run_ranks(_three_rank_job, 3, shards, two[0]["states"])
    middle = [v for r in three for v in r["seen"]]
    assert len(middle) == 3 * 2 * 5 and not set(middle) & set(before)

    rest, _, epoch = _phase(0, 1, shards, 2, three[0]["states"], None)  # 34 left: 17 x 2
    everything = before + middle + rest
    assert len(everything) == len(set(everything)) and sorted(everything) == list(range(120))
    assert epoch == 1


def _exact_resume_job(rank: int, world: int, shards: list[str]) -> dict:
    out = {}
    for workers in (0, 2):
        spec = DataSpec(shards=shards, num_workers=workers, shuffle_buffer=8, random_flip=True)
        # 59 samples, 2 ranks x 3: 9 batches per epoch; resumed pieces cross both epoch ends
        chain = resume_chain(spec, [3, 7, 14], 21, _gather, image_size=8, class_cond=True,
                             batch_size=3, rank=rank, world_size=world, seed=6)
        out[workers] = {"differs_at": first_difference(chain),
                        "same_state": chain["states"][0] == chain["states"][1],
                        "labels": [int(v) for _, y in chain["resumed"][:9] for v in y]}
    return out


def test_resume_at_the_same_layout_yields_the_uninterrupted_batches_two_ranks(
        tmp_path: Path) -> None:
    shards = id_shards(tmp_path, [13, 9, 20, 17])
    ranks = run_ranks(_exact_resume_job, 2, shards)
    for workers in (0, 2):
        assert [r[workers]["differs_at"] for r in ranks] == [None, None]
        assert all(r[workers]["same_state"] for r in ranks)
        epoch = [v for r in ranks for v in r[workers]["labels"]]
        assert len(epoch) == len(set(epoch)) == 54  # and still each sample at most once
