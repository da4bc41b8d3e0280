"""Shared test set-up: few threads per process (2-core CI machine), the digits shards."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
# tests/ has no __init__.py: pytest puts it on sys.path (rootdir-relative "prepend" import
# mode), so `from train_utils import ...` works without a path edit here

import torch  # noqa: E402

try:
    import xdist  # noqa: F401  (the dev extra; the suite also runs without it, on one process)
except ImportError:
    xdist = None

torch.set_num_threads(1)


DIGITS_ENV = "IDDPM_TEST_DIGITS"  # env: digits shards written already, read-only (tests/mutants.py)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The bundled demo data (sklearn digits), written once per test session, or once for
    many short sessions: the mutant runner writes them once and names them in DIGITS_ENV
    (each write costs a process start and about 5 s of CPU)."""
    if os.environ.get(DIGITS_ENV):
        return Path(os.environ[DIGITS_ENV])
    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, str(ROOT / "launch" / "make_shards.py"), "digits", "--out",
                    str(out), "--overwrite", "--quiet"], check=True, capture_output=True)
    return out


# the namespace hosts, defined once here: a fixture imported into two test files is two
# fixtures, and the session would build the harness twice
from hosts_harness import hosts  # noqa: E402,F401


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory, digits_shards):
    """Shared 2-rank demo runs by (ZeRO stage, precision): train_utils.DemoRuns."""
    from train_utils import DemoRuns

    return DemoRuns(tmp_path_factory.mktemp("demo_runs"), digits_shards)


# pytest-xdist (CI: `-n 3 --dist loadgroup`, .ci/test.sh) sends each test to any worker,
# and every worker builds its own session- and module-scoped fixtures. Tests that share an
# expensive fixture or a machine-wide resource are kept on one worker, in turn:
#  - a cluster harness: the one-node Slurm cluster (its jobs bind MASTER_PORT on localhost,
#    the same port for the same job id in two clusters), the network-namespace hosts, the
#    two-node Slurm cluster on its own hosts. These mostly wait, so their workers overlap
#    them with the tests that compute;
#  - "demo_runs": the shared trained runs;
#  - "module:<file>": a module-scoped fixture (trained runs, coverage maps) of that file.
# xdist's own loadgroup reads `xdist_group` marks by rewriting item._nodeid, which pytest 9
# no longer reads (nodeid comes from item._id): the workers write the groups to a file and
# FixtureGroups, the scheduler below, reads them.
GROUP_OF_FIXTURE = {"slurm_cluster": "slurm", "hosts": "hosts", "slurm_two_nodes": "slurm_two_nodes",
                    "demo_runs": "demo_runs"}
GROUPS_FILE = "IDDPM_XDIST_GROUPS"  # env: where the workers write {nodeid: group}


def xdist_group(item: pytest.Item) -> Optional[str]:
    """The worker group of a test, from the fixtures it uses (None: any worker)."""
    names = set(item.fixturenames)
    for fixture, group in GROUP_OF_FIXTURE.items():
        if fixture in names:
            return group
    defs = getattr(item, "_fixtureinfo", None)
    for name, fixturedefs in (defs.name2fixturedefs.items() if defs else ()):
        if name in names and fixturedefs[-1].scope == "module":
            return f"module:{item.path.name}"
    return None


def _rank(item: pytest.Item, group: Optional[str]) -> int:
    if group in ("slurm", "hosts", "slurm_two_nodes"):
        return 0
    if group == "demo_runs":
        return 1
    return 2 if item.get_closest_marker("slow") else 3


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        fd, path = tempfile.mkstemp(prefix="iddpm-xdist-groups-", suffix=".json")
        os.close(fd)
        os.environ[GROUPS_FILE] = path  # the workers start after this and inherit it
        config.add_cleanup(lambda: Path(path).unlink(missing_ok=True))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group the tests, and hand the workers the long work first (the cluster tests, the
    shared runs, then the other multi-process tests) so that no long test starts last
    while the other workers idle. A group keeps its tests together and in file order."""
    groups = {item.nodeid: xdist_group(item) for item in items}
    first: dict[str, int] = {}
    for item in items:
        group = groups[item.nodeid]
        if group:
            first[group] = min(first.get(group, 3), _rank(item, group))
    items.sort(key=lambda item: first.get(groups[item.nodeid] or "", _rank(item, None)))
    path = os.environ.get(GROUPS_FILE)
    if path and "PYTEST_XDIST_WORKER" in os.environ:  # every worker collects the same tests
        tmp = f"{path}.{os.environ['PYTEST_XDIST_WORKER']}"
        Path(tmp).write_text(json.dumps({k: v for k, v in groups.items() if v}))
        os.replace(tmp, path)


if xdist is not None:
    def pytest_xdist_make_scheduler(config: pytest.Config, log) -> Optional[object]:
        """`--dist loadgroup`: xdist's load-by-scope scheduler, scoped by our groups."""
        if config.getvalue("dist") != "loadgroup":
            return None
        from xdist.scheduler import LoadScopeScheduling

        class FixtureGroups(LoadScopeScheduling):
            groups: Optional[dict[str, str]] = None

            def _split_scope(self, nodeid: str) -> str:
                if self.groups is None:  # the workers have collected: the file is written
                    self.groups = json.loads(Path(os.environ[GROUPS_FILE]).read_text())
                    if not self.groups:
                        raise RuntimeError(f"no test groups in {os.environ[GROUPS_FILE]}")
                return self.groups.get(nodeid, nodeid)

        return FixtureGroups(config, log)
