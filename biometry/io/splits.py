"""Seeded train/val/test splits that never put one subject in two splits."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from biometry.records import LandmarkRecord

SPLITS = ("train", "val", "test")


def split_by_subject(
    records: Sequence[LandmarkRecord],
    *,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, list[LandmarkRecord]]:
    """Split ``records`` by subject into ``{"train", "val", "test"}``.

    Subjects (sorted, so the input order does not matter) are shuffled with ``seed`` and cut by
    ``fractions`` of the subject count; each split with a positive fraction gets at least one
    subject when there are enough subjects. Records keep their input order within a split.

    Args:
        records: the records to split.
        fractions: shares of subjects for train, val and test; non-negative, summing to 1.
        seed: the shuffle seed; the same seed and subjects give the same split.

    >>> from biometry.records import LandmarkRecord
    >>> recs = [LandmarkRecord("x.png", None, 0.1, subject=str(i % 5), name=str(i)) for i in range(10)]
    >>> {k: len(v) for k, v in split_by_subject(recs, fractions=(0.6, 0.2, 0.2)).items()}
    {'train': 6, 'val': 2, 'test': 2}
    """
    shares = np.asarray(fractions, dtype=float)
    if shares.shape != (3,) or (shares < 0).any() or not np.isclose(shares.sum(), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1 but got {fractions}.")
    subjects = sorted({r.subject for r in records})
    order = np.random.default_rng(seed).permutation(len(subjects))
    counts = _counts(len(subjects), shares)
    bounds = np.cumsum([0, *counts])
    split_of = {}
    for k, name in enumerate(SPLITS):
        for i in order[bounds[k]:bounds[k + 1]]:
            split_of[subjects[i]] = name
    out = {name: [] for name in SPLITS}
    for r in records:
        out[split_of[r.subject]].append(r)
    return out


def _counts(n: int, shares: np.ndarray) -> list[int]:
    """Largest-remainder rounding of ``n * shares``, then one subject moved to each empty split
    with a positive share, taken from the largest."""
    raw = n * shares
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    for i in np.flatnonzero((counts == 0) & (shares > 0)):
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[i] += 1
    return counts.tolist()
