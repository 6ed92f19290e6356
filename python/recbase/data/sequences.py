"""Interactions -> per-user item-index sequences.

Items are mapped to contiguous indices ``0..N-1`` in catalog order (:class:`ItemIndex`);
each user's interactions are ordered by ``(timestamp, row position)`` — a stable
chronological order in which ties keep the order of the rows in the interaction table.

Example:
    >>> import pandas as pd
    >>> idx = ItemIndex(["a", "b", "c"])
    >>> inter = pd.DataFrame({"user_id": ["u", "u", "v"], "item_id": ["c", "a", "b"],
    ...                       "timestamp": [5, 1, 3]})
    >>> users, seqs = user_sequences(inter, idx)
    >>> list(users), [s.tolist() for s in seqs]
    (['u', 'v'], [[0, 2], [1]])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

__all__ = ["ItemIndex", "user_sequences", "user_values", "chronological_order", "truncate_histories",
           "pad_sequences"]


class ItemIndex:
    """Bijection item id (str) <-> contiguous index 0..N-1."""

    def __init__(self, item_ids: Iterable) -> None:
        ids = np.asarray([str(i) for i in item_ids], dtype=object)
        self._pos = pd.Index(ids)
        if not self._pos.is_unique:
            dup = self._pos[self._pos.duplicated()].unique()[:5].tolist()
            raise ValueError(f"ItemIndex: item ids must be unique, duplicates e.g. {dup}")
        self.ids = ids

    @classmethod
    def from_items(cls, items: pd.DataFrame) -> "ItemIndex":
        if "item_id" not in items.columns:
            raise ValueError(f"ItemIndex.from_items: items needs an 'item_id' column, has {list(items.columns)}")
        return cls(items["item_id"].tolist())

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"ItemIndex({len(self)} items)"

    def encode(self, item_ids: Iterable) -> np.ndarray:
        """Item ids -> int64 indices; ValueError naming unknown ids."""
        arr = np.asarray([str(i) for i in item_ids] if not isinstance(item_ids, pd.Series)
                         else item_ids.astype(str).to_numpy(), dtype=object)
        idx = self._pos.get_indexer(arr)
        if (idx < 0).any():
            bad = pd.unique(arr[idx < 0])[:5].tolist()
            raise ValueError(f"ItemIndex.encode: {int((idx < 0).sum())} unknown item id(s), e.g. {bad}")
        return idx.astype(np.int64)

    def decode(self, indices) -> np.ndarray:
        """Indices -> item ids (object array); -1 (padding) -> None."""
        ind = np.asarray(indices, dtype=np.int64)
        if ind.size and (ind.max() >= len(self) or ind.min() < -1):
            raise ValueError(f"ItemIndex.decode: indices must be in [-1, {len(self) - 1}], "
                             f"got range [{ind.min()}, {ind.max()}]")
        out = np.empty(ind.shape, dtype=object)
        valid = ind >= 0
        out[valid] = self.ids[ind[valid]]
        out[~valid] = None
        return out


def chronological_order(interactions: pd.DataFrame) -> np.ndarray:
    """Row positions sorted by (user_id, timestamp, row position): stable chronology."""
    for col in ("user_id", "item_id"):
        if col not in interactions.columns:
            raise ValueError(f"interactions needs a {col!r} column, has {list(interactions.columns)}")
    users = interactions["user_id"].astype(str).to_numpy()
    user_code = pd.factorize(users, sort=True)[0]
    rowpos = np.arange(len(interactions))
    if "timestamp" in interactions.columns:
        ts = interactions["timestamp"].to_numpy()
        return np.lexsort((rowpos, ts, user_code))
    return np.lexsort((rowpos, user_code))


def user_sequences(interactions: pd.DataFrame, item_index: ItemIndex
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per-user chronological item-index sequences.

    Returns ``(user_ids, sequences)``: user ids sorted as strings, and one int64 array per
    user (oldest first). Ties in ``timestamp`` keep the interaction table's row order.
    """
    order = chronological_order(interactions)
    users = interactions["user_id"].astype(str).to_numpy()[order]
    items = item_index.encode(interactions["item_id"].astype(str).to_numpy()[order])
    if len(users) == 0:
        return np.empty(0, dtype=object), []
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    seqs = np.split(items, starts[1:])
    return users[starts].astype(object), seqs


def user_values(interactions: pd.DataFrame, column: str) -> list[np.ndarray]:
    """Per-user chronological values of ``column`` (e.g. ``rating``) aligned with
    :func:`user_sequences`: element j of user u's array belongs to item j of u's sequence."""
    if column not in interactions.columns:
        raise ValueError(f"interactions needs a {column!r} column, has {list(interactions.columns)}")
    order = chronological_order(interactions)
    users = interactions["user_id"].astype(str).to_numpy()[order]
    vals = interactions[column].to_numpy(dtype=np.float64)[order]
    if len(users) == 0:
        return []
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    return np.split(vals, starts[1:])


def truncate_histories(sequences: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Keep the ``max_len`` most recent items of each sequence."""
    if not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"truncate_histories: max_len must be an int >= 1, got {max_len!r}")
    return [np.asarray(s, dtype=np.int64)[-max_len:] for s in sequences]


def pad_sequences(sequences: Sequence[np.ndarray], max_len: int | None = None,
                  pad: int = -1, left: bool = True) -> np.ndarray:
    """(B, T) int64 matrix of the last ``max_len`` items, padded with ``pad`` (left by
    default, so the most recent item is in the last column)."""
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
    T = max((len(s) for s in seqs), default=0) if max_len is None else max_len
    out = np.full((len(seqs), max(T, 1) if max_len is None else T), pad, dtype=np.int64)
    for b, s in enumerate(seqs):
        s = s[-T:] if T else s[:0]
        if len(s):
            if left:
                out[b, T - len(s):] = s
            else:
                out[b, :len(s)] = s
    return out
