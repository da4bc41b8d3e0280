"""Pairwise (all-pairs) covering sets for option grids.

A test over N options that each take a few values need not run the full product: most
interaction bugs need two options at particular values. A pairwise set holds, for every two
options and every pair of their values, at least one row with both. Greedy and
deterministic: repeatedly take, from the full product in order, the row that covers most
pairs not yet covered (ties: the first such row). Fine for grids of a few hundred rows.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

Row = tuple[Any, ...]


def pairs_of(row: Row) -> set[tuple[int, Any, int, Any]]:
    """Every (option i, its value, option j, its value), i < j, that the row exercises."""
    return {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(row)), 2)}


def all_pairs(values: Sequence[Sequence[Any]]) -> set[tuple[int, Any, int, Any]]:
    """Every pair a covering set must hold."""
    return {(i, a, j, b) for i, j in itertools.combinations(range(len(values)), 2)
            for a in values[i] for b in values[j]}


def pairwise_rows(values: Sequence[Sequence[Any]]) -> list[Row]:
    """A small set of rows (one value per option) covering every pair of option values."""
    candidates = list(itertools.product(*values))
    uncovered = all_pairs(values)
    rows: list[Row] = []
    while uncovered:
        best = max(candidates, key=lambda row: len(pairs_of(row) & uncovered))  # first max wins
        rows.append(best)
        uncovered -= pairs_of(best)
    return rows


def missing_pairs(rows: Sequence[Row], values: Sequence[Sequence[Any]]) -> set[tuple[int, Any, int, Any]]:
    """The pairs that no row covers (empty for a pairwise set); checked independently of the
    generator: every pair is looked for in the rows."""
    return {(i, a, j, b) for (i, a, j, b) in all_pairs(values)
            if not any(row[i] == a and row[j] == b for row in rows)}
