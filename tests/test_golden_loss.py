"""The tiny digits job's first 200 steps against tests/data/golden_loss.json (see
tests/golden_loss.py for what is pinned, why, and how to refresh it on purpose)."""
from __future__ import annotations

import json

import pytest

import golden_loss


@pytest.mark.slow
def test_the_first_200_steps_match_the_golden_loss(digits_shards):
    stored = json.loads(golden_loss.GOLDEN.read_text())
    now = golden_loss.current(digits_shards)
    lines, bad = golden_loss.compare(stored, now)
    assert not bad, "the loss curve moved (python tests/golden_loss.py prints the diff):\n" + \
        "\n".join(bad[:20])
