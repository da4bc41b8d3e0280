"""The mutant check (tests/mutants.py) in CI: every listed break of a README row must make
its test fail. The list itself is checked fast (every edit still applies exactly once);
each edit is a slow test of its own, all on one shared copy of the repository (about
3.5 min together on a 2-core machine, 216 CPU-seconds). `python tests/mutants.py` runs the same from the shell."""
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


def test_a_kill_is_a_failed_test_never_a_copy_that_cannot_run():
    """What counts as a kill (mutants._failed_for_the_edit, on pytest's own summary lines):
    the copy is no longer run unedited first, so an error of the copy must not pass."""
    args = ["tests/test_x.py::test_y"]
    failed = "FAILED tests/test_x.py::test_y - AssertionError: assert 1 == 2\n1 failed in 3.00s"
    assert mutants._failed_for_the_edit(failed, args) is None
    errored = "ERROR tests/test_x.py::test_y - RuntimeError: fixture\n1 error in 3.00s"
    assert "no test FAILED" in mutants._failed_for_the_edit(errored, args)
    assert "no test FAILED" in mutants._failed_for_the_edit("1 failed in 3.00s", args)
    other = "FAILED tests/test_z.py::test_w - AssertionError\n1 failed"
    assert "not a selected test" in mutants._failed_for_the_edit(other, args)
    rank = ("E   ModuleNotFoundError: No module named 'iddpm_ds'\n"
            "FAILED tests/test_x.py::test_y - torch.multiprocessing.spawn.ProcessRaisedException:")
    assert "could not run it" in mutants._failed_for_the_edit(rank, args)


@pytest.fixture(scope="module")
def mutant_copy(tmp_path_factory) -> tuple[Path, Path]:
    """The repository's files copied once for every edit (each test puts its file back),
    after the smoke run: a fast training test passes on the unedited copy, so the copy can
    run its tests (a kill also has to be a test FAILED for the test's own reason, not an
    import or set-up error: mutants.run_mutant). That every listed test passes unedited
    is the main suite's job on the same code. One module fixture keeps the edits on one
    pytest-xdist worker, as one unit of work that starts early, not one long test that
    other work queues behind."""
    tmp = tmp_path_factory.mktemp("mutants")
    copy = tmp / "repo"
    mutants.copy_repo(ROOT, copy)
    mutants.check_imports_copy(copy)
    mutants.write_digits(copy)  # once, for every run of the copy
    assert mutants.smoke(copy, tmp), "the copy cannot run its tests (see output)"
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
