"""Fixed leave-one-out split (the protocol of SASRec / TIGER / P5 sequential tasks).

For every user with at least ``min_interactions`` (default 3) interactions, ordered
chronologically by ``(timestamp, row position in the interaction table)``:

* test target  = last item,           test history  = all items before it,
* valid target = second-to-last item, valid history = all items before it,
* training sequence = all items but the last two.

Users with fewer than ``min_interactions`` interactions are not evaluated; their whole
sequence is used for training only (``LeaveOneOutSplit.train_sequences`` includes them).
The split is deterministic: no randomness is involved once the order key is fixed
(Book-Crossing's synthetic order is seeded, see :func:`recbase.datasets.load`).

Example:
    >>> import pandas as pd
    >>> inter = pd.DataFrame({"user_id": ["u"] * 4 + ["v"], "item_id": list("abcda"),
    ...                       "timestamp": [1, 2, 3, 4, 1]})
    >>> s = leave_one_out(inter)
    >>> s.test_targets.tolist(), s.valid_targets.tolist(), [h.tolist() for h in s.train_sequences]
    ([3], [2], [[0, 1], [0]])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .sequences import ItemIndex, user_sequences, user_values

__all__ = ["LeaveOneOutSplit", "leave_one_out", "holdout_last"]


@dataclass
class LeaveOneOutSplit:
    item_index: ItemIndex
    user_ids: np.ndarray                 # evaluated users (U,)
    sequences: list[np.ndarray]          # their full chronological sequences
    short_user_ids: np.ndarray           # users with < min_interactions (train only)
    short_sequences: list[np.ndarray]
    # the rating of each interaction, aligned with sequences / short_sequences (None when the
    # interactions have no rating column)
    ratings: list[np.ndarray] | None = None
    short_ratings: list[np.ndarray] | None = None

    @property
    def num_items(self) -> int:
        return len(self.item_index)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def train_sequences(self) -> list[np.ndarray]:
        """Training data: evaluated users' sequences without their last two items, then the
        short users' full sequences."""
        return [s[:-2] for s in self.sequences] + list(self.short_sequences)

    @property
    def valid_histories(self) -> list[np.ndarray]:
        return [s[:-2] for s in self.sequences]

    @property
    def valid_targets(self) -> np.ndarray:
        return np.array([s[-2] for s in self.sequences], dtype=np.int64)

    @property
    def test_histories(self) -> list[np.ndarray]:
        return [s[:-1] for s in self.sequences]

    @property
    def test_targets(self) -> np.ndarray:
        return np.array([s[-1] for s in self.sequences], dtype=np.int64)

    @property
    def train_ratings(self) -> list[np.ndarray]:
        """Ratings of :attr:`train_sequences`, item by item."""
        self._need_ratings()
        return [r[:-2] for r in self.ratings] + list(self.short_ratings)

    @property
    def valid_ratings(self) -> tuple[list[np.ndarray], np.ndarray]:
        """(ratings of each validation history, rating of each validation target)."""
        self._need_ratings()
        return [r[:-2] for r in self.ratings], np.array([r[-2] for r in self.ratings], dtype=np.float64)

    @property
    def test_ratings(self) -> tuple[list[np.ndarray], np.ndarray]:
        """(ratings of each test history, rating of each test target: the last rated item)."""
        self._need_ratings()
        return [r[:-1] for r in self.ratings], np.array([r[-1] for r in self.ratings], dtype=np.float64)

    def _need_ratings(self) -> None:
        if self.ratings is None:
            raise ValueError("this split has no ratings (its interactions had no 'rating' column)")

    def train_interaction_counts(self) -> np.ndarray:
        """Per-item interaction counts in the training sequences (popularity)."""
        seqs = self.train_sequences
        flat = np.concatenate(seqs) if seqs else np.empty(0, np.int64)
        return np.bincount(flat, minlength=self.num_items).astype(np.int64)

    def __repr__(self) -> str:
        return (f"LeaveOneOutSplit(users={self.num_users}, short_users={len(self.short_user_ids)}, "
                f"items={self.num_items})")


def leave_one_out(data, item_index: ItemIndex | None = None, *,
                  min_interactions: int = 3) -> LeaveOneOutSplit:
    """Leave-one-out split of a :class:`recbase.datasets.Dataset` or an interaction frame
    (``user_id``, ``item_id``, optional ``timestamp``). ``item_index`` defaults to the
    dataset's catalog order (or sorted unique item ids for a bare frame)."""
    if not isinstance(min_interactions, (int, np.integer)) or min_interactions < 3:
        raise ValueError(f"leave_one_out: min_interactions must be an int >= 3 (one train, one "
                         f"valid, one test item), got {min_interactions!r}")
    if isinstance(data, pd.DataFrame):
        inter = data
        if item_index is None:
            item_index = ItemIndex(sorted(inter["item_id"].astype(str).unique()))
    elif hasattr(data, "interactions") and hasattr(data, "items"):
        inter = data.interactions
        if item_index is None:
            item_index = ItemIndex.from_items(data.items)
    else:
        raise TypeError(f"leave_one_out: data must be a Dataset or a DataFrame, got {type(data).__name__}")
    users, seqs = user_sequences(inter, item_index)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    keep = lengths >= min_interactions
    vals = user_values(inter, "rating") if "rating" in inter.columns else None
    return LeaveOneOutSplit(
        item_index=item_index,
        user_ids=users[keep],
        sequences=[s for s, k in zip(seqs, keep) if k],
        short_user_ids=users[~keep],
        short_sequences=[s for s, k in zip(seqs, keep) if not k],
        ratings=None if vals is None else [v for v, k in zip(vals, keep) if k],
        short_ratings=None if vals is None else [v for v, k in zip(vals, keep) if not k],
    )


def holdout_last(sequences, max_positives: int = 10, *, min_history: int = 1
                 ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """CTR-protocol split of chronological sequences: the last ``min(max_positives,
    len - min_history)`` items of each sequence are the positives, the items before them the
    history. Sequences shorter than ``min_history + 1`` are skipped.

    Returns ``(histories, positives, kept)`` with ``kept`` the indices of the sequences used.

    Example:
        >>> h, p, kept = holdout_last([np.arange(5), np.arange(1)], max_positives=2)
        >>> [x.tolist() for x in h], [x.tolist() for x in p], kept.tolist()
        ([[0, 1, 2]], [[3, 4]], [0])
    """
    if not isinstance(max_positives, (int, np.integer)) or max_positives < 1:
        raise ValueError(f"holdout_last: max_positives must be an int >= 1, got {max_positives!r}")
    if not isinstance(min_history, (int, np.integer)) or min_history < 0:
        raise ValueError(f"holdout_last: min_history must be an int >= 0, got {min_history!r}")
    hist, pos, kept = [], [], []
    for u, s in enumerate(sequences):
        s = np.asarray(s, dtype=np.int64)
        n_pos = min(max_positives, len(s) - min_history)
        if n_pos < 1:
            continue
        hist.append(s[:-n_pos])
        pos.append(s[-n_pos:])
        kept.append(u)
    return hist, pos, np.asarray(kept, dtype=np.int64)
