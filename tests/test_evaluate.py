import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from recbase.evaluate import (auc_score, build_ctr_pairs, evaluate_ctr, evaluate_rankings, hit_ranks,
                              mrr, ndcg_at_k, recall_at_k, user_auc)


def _pairwise_auc(labels, scores):
    """O(P*N) brute force: mean over (pos, neg) pairs of 1[p > n] + 0.5 * 1[p == n]."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


try:  # scikit-learn is a second, independent reference where installed
    from sklearn.metrics import roc_auc_score
except ImportError:  # pragma: no cover
    roc_auc_score = _pairwise_auc


def test_hand_computed():
    rankings = np.array([[4, 2, 7, 1, 0],     # target 7 at rank 2
                         [3, 3, 5, -1, -1],   # target 5 at rank 2 (duplicate 3 before it)
                         [9, 8, 6, 5, 4]])    # target 1 absent
    targets = np.array([7, 5, 1])
    assert hit_ranks(rankings, targets).tolist() == [2, 2, -1]
    assert recall_at_k(rankings, targets, 2) == 0.0
    assert recall_at_k(rankings, targets, 3) == pytest.approx(2 / 3)
    assert ndcg_at_k(rankings, targets, 5) == pytest.approx((2 * 0.5) / 3)  # 1/log2(4) = 0.5
    assert mrr(rankings, targets) == pytest.approx((1 / 3 + 1 / 3) / 3)
    assert mrr(rankings, targets, k=2) == 0.0
    res = evaluate_rankings(rankings, targets, ks=(1, 5))
    assert res["hr@5"] == res["recall@5"] == pytest.approx(2 / 3) and res["users"] == 3


def test_multi_target_ndcg_hand():
    # targets {1, 2}; ranked [1, 0, 2]: DCG = 1 + 1/log2(4) = 1.5; IDCG@3 = 1 + 1/log2(3)
    r = np.array([[1, 0, 2]])
    assert ndcg_at_k(r, [np.array([1, 2])], 3) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    assert recall_at_k(r, [np.array([1, 2])], 2) == 0.5
    # a repeated hit counts once
    assert recall_at_k(np.array([[1, 1, 0]]), [np.array([1, 2])], 3) == 0.5


def _brute(rankings, targets, k):
    rec, nd, rr = [], [], []
    for row, t in zip(rankings.tolist(), targets.tolist()):
        seen, r = set(), None
        for j, it in enumerate(row):
            if it == t and it not in seen and it >= 0:
                r = j
                break
            seen.add(it)
        rec.append(1.0 if r is not None and r < k else 0.0)
        nd.append(1.0 / math.log2(r + 2) if r is not None and r < k else 0.0)
        rr.append(1.0 / (r + 1) if r is not None else 0.0)
    return np.mean(rec), np.mean(nd), np.mean(rr)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 20), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_against_bruteforce(users, width, seed):
    rng = np.random.default_rng(seed)
    rankings = rng.integers(-1, 15, size=(users, width))
    targets = rng.integers(0, 15, size=users)
    for k in {1, width, max(1, width // 2)}:
        rec, nd, _ = _brute(rankings, targets, k)
        assert recall_at_k(rankings, targets, k) == pytest.approx(rec)
        assert ndcg_at_k(rankings, targets, k) == pytest.approx(nd)
    assert mrr(rankings, targets) == pytest.approx(_brute(rankings, targets, width)[2])


def test_errors():
    with pytest.raises(ValueError, match="k=6 exceeds the ranked list length 5"):
        recall_at_k(np.zeros((2, 5), np.int64), np.array([0, 1]), 6)
    with pytest.raises(ValueError, match="2-D"):
        recall_at_k(np.zeros(5, np.int64), np.array([0]), 1)
    with pytest.raises(ValueError, match="one entry per ranked list"):
        recall_at_k(np.zeros((2, 5), np.int64), np.array([0]), 1)
    with pytest.raises(TypeError, match="integer"):
        recall_at_k(np.zeros((2, 5)), np.array([0, 1]), 1)
    with pytest.raises(ValueError, match=">= 0"):
        recall_at_k(np.full((1, 2), -3), np.array([0]), 1)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 15), st.integers(1, 15), st.integers(0, 2**31 - 1), st.booleans())
def test_auc_vs_sklearn(n_pos, n_neg, seed, ties):
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, 4, n_pos).astype(float) if ties else rng.normal(size=n_pos)
    neg = rng.integers(0, 4, n_neg).astype(float) if ties else rng.normal(size=n_neg)
    y, sc = np.r_[np.ones(n_pos), np.zeros(n_neg)], np.r_[pos, neg]
    assert auc_score(pos, neg) == pytest.approx(roc_auc_score(y, sc), abs=1e-12)
    assert auc_score(pos, neg) == pytest.approx(_pairwise_auc(y, sc), abs=1e-12)


def test_user_auc_vs_sklearn():
    rng = np.random.default_rng(5)
    users = rng.integers(0, 12, 300)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + labels * 0.8
    mean, ids, per = user_auc(scores, labels, users)
    ref = {}
    for u in np.unique(users):
        m = users == u
        if len(np.unique(labels[m])) == 2:
            ref[u] = roc_auc_score(labels[m], scores[m])
    assert ids.tolist() == sorted(ref)
    assert per == pytest.approx([ref[u] for u in ids])
    assert mean == pytest.approx(np.mean(list(ref.values())))
    with pytest.raises(ValueError, match="0/1"):
        user_auc(scores, labels * 2, users)


def test_build_ctr_pairs_protocol():
    rng = np.random.default_rng(0)
    n_items = 500
    positives = [rng.choice(n_items, size=rng.integers(0, 25), replace=False) for _ in range(40)]
    history = [rng.choice(n_items, size=30, replace=False) for _ in range(40)]
    pairs = build_ctr_pairs(positives, n_items, exclude=history, seed=3)
    again = build_ctr_pairs(positives, n_items, exclude=history, seed=3)
    assert np.array_equal(pairs.item, again.item) and np.array_equal(pairs.label, again.label)
    assert not np.array_equal(pairs.item, build_ctr_pairs(positives, n_items, exclude=history, seed=4).item)
    for u in range(40):
        m = pairs.user == u
        if len(positives[u]) == 0:
            assert not m.any()
            continue
        pos, neg = pairs.item[m & (pairs.label == 1)], pairs.item[m & (pairs.label == 0)]
        assert len(pos) == min(10, len(positives[u])) and set(pos) <= set(positives[u])
        assert len(neg) == 10 and len(set(neg)) == 10
        assert not set(neg) & (set(positives[u]) | set(history[u]))
    # perfect scorer -> AUC 1; a scorer that ignores labels -> 0.5 (all ties)
    assert evaluate_ctr(pairs.label.astype(float), pairs)["auc"] == 1.0
    assert evaluate_ctr(np.zeros(len(pairs)), pairs)["auc"] == 0.5
    cands = pairs.candidates(40)
    assert sum(len(c) for c in cands) == len(pairs)


def test_build_ctr_pairs_small_catalog():
    # only 3 items are neither positive nor excluded: all of them, once each
    pairs = build_ctr_pairs([np.array([0])], 5, exclude=[np.array([1])], seed=0)
    assert sorted(pairs.item[pairs.label == 0].tolist()) == [2, 3, 4]
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        build_ctr_pairs([np.array([7])], 5)
    with pytest.raises(ValueError, match="no user has a positive"):
        build_ctr_pairs([np.array([], dtype=np.int64)], 5)



@pytest.mark.parametrize("module", ['recbase.evaluate'])
def test_docstring_examples(module):
    import doctest
    import importlib
    res = doctest.testmod(importlib.import_module(module))
    assert res.failed == 0 and res.attempted > 0
