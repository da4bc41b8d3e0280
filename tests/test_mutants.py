"""The mutant check (tests/mutants.py) in CI: every listed break of a README row must make
its test fail. The list itself is checked fast (every edit still applies exactly once);
each edit is a slow test of its own, all on one shared copy of the repository (about 4
min together on a 2-core machine). `python tests/mutants.py` runs the same from the shell."""
from __future__ import annotations

from pathlib import Path

import pytest

import mutants

ROOT = Path(__file__).resolve().parents[1]
# the rows the README promises; each needs at least one edit (fp16 loss scaling: GPU issue)
ROWS = ("importance weights", "lr anneal", "bf16-mixed", "EMA rate", "grad clip", "sampler warm-up",
        "the sampler's all-gather", "exactly-once data", "data-position resume",
        "divergence guard's save refusal", "universal conversion", "GPU placement",
        "spec refusal (a validator)", "preemption save", "time-based checkpoint interval")


def test_every_edit_applies_exactly_once_and_names_a_test():
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) == len(set(names))
    for mutant in mutants.MUTANTS:
        assert mutants.stale(mutant, ROOT) is None, mutant.name  # re-anchor it on the new text
        assert mutant.original != mutant.replacement and mutant.tests, mutant.name
        for args in mutants.selections(mutant.tests):
            assert (ROOT / args[0].split("::")[0]).is_file(), (mutant.name, args)
    assert set(ROWS) <= {m.row for m in mutants.MUTANTS}


@pytest.fixture(scope="module")
def mutant_copy(tmp_path_factory) -> tuple[Path, Path]:
    """The repository's files copied once for every edit (each test puts its file back),
    after the baseline: every listed test passes on the unedited copy, else a kill would
    mean nothing. One module fixture keeps the edits on one pytest-xdist worker, as one
    unit of work that starts early, not one long test that other work queues behind."""
    tmp = tmp_path_factory.mktemp("mutants")
    copy = tmp / "repo"
    mutants.copy_repo(ROOT, copy)
    mutants.check_imports_copy(copy)
    assert mutants.baseline(copy, list(mutants.MUTANTS), tmp), "a listed test fails unedited (see output)"
    return copy, tmp


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", [m.name for m in mutants.MUTANTS])
def test_edit_is_killed_by_its_test(mutant_copy, name):
    """The edit `name` (tests/mutants.py) in the copy: its test must fail. An edit whose
    tests all skip here (GPU-only) passes, as the runner reports it."""
    mutant = next(m for m in mutants.MUTANTS if m.name == name)
    copy, tmp = mutant_copy
    result = mutants.run_mutant(mutant, copy, tmp)
    assert result.startswith(("killed", "skipped")), f"{name} [{mutant.row}]: {result}"
