import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from recbase.data.sequences import ItemIndex, pad_sequences, truncate_histories, user_sequences
from recbase.data.splits import leave_one_out


def _random_inter(rng, n_users=30, n_items=25, ts_range=6):
    rows = []
    for u in range(n_users):
        for _ in range(rng.integers(1, 12)):
            rows.append((f"u{u:02d}", f"i{rng.integers(n_items)}", int(rng.integers(ts_range))))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    return inter.sample(frac=1.0, random_state=int(rng.integers(1 << 30))).reset_index(drop=True)


def _reference_sequences(inter, index):
    """Brute force: per user, rows sorted by (timestamp, row position)."""
    out = {}
    for pos, (u, i, t) in enumerate(inter[["user_id", "item_id", "timestamp"]].itertuples(index=False)):
        out.setdefault(u, []).append((t, pos, i))
    return {u: [index.encode([i])[0] for _, _, i in sorted(v)] for u, v in out.items()}


@pytest.mark.parametrize("seed", range(4))
def test_user_sequences_vs_bruteforce(seed):
    rng = np.random.default_rng(seed)
    inter = _random_inter(rng)  # few distinct timestamps -> many ties
    index = ItemIndex(sorted(inter["item_id"].unique()))
    users, seqs = user_sequences(inter, index)
    ref = _reference_sequences(inter, index)
    assert list(users) == sorted(ref)
    for u, s in zip(users, seqs):
        assert s.dtype == np.int64 and s.tolist() == ref[u]


@pytest.mark.parametrize("seed", range(4))
def test_leave_one_out(seed):
    rng = np.random.default_rng(100 + seed)
    inter = _random_inter(rng)
    split = leave_one_out(inter)
    ref = _reference_sequences(inter, split.item_index)
    long_users = sorted(u for u, s in ref.items() if len(s) >= 3)
    assert list(split.user_ids) == long_users
    assert sorted(split.short_user_ids) == sorted(u for u, s in ref.items() if len(s) < 3)
    for b, u in enumerate(long_users):
        s = ref[u]
        assert split.test_targets[b] == s[-1] and split.valid_targets[b] == s[-2]
        assert split.test_histories[b].tolist() == s[:-1]
        assert split.valid_histories[b].tolist() == s[:-2]
        assert split.train_sequences[b].tolist() == s[:-2]
    # no target leaks into training: total train length = total - 2 per evaluated user
    n_train = sum(len(x) for x in split.train_sequences)
    assert n_train == len(inter) - 2 * len(long_users)
    counts = split.train_interaction_counts()
    assert counts.sum() == n_train


def test_leave_one_out_min_interactions_and_errors():
    inter = pd.DataFrame({"user_id": ["a"] * 4 + ["b"] * 3, "item_id": list("wxyzwxy"),
                          "timestamp": [1, 2, 3, 4, 1, 2, 3]})
    assert list(leave_one_out(inter, min_interactions=4).user_ids) == ["a"]
    with pytest.raises(ValueError, match="min_interactions must be an int >= 3"):
        leave_one_out(inter, min_interactions=2)
    with pytest.raises(TypeError, match="Dataset or a DataFrame"):
        leave_one_out([1, 2])


def test_item_index():
    idx = ItemIndex(["b", "a", "c"])
    assert idx.encode(["c", "b"]).tolist() == [2, 0]
    assert idx.decode([1, -1]).tolist() == ["a", None]
    with pytest.raises(ValueError, match="unknown item id.*'zz'"):
        idx.encode(["zz"])
    with pytest.raises(ValueError, match="unique"):
        ItemIndex(["a", "a"])
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        idx.decode([3])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 99), max_size=12), max_size=6), st.integers(1, 8))
def test_truncate_and_pad(seqs, max_len):
    arrs = [np.array(s, dtype=np.int64) for s in seqs]
    tr = truncate_histories(arrs, max_len)
    assert [t.tolist() for t in tr] == [s[-max_len:] for s in seqs]
    pad = pad_sequences(arrs, max_len)
    assert pad.shape == (len(seqs), max_len)
    for row, s in zip(pad, seqs):
        kept = s[-max_len:]
        assert row[max_len - len(kept):].tolist() == kept and (row[:max_len - len(kept)] == -1).all()



@pytest.mark.parametrize("module", ['recbase.data.splits', 'recbase.data.sequences'])
def test_docstring_examples(module):
    import doctest
    import importlib
    res = doctest.testmod(importlib.import_module(module))
    assert res.failed == 0 and res.attempted > 0


def test_holdout_last():
    from recbase.data.splits import holdout_last
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 50, size=rng.integers(0, 25)) for _ in range(30)]
    hist, pos, kept = holdout_last(seqs, 10, min_history=2)
    assert kept.tolist() == [u for u, s in enumerate(seqs) if len(s) >= 3]
    for h, p, u in zip(hist, pos, kept):
        s = seqs[u]
        n = min(10, len(s) - 2)
        assert p.tolist() == s[-n:].tolist() and h.tolist() == s[:-n].tolist()
    with pytest.raises(ValueError, match="max_positives"):
        holdout_last(seqs, 0)
