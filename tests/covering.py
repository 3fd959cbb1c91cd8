"""Deterministic covering arrays ("pairwise" test selection).

A strength-t covering array over named axes is a list of rows (one value per
axis) such that every combination of values of any t axes appears in at least
one row. Pairwise (t=2) needs roughly (largest axis)^2 rows instead of the full
product, yet catches every bug that needs only two settings to show.

Greedy AETG construction: each new row starts from a still-uncovered t-tuple
and fills the remaining axes one at a time with the value that covers the most
new tuples; the best of a few candidate rows is kept. A seeded RNG makes the
result the same on every run, so test ids are stable.
"""

from __future__ import annotations

import itertools
import random
from typing import Dict, List, Sequence


def covering_array(axes: Dict[str, Sequence], strength: int = 2, seed: int = 0, candidates: int = 12) -> List[dict]:
    names = list(axes)
    sizes = [len(axes[n]) for n in names]
    n_axes = len(names)
    strength = min(strength, n_axes)
    rng = random.Random(seed)

    combos = list(itertools.combinations(range(n_axes), strength))
    uncovered = {
        (combo, vals)
        for combo in combos
        for vals in itertools.product(*(range(sizes[a]) for a in combo))
    }
    combos_with = {a: [c for c in combos if a in c] for a in range(n_axes)}

    def new_tuples(row, axis):
        """Uncovered tuples that `row` covers among those involving `axis` and only filled axes."""
        count = 0
        for combo in combos_with[axis]:
            if all(row[a] is not None for a in combo):
                if (combo, tuple(row[a] for a in combo)) in uncovered:
                    count += 1
        return count

    rows = []
    while uncovered:
        pool = sorted(uncovered)
        best_row, best_gain = None, -1
        for _ in range(candidates):
            combo, vals = rng.choice(pool)
            row = [None] * n_axes
            for a, v in zip(combo, vals):
                row[a] = v
            rest = [a for a in range(n_axes) if row[a] is None]
            rng.shuffle(rest)
            for axis in rest:
                order = list(range(sizes[axis]))
                rng.shuffle(order)
                best_v, best_count = order[0], -1
                for v in order:
                    row[axis] = v
                    count = new_tuples(row, axis)
                    if count > best_count:
                        best_v, best_count = v, count
                row[axis] = best_v
            gain = sum((c, tuple(row[a] for a in c)) in uncovered for c in combos)
            if gain > best_gain:
                best_row, best_gain = row, gain
        rows.append(best_row)
        for c in combos:
            uncovered.discard((c, tuple(best_row[a] for a in c)))

    return [{names[a]: axes[names[a]][row[a]] for a in range(n_axes)} for row in rows]
