"""Pareto fronts: the points no other point beats on both axes.

Used by `edgepipe ablate` to show which variants are worth considering:
higher accuracy is better, lower latency (or size) is better.
"""
from __future__ import annotations

from typing import Callable, Sequence


def pareto_front(points: Sequence, cost: Callable, benefit: Callable) -> list:
    """Indices of the points on the front, sorted by increasing cost.

    A point is dominated when another has cost <= and benefit >= with at least
    one strict. Points whose cost or benefit is None are never on the front.
    Exact duplicates are all kept (neither dominates the other).
    """
    valid = [(i, float(cost(p)), float(benefit(p))) for i, p in enumerate(points)
             if cost(p) is not None and benefit(p) is not None]
    # Sort by cost ascending, then benefit descending: a sweep keeps a point
    # when its benefit beats the best seen at any lower cost.
    valid.sort(key=lambda t: (t[1], -t[2], t[0]))
    front, best, best_cost = [], float("-inf"), None
    for i, c, b in valid:
        if b > best:
            front.append(i)
            best, best_cost = b, c
        elif b == best and c == best_cost:
            front.append(i)  # exact duplicate of the last front point
    return front


def dominated_by(points: Sequence, cost: Callable, benefit: Callable) -> dict:
    """For each point off the front, the index of one front point that beats it."""
    front = pareto_front(points, cost, benefit)
    out = {}
    for i, p in enumerate(points):
        if i in front or cost(p) is None or benefit(p) is None:
            continue
        for j in front:
            q = points[j]
            if cost(q) <= cost(p) and benefit(q) >= benefit(p):
                out[i] = j
                break
    return out
