"""Ranking metrics (leave-one-out, full-catalog), the CTR/AUC protocol and direct
recommendation among given candidates (P5: 1 held-out positive + 99 sampled negatives).

Rankings are item indices (not concept-ID tuples): ``rankings[b]`` is user b's ranked list,
best first; ``-1`` pads a list shorter than K and never counts as a hit. A target set
``T_b`` per user (one item for leave-one-out). With ``r`` the 0-based rank of a hit:

* Recall@K = |top-K ∩ T| / |T|        (= HR@K when |T| = 1)
* NDCG@K   = sum_{hits r<K} 1/log2(r+2) / sum_{i<min(|T|,K)} 1/log2(i+2)
* MRR(@K)  = 1/(r_first+1) for the first hit (within K), else 0
* AUC (per user, Mann–Whitney, ties count 1/2) = (#{p>n} + 0.5 #{p=n}) / (|P||N|)
* direct: with R the 1-based rank of the positive among its candidates, HR@K = [R <= K],
  NDCG@K = [R <= K] / log2(R + 1)

Only the first occurrence of an item in a ranked list counts. Averages are over users.

Example:
    >>> import numpy as np
    >>> r = evaluate_rankings(np.array([[3, 1, 2], [0, 2, -1]]), np.array([1, 5]), ks=(1, 3))
    >>> r["recall@3"], round(r["ndcg@3"], 4), r["mrr"]
    (0.5, 0.3155, 0.25)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["hit_matrix", "hit_ranks", "recall_at_k", "ndcg_at_k", "mrr", "evaluate_rankings", "auc_score",
           "user_auc", "CTRPairs", "build_ctr_pairs", "evaluate_ctr", "CandidateSets",
           "sample_candidate_sets", "candidate_ranks", "evaluate_candidates"]

DEFAULT_KS = (5, 10, 20)


def _as_rankings(rankings) -> np.ndarray:
    r = np.asarray(rankings)
    if r.ndim != 2:
        raise ValueError(f"rankings must be a 2-D (users, K) array of item indices, got shape {r.shape}")
    if r.size and not np.issubdtype(r.dtype, np.integer):
        raise TypeError(f"rankings must hold integer item indices, got dtype {r.dtype}")
    if r.size and r.min() < -1:
        raise ValueError(f"rankings: item indices must be >= 0 (or -1 for padding), got {r.min()}")
    return r.astype(np.int64, copy=False)


def _as_targets(targets, n_users: int) -> list[np.ndarray] | np.ndarray:
    """(B,) int array for single targets, else a list of unique int arrays."""
    if isinstance(targets, np.ndarray) and targets.ndim == 1 and np.issubdtype(targets.dtype, np.integer):
        t = targets.astype(np.int64)
    elif isinstance(targets, (list, tuple)) and all(np.isscalar(x) for x in targets):
        t = np.asarray(targets, dtype=np.int64)
    else:
        t = [np.unique(np.asarray(x, dtype=np.int64).ravel()) for x in targets]
        if any(len(x) == 0 for x in t):
            raise ValueError("targets: every user needs at least one target item")
    if len(t) != n_users:
        raise ValueError(f"targets: expected one entry per ranked list ({n_users}), got {len(t)}")
    return t


def _first_occurrence(r: np.ndarray) -> np.ndarray:
    """Mask of entries that are the first occurrence of their item in their row."""
    B, K = r.shape
    order = np.argsort(r, axis=1, kind="stable")
    sr = np.take_along_axis(r, order, axis=1)
    first_sorted = np.ones_like(sr, dtype=bool)
    first_sorted[:, 1:] = sr[:, 1:] != sr[:, :-1]
    mask = np.empty_like(first_sorted)
    np.put_along_axis(mask, order, first_sorted, axis=1)
    return mask & (r >= 0)


def hit_matrix(rankings, targets) -> tuple[np.ndarray, np.ndarray]:
    """(B, K) bool: rankings[b, j] is a (first-occurrence) target; and |T_b| per user."""
    r = _as_rankings(rankings)
    t = _as_targets(targets, r.shape[0])
    if isinstance(t, np.ndarray):
        hits = r == t[:, None]
        n_t = np.ones(r.shape[0], dtype=np.int64)
    else:
        hits = np.zeros(r.shape, dtype=bool)
        for b, tb in enumerate(t):
            hits[b] = np.isin(r[b], tb)
        n_t = np.array([len(x) for x in t], dtype=np.int64)
    return hits & _first_occurrence(r), n_t


def hit_ranks(rankings, targets) -> np.ndarray:
    """0-based rank of the first hit per user, -1 when no target is in the list."""
    hits, _ = hit_matrix(rankings, targets)
    has = hits.any(1)
    return np.where(has, hits.argmax(1), -1)


def _check_k(k, width: int) -> int:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if k > width:
        raise ValueError(f"k={k} exceeds the ranked list length {width}; rank at least k items")
    return int(k)


def _per_user(rankings, targets, k: int, metric: str) -> np.ndarray:
    hits, n_t = hit_matrix(rankings, targets)
    k = _check_k(k, hits.shape[1])
    hits = hits[:, :k]
    if metric == "recall":
        return hits.sum(1) / n_t
    if metric == "ndcg":
        disc = 1.0 / np.log2(np.arange(k) + 2.0)
        dcg = (hits * disc).sum(1)
        ideal = np.cumsum(disc)[np.minimum(n_t, k) - 1]
        return dcg / ideal
    if metric == "mrr":
        has = hits.any(1)
        return np.where(has, 1.0 / (hits.argmax(1) + 1.0), 0.0)
    raise ValueError(metric)


def recall_at_k(rankings, targets, k: int) -> float:
    """Mean Recall@K (= HR@K for one target per user)."""
    return float(_per_user(rankings, targets, k, "recall").mean())


def ndcg_at_k(rankings, targets, k: int) -> float:
    """Mean NDCG@K (binary relevance)."""
    return float(_per_user(rankings, targets, k, "ndcg").mean())


def mrr(rankings, targets, k: int | None = None) -> float:
    """Mean reciprocal rank of the first hit (within the top ``k`` if given, else the whole
    list; a user with no hit contributes 0)."""
    r = _as_rankings(rankings)
    return float(_per_user(r, targets, r.shape[1] if k is None else k, "mrr").mean())


def evaluate_rankings(rankings, targets, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``{"recall@K", "hr@K", "ndcg@K", "mrr@K" for K in ks, "mrr", "users"}``."""
    r = _as_rankings(rankings)
    if r.shape[0] == 0:
        raise ValueError("evaluate_rankings: no users to evaluate")
    out: dict[str, float] = {"users": int(r.shape[0])}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(r, targets, k)
        out[f"hr@{k}"] = float((_per_user(r, targets, k, "recall") > 0).mean())
        out[f"ndcg@{k}"] = ndcg_at_k(r, targets, k)
        out[f"mrr@{k}"] = mrr(r, targets, k)
    out["mrr"] = mrr(r, targets)
    return out


# ----------------------------------------------------------------------------------------------
# AUC
# ----------------------------------------------------------------------------------------------
def auc_score(pos_scores, neg_scores) -> float:
    """Tie-aware AUC = P(s_pos > s_neg) + 0.5 P(s_pos = s_neg) over all pos x neg pairs."""
    p = np.asarray(pos_scores, dtype=np.float64).ravel()
    n = np.sort(np.asarray(neg_scores, dtype=np.float64).ravel())
    if p.size == 0 or n.size == 0:
        raise ValueError(f"auc_score needs at least one positive and one negative, got "
                         f"{p.size} positive(s), {n.size} negative(s)")
    if np.isnan(p).any() or np.isnan(n).any():
        raise ValueError("auc_score: scores contain NaN")
    below = np.searchsorted(n, p, side="left")
    equal = np.searchsorted(n, p, side="right") - below
    return float((below.sum() + 0.5 * equal.sum()) / (p.size * n.size))


def user_auc(scores, labels, users) -> tuple[float, np.ndarray, np.ndarray]:
    """Per-user AUC averaged over users that have both a positive and a negative.

    Returns ``(mean_auc, user_ids, per_user_auc)``."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    u = np.asarray(users).ravel()
    if not (len(s) == len(y) == len(u)):
        raise ValueError(f"user_auc: scores, labels, users must have one entry per pair, got "
                         f"{len(s)}, {len(y)}, {len(u)}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("user_auc: labels must be 0/1")
    y = y.astype(bool)
    order = np.argsort(u, kind="stable")
    u_s, s_s, y_s = u[order], s[order], y[order]
    bounds = np.flatnonzero(np.r_[True, u_s[1:] != u_s[:-1], True])
    ids, aucs = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        yy, ss = y_s[a:b], s_s[a:b]
        if yy.any() and (~yy).any():
            ids.append(u_s[a])
            aucs.append(auc_score(ss[yy], ss[~yy]))
    if not aucs:
        raise ValueError("user_auc: no user has both a positive and a negative pair")
    aucs = np.asarray(aucs)
    return float(aucs.mean()), np.asarray(ids), aucs


@dataclass
class CTRPairs:
    """Scoring pairs of the CTR protocol: ``user[m]`` (index into the user list),
    ``item[m]`` (item index), ``label[m]`` (1 positive, 0 sampled negative)."""

    user: np.ndarray
    item: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    def candidates(self, num_users: int) -> list[np.ndarray]:
        """Per-user candidate item arrays (pair order within a user kept), for ``score``."""
        out = [[] for _ in range(num_users)]
        for uu, it in zip(self.user.tolist(), self.item.tolist()):
            out[uu].append(it)
        return [np.asarray(x, dtype=np.int64) for x in out]


def _sample_negatives(rng: np.random.Generator, num_items: int, banned: np.ndarray, count: int) -> np.ndarray:
    """``min(count, free)`` distinct items of ``[0, num_items)`` outside the sorted ``banned``
    set, drawn uniformly without replacement (in draw order)."""
    n_free = num_items - banned.size
    k = min(count, n_free)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if n_free > 4 * k:  # rejection sampling is fast when the catalog is much larger than the banned set
        neg = np.empty(0, dtype=np.int64)
        while neg.size < k:
            draw = rng.integers(0, num_items, size=2 * k + 8)
            cat = np.concatenate([neg, draw[~np.isin(draw, banned)]])
            _, first = np.unique(cat, return_index=True)
            neg = cat[np.sort(first)]  # unique, in draw order
        return neg[:k]
    return rng.choice(np.setdiff1d(np.arange(num_items), banned), size=k, replace=False)


def build_ctr_pairs(positives: Sequence[np.ndarray], num_items: int, *, max_positives: int = 10,
                    num_negatives: int = 10, exclude: Sequence[np.ndarray] | None = None,
                    seed: int = 0) -> CTRPairs:
    """RecBase's CTR protocol: per user, up to ``max_positives`` positives (a seeded random
    subset of ``positives[u]`` when there are more) and ``num_negatives`` random negatives,
    drawn uniformly without replacement from items that are neither positives nor in
    ``exclude[u]`` (e.g. the user's whole history). Users with no positive are skipped.
    Deterministic for a given seed."""
    if not isinstance(num_items, (int, np.integer)) or num_items < 1:
        raise ValueError(f"build_ctr_pairs: num_items must be an int >= 1, got {num_items!r}")
    if exclude is not None and len(exclude) != len(positives):
        raise ValueError(f"build_ctr_pairs: exclude must have one entry per user ({len(positives)}), "
                         f"got {len(exclude)}")
    rng = np.random.default_rng(seed)
    users, items, labels = [], [], []
    for u, pos in enumerate(positives):
        pos = np.unique(np.asarray(pos, dtype=np.int64))
        if pos.size and (pos.min() < 0 or pos.max() >= num_items):
            raise ValueError(f"build_ctr_pairs: positives[{u}] has item indices outside [0, {num_items})")
        if pos.size == 0:
            continue
        # every positive (sampled or not) and every excluded item is banned as a negative
        banned = pos if exclude is None else np.union1d(pos, np.asarray(exclude[u], dtype=np.int64))
        if pos.size > max_positives:
            pos = rng.choice(pos, size=max_positives, replace=False)
        neg = _sample_negatives(rng, num_items, banned, num_negatives)
        users.append(np.full(pos.size + neg.size, u, dtype=np.int64))
        items.append(np.concatenate([pos, neg]))
        labels.append(np.r_[np.ones(pos.size, np.int8), np.zeros(neg.size, np.int8)])
    if not users:
        raise ValueError("build_ctr_pairs: no user has a positive")
    return CTRPairs(np.concatenate(users), np.concatenate(items), np.concatenate(labels))


def evaluate_ctr(scores, pairs: CTRPairs) -> dict[str, float]:
    """``{"auc": mean per-user AUC, "global_auc": AUC over all pairs, "users", "pairs"}``."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(s) != len(pairs):
        raise ValueError(f"evaluate_ctr: expected one score per pair ({len(pairs)}), got {len(s)}")
    mean_auc, ids, _ = user_auc(s, pairs.label, pairs.user)
    y = pairs.label.astype(bool)
    return {"auc": mean_auc, "global_auc": auc_score(s[y], s[~y]), "users": int(len(ids)),
            "pairs": int(len(pairs))}


# ----------------------------------------------------------------------------------------------
# Direct recommendation among given candidates (P5's protocol)
# ----------------------------------------------------------------------------------------------
@dataclass
class CandidateSets:
    """One candidate list per user: ``items[u]`` (C item indices) holds the held-out positive at
    column ``positive[u]`` (a seeded random column, so a scorer that ties everything is ranked
    at random, not first) and ``C - 1`` sampled negatives."""

    items: np.ndarray     # [U, C] int64
    positive: np.ndarray  # [U] int64

    def __len__(self) -> int:
        return len(self.items)


def sample_candidate_sets(targets, num_items: int, *, exclude: Sequence[np.ndarray] | None = None,
                          num_negatives: int = 99, seed: int = 0) -> CandidateSets:
    """P5's direct-recommendation protocol: per user the held-out ``targets[u]`` and
    ``num_negatives`` items drawn uniformly without replacement from the items the user never
    interacted with (neither the target nor ``exclude[u]``, e.g. the whole sequence), in a
    seeded random order. Deterministic for a given seed."""
    t = np.asarray(targets, dtype=np.int64).ravel()
    if not isinstance(num_items, (int, np.integer)) or num_items < 1:
        raise ValueError(f"sample_candidate_sets: num_items must be an int >= 1, got {num_items!r}")
    if not isinstance(num_negatives, (int, np.integer)) or num_negatives < 1:
        raise ValueError(f"sample_candidate_sets: num_negatives must be an int >= 1, got {num_negatives!r}")
    if t.size == 0:
        raise ValueError("sample_candidate_sets: no targets")
    if t.min() < 0 or t.max() >= num_items:
        raise ValueError(f"sample_candidate_sets: targets must be item indices in [0, {num_items})")
    if exclude is not None and len(exclude) != t.size:
        raise ValueError(f"sample_candidate_sets: exclude must have one entry per target ({t.size}), "
                         f"got {len(exclude)}")
    rng = np.random.default_rng(seed)
    items = np.empty((t.size, num_negatives + 1), dtype=np.int64)
    positive = np.empty(t.size, dtype=np.int64)
    for u, target in enumerate(t.tolist()):
        banned = np.array([target]) if exclude is None else np.union1d([target], np.asarray(exclude[u], np.int64))
        neg = _sample_negatives(rng, num_items, banned, num_negatives)
        if neg.size < num_negatives:
            raise ValueError(f"sample_candidate_sets: user {u} leaves only {neg.size} items to sample "
                             f"{num_negatives} negatives from (catalog of {num_items}); ask for fewer negatives")
        col = int(rng.integers(0, num_negatives + 1))
        items[u] = np.insert(neg, col, target)
        positive[u] = col
    return CandidateSets(items, positive)


def candidate_ranks(scores, sets: CandidateSets) -> np.ndarray:
    """1-based rank of each user's positive among its candidates by descending score; a tie
    goes to the candidate in the earlier column (the columns are in a seeded random order)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != sets.items.shape:
        raise ValueError(f"candidate_ranks: scores must be [users, candidates] = {sets.items.shape}, "
                         f"got {s.shape}")
    if np.isnan(s).any():
        raise ValueError("candidate_ranks: scores contain NaN")
    u = np.arange(len(s))
    pos = s[u, sets.positive][:, None]
    col = np.arange(s.shape[1])[None, :]
    ahead = (s > pos) | ((s == pos) & (col < sets.positive[:, None]))
    return ahead.sum(1) + 1


def evaluate_candidates(scores, sets: CandidateSets, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"hr@K", "ndcg@K", "se_hr@K", "se_ndcg@K" (standard errors over users) for K in ks,
    "users"}`` with, for the positive's rank r: HR@K = [r <= K], NDCG@K = [r <= K] / log2(r + 1)
    (so NDCG@1 = HR@1; P5 reports HR@1/5/10 and NDCG@5/10)."""
    r = candidate_ranks(scores, sets)
    out: dict[str, float] = {"users": int(len(r))}
    for k in ks:
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= sets.items.shape[1]:
            raise ValueError(f"ks: each K must be an int in [1, {sets.items.shape[1]}], got {k!r}")
        for name, per in (("hr", (r <= k).astype(np.float64)),
                          ("ndcg", np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0))):
            out[f"{name}@{k}"] = float(per.mean())
            out[f"se_{name}@{k}"] = float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else float("nan")
    return out
