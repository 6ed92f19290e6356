"""Honest baselines with one interface.

* :class:`Popularity` — score(i) = number of training interactions of item i.
* :class:`TextKNN` — zero-shot content baseline: user vector = mean of the (L2-normalised)
  text embeddings of the history items; score(i) = cos(user vector, e_i).
* :class:`SASRec` — in-domain self-attentive sequential recommender (Kang & McAuley 2018)
  trained with full-softmax cross-entropy over the whole catalog at every position (the
  variant that matches or beats BERT4Rec, Klenitskiy & Vasilev 2023), tied input/output item
  embeddings, early stopping on validation NDCG@10, seeded.
* :class:`TextSASRec` — UniSRec-style (Hou et al., KDD 2022) zero-shot text-sequence
  baseline: SASRec whose items are read only through a linear projection of their text
  embeddings and scored by cosine with them (no item IDs), so the network trained on the
  source domain scores a new domain's catalog unchanged (:meth:`TextSASRec.with_catalog`).
* Rating prediction (``fit(users, items, ratings)``, ``predict(users, items)``):
  :class:`GlobalMean`, :class:`BiasBaseline` (μ + b_u + b_i) and :class:`MatrixFactorization`
  (biased MF by ALS).

Common interface (item indices 0..N-1, histories oldest-first):

* ``fit(train_sequences, num_items, ...) -> self``
* ``scores(histories) -> (B, N) float32`` full-catalog scores
* ``recommend(histories, k, exclude_history=True) -> (B, k) int64`` best first; with
  ``exclude_history`` the user's history items are never recommended (standard for
  leave-one-out on MovieLens, where a test item is never a repeat); ``-1`` pads when fewer
  than k items remain. Ties are broken by lower item index.
* ``score(histories, candidates) -> list of (C_b,) float32`` scores of given candidates
  (the CTR/AUC protocol).

Example:
    >>> import numpy as np
    >>> pop = Popularity().fit([np.array([0, 1, 1]), np.array([1, 2])], num_items=4)
    >>> pop.recommend([np.array([1])], k=3).tolist()
    [[0, 2, 3]]
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import numpy as np

__all__ = ["BaseRecommender", "Popularity", "TextKNN", "SASRec", "TextSASRec", "top_k", "GlobalMean", "BiasBaseline",
           "MatrixFactorization"]


def _as_histories(histories) -> list[np.ndarray]:
    if isinstance(histories, np.ndarray) and histories.ndim == 1 and histories.dtype != object:
        raise TypeError("histories must be a list of 1-D item-index arrays (one per user), "
                        "got a single 1-D array; wrap it in a list")
    out = []
    for b, h in enumerate(histories):
        a = np.asarray(h, dtype=np.int64).ravel()
        out.append(a[a >= 0])  # -1 padding allowed
    return out


def top_k(scores: np.ndarray, k: int, banned: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Indices of the k largest scores per row (ties -> lower index first); ``banned[b]`` items
    are excluded; rows with fewer than k allowed items are padded with -1."""
    s = np.array(scores, dtype=np.float64, copy=True)
    B, N = s.shape
    if banned is not None:
        for b, items in enumerate(banned):
            if len(items):
                s[b, items] = -np.inf
    if np.isnan(s).any():
        raise ValueError("top_k: scores contain NaN")
    k_eff = min(k, N)
    kth = -np.partition(-s, k_eff - 1, axis=1)[:, k_eff - 1]  # k-th largest score per row
    out = np.full((B, k), -1, dtype=np.int64)
    for b in range(B):
        row = s[b]
        cand = np.flatnonzero(row >= kth[b]) if np.isfinite(kth[b]) else np.flatnonzero(np.isfinite(row))
        cand = cand[np.lexsort((cand, -row[cand]))][:k_eff]
        out[b, :len(cand)] = cand
    return out


class BaseRecommender:
    num_items: int = 0

    def _check_histories(self, histories) -> list[np.ndarray]:
        hs = _as_histories(histories)
        for b, h in enumerate(hs):
            if h.size and h.max() >= self.num_items:
                raise ValueError(f"histories[{b}] has item index {h.max()} >= num_items={self.num_items}")
        return hs

    def scores(self, histories) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def recommend(self, histories, k: int = 10, *, exclude_history: bool = True,
                  batch_size: int = 1024) -> np.ndarray:
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"recommend: k must be an int >= 1, got {k!r}")
        hs = self._check_histories(histories)
        outs = []
        for s in range(0, len(hs), batch_size):
            chunk = hs[s:s + batch_size]
            sc = self.scores(chunk)
            outs.append(top_k(sc, int(k), chunk if exclude_history else None))
        return np.concatenate(outs) if outs else np.zeros((0, k), np.int64)

    def score(self, histories, candidates, *, batch_size: int = 1024) -> list[np.ndarray]:
        hs = self._check_histories(histories)
        if len(candidates) != len(hs):
            raise ValueError(f"score: candidates must have one array per history ({len(hs)}), "
                             f"got {len(candidates)}")
        out = []
        for s in range(0, len(hs), batch_size):
            sc = self.scores(hs[s:s + batch_size])
            for row, cand in zip(sc, candidates[s:s + batch_size]):
                c = np.asarray(cand, dtype=np.int64)
                if c.size and (c.min() < 0 or c.max() >= self.num_items):
                    raise ValueError(f"score: candidate item indices must be in [0, {self.num_items})")
                out.append(row[c].astype(np.float32))
        return out


class Popularity(BaseRecommender):
    """Most-interacted items of the training data."""

    def fit(self, train_sequences, num_items: int, **_) -> "Popularity":
        if not isinstance(num_items, (int, np.integer)) or num_items < 1:
            raise ValueError(f"Popularity.fit: num_items must be an int >= 1, got {num_items!r}")
        seqs = _as_histories(train_sequences)
        flat = np.concatenate(seqs) if seqs else np.empty(0, np.int64)
        if flat.size and flat.max() >= num_items:
            raise ValueError(f"Popularity.fit: item index {flat.max()} >= num_items={num_items}")
        self.num_items = int(num_items)
        self.counts = np.bincount(flat, minlength=num_items).astype(np.float64)
        return self

    def scores(self, histories) -> np.ndarray:
        return np.tile(self.counts.astype(np.float32), (len(histories), 1))


class TextKNN(BaseRecommender):
    """Cosine similarity between the (recency-weighted) mean history embedding and every
    catalog item: u = sum_j w_j e_{h_j} with w_j = decay**(age of item j, 0 = most recent);
    score(i) = cos(u, e_i).

    Args:
        item_embeddings: (N, d) text embeddings, row i = item index i (normalised here).
        max_history: use only the most recent items (None = all).
        decay: recency weight in (0, 1]; 1.0 = plain mean. Recent items predict the next one
            far better (ML-1M valid NDCG@10: plain mean 0.006, last item only 0.023), so
            :meth:`tune` picks ``decay``/``max_history`` on validation data.
    Users with an empty history get all-zero scores (ties -> lowest indices).
    Needs no training: ``fit`` only records sizes (zero-shot).
    """

    def __init__(self, item_embeddings, *, max_history: int | None = None,
                 decay: float = 1.0) -> None:
        e = np.asarray(item_embeddings, dtype=np.float32)
        if e.ndim != 2 or e.shape[0] < 1:
            raise ValueError(f"TextKNN: item_embeddings must be (num_items, d), got shape {e.shape}")
        if not (0.0 < float(decay) <= 1.0):
            raise ValueError(f"TextKNN: decay must be in (0, 1], got {decay!r}")
        self.emb = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        self.num_items = e.shape[0]
        self.max_history = max_history
        self.decay = float(decay)

    def tune(self, histories, targets, *, decays=(1.0, 0.9, 0.7, 0.5, 0.3, 0.1),
             max_histories=(None, 10, 1), k: int = 10) -> dict:
        """Pick (decay, max_history) maximising NDCG@k on validation (histories, targets);
        sets them on self and returns ``{"decay", "max_history", "ndcg": {...}}``."""
        from .evaluate import ndcg_at_k
        grid = {}
        for mh in max_histories:
            for d in decays:
                self.max_history, self.decay = mh, float(d)
                grid[(d, mh)] = ndcg_at_k(self.recommend(histories, k), targets, k)
        (d, mh), _ = max(grid.items(), key=lambda kv: kv[1])
        self.decay, self.max_history = float(d), mh
        return {"decay": d, "max_history": mh, "ndcg": {f"{a}/{b}": v for (a, b), v in grid.items()}}

    def fit(self, train_sequences=None, num_items: int | None = None, **_) -> "TextKNN":
        if num_items is not None and num_items != self.num_items:
            raise ValueError(f"TextKNN.fit: num_items={num_items} but item_embeddings has "
                             f"{self.num_items} rows")
        return self

    def user_vectors(self, histories) -> np.ndarray:
        hs = self._check_histories(histories)
        u = np.zeros((len(hs), self.emb.shape[1]), dtype=np.float32)
        for b, h in enumerate(hs):
            if self.max_history:
                h = h[-self.max_history:]
            if h.size:
                w = self.decay ** np.arange(h.size - 1, -1, -1, dtype=np.float64)
                u[b] = (w[:, None] * self.emb[h]).sum(0)
        return u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)

    def scores(self, histories) -> np.ndarray:
        return self.user_vectors(histories) @ self.emb.T


# ----------------------------------------------------------------------------------------------
# SASRec and its text-only variant
# ----------------------------------------------------------------------------------------------
def _causal_encoder(hidden: int, heads: int, blocks: int, max_len: int, dropout: float):
    """torch module: (B, T, hidden) item vectors -> + learned positions (from the window
    start), dropout, ``blocks`` pre-LayerNorm causal transformer blocks, final LayerNorm."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    H, p = hidden, dropout

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(H), nn.LayerNorm(H)
            self.qkv, self.proj = nn.Linear(H, 3 * H), nn.Linear(H, H)
            self.ff = nn.Sequential(nn.Linear(H, 4 * H), nn.GELU(), nn.Dropout(p), nn.Linear(4 * H, H))
            self.drop = nn.Dropout(p)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, heads, H // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=p if self.training else 0.0)
            x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, H)))
            return x + self.drop(self.ff(self.ln2(x)))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(max_len, H)
            self.drop = nn.Dropout(p)
            self.blocks = nn.ModuleList(Block() for _ in range(blocks))
            self.ln = nn.LayerNorm(H)

        def forward(self, x):  # (B, T, H) -> (B, T, H)
            x = self.drop(x + self.pos(torch.arange(x.shape[1], device=x.device)))
            for blk in self.blocks:
                x = blk(x)
            return self.ln(x)

    return Encoder()


class _CausalSeqModel(BaseRecommender):
    """Shared by :class:`SASRec` and :class:`TextSASRec`: hyper-parameters, windowing, the
    full-softmax training loop with early stopping, and scoring. A subclass supplies
    ``_build(num_items)`` (the torch net) and, if its net needs more than the tokens,
    ``_hidden(tokens)`` / ``_logits(h)``."""

    def __init__(self, *, hidden: int = 64, blocks: int = 2, heads: int = 2, max_len: int = 50,
                 dropout: float = 0.2, lr: float = 1e-3, weight_decay: float = 0.0,
                 batch_size: int = 128, max_epochs: int = 200, patience: int = 5,
                 max_seconds: float | None = None, seed: int = 0, device: str = "cpu",
                 verbose: bool = False) -> None:
        if hidden % heads:
            raise ValueError(f"{type(self).__name__}: hidden={hidden} must be divisible by heads={heads}")
        self.hidden, self.blocks, self.heads, self.max_len = hidden, blocks, heads, max_len
        self.dropout, self.lr, self.weight_decay = dropout, lr, weight_decay
        self.batch_size, self.max_epochs, self.patience = batch_size, max_epochs, patience
        self.max_seconds, self.seed, self.device, self.verbose = max_seconds, seed, device, verbose
        self.history_: list[dict] = []

    # -- model ---------------------------------------------------------------------------------
    def _build(self, num_items: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _encoder(self):
        return _causal_encoder(self.hidden, self.heads, self.blocks, self.max_len, self.dropout)

    def _hidden(self, tokens):  # (B, T) tokens -> (B, T, H)
        return self.net(tokens)

    def _logits(self, h):  # (..., H) -> (..., N) over real items
        return self.net.logits(h)

    def _windows(self, seqs: list[np.ndarray]) -> np.ndarray:
        """(W, max_len+1) right-padded token windows (item+1, 0 = pad)."""
        L = self.max_len + 1
        rows = []
        for s in seqs:
            if len(s) < 2:
                continue
            end = len(s)
            while True:
                start = max(0, end - L)
                rows.append(s[start:end] + 1)
                if start == 0:
                    break
                end = start + 1  # overlap one item: every transition appears once
        out = np.zeros((len(rows), L), dtype=np.int64)
        for r, w in enumerate(rows):
            out[r, :len(w)] = w
        return out

    def _tokens(self, histories: list[np.ndarray]):
        """Right-padded (B, T) tokens of the last max_len items + index of each last item."""
        import torch
        T = max(1, min(self.max_len, max((len(h) for h in histories), default=1)))
        tok = np.zeros((len(histories), T), dtype=np.int64)
        last = np.zeros(len(histories), dtype=np.int64)
        for b, h in enumerate(histories):
            h = h[-self.max_len:]
            tok[b, :len(h)] = h + 1
            last[b] = max(len(h) - 1, 0)
        return torch.from_numpy(tok).to(self.device), torch.from_numpy(last).to(self.device)

    def fit(self, train_sequences, num_items: int, *, valid_histories=None, valid_targets=None,
            **_):
        """Train on ``train_sequences``; early-stop on (valid_histories, valid_targets) if
        given (else train ``max_epochs``)."""
        import torch
        import torch.nn.functional as F
        from .evaluate import ndcg_at_k

        name = type(self).__name__
        if not isinstance(num_items, (int, np.integer)) or num_items < 1:
            raise ValueError(f"{name}.fit: num_items must be an int >= 1, got {num_items!r}")
        self.num_items = int(num_items)
        seqs = self._check_histories(train_sequences)
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self.net = self._build(self.num_items).to(self.device)
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        windows = self._windows(seqs)
        if len(windows) == 0:
            raise ValueError(f"{name}.fit: no training sequence has 2 or more items")
        use_valid = valid_histories is not None and valid_targets is not None
        if use_valid:
            v_hist = self._check_histories(valid_histories)
            v_tgt = np.asarray(valid_targets, dtype=np.int64)
        best, best_state, bad = -1.0, None, 0
        self.history_ = []
        t0 = time.perf_counter()
        for epoch in range(self.max_epochs):
            self.net.train()
            perm = rng.permutation(len(windows))
            total, n = 0.0, 0
            for s in range(0, len(perm), self.batch_size):
                w = torch.from_numpy(windows[perm[s:s + self.batch_size]]).to(self.device)
                inp, tgt = w[:, :-1], w[:, 1:]
                # trim all-padding columns at the end of the batch
                width = int((inp > 0).sum(1).max())
                inp, tgt = inp[:, :width], tgt[:, :width]
                h = self._hidden(inp)
                mask = tgt > 0
                loss = F.cross_entropy(self._logits(h[mask]), tgt[mask] - 1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * int(mask.sum())
                n += int(mask.sum())
            rec = {"epoch": epoch + 1, "loss": total / max(n, 1), "seconds": time.perf_counter() - t0}
            if use_valid:
                rank = self.recommend(v_hist, 10, exclude_history=True)
                rec["valid_ndcg@10"] = ndcg_at_k(rank, v_tgt, 10)
                if rec["valid_ndcg@10"] > best:
                    best, bad = rec["valid_ndcg@10"], 0
                    best_state = copy.deepcopy(self.net.state_dict())
                else:
                    bad += 1
            self.history_.append(rec)
            if self.verbose:
                print(rec, flush=True)
            if use_valid and bad >= self.patience:
                break
            if self.max_seconds is not None and time.perf_counter() - t0 > self.max_seconds:
                break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.best_valid_ndcg10_ = best if use_valid else None
        self.net.eval()
        return self

    def scores(self, histories) -> np.ndarray:
        import torch
        if not hasattr(self, "net"):
            raise RuntimeError(f"{type(self).__name__}: call fit() before scoring")
        hs = self._check_histories(histories)
        self.net.eval()
        with torch.inference_mode():
            tok, last = self._tokens(hs)
            h = self._hidden(tok)
            h = h[torch.arange(len(hs), device=h.device), last]
            out = self._logits(h).float().cpu().numpy()
        for b, hh in enumerate(hs):  # an empty history carries no signal: flat scores
            if hh.size == 0:
                out[b] = 0.0
        return out


class SASRec(_CausalSeqModel):
    """SASRec with full-softmax cross-entropy.

    Input: the last ``max_len`` items (item i -> token i+1, 0 = padding, right-padded,
    positions counted from the window start); pre-LayerNorm causal transformer blocks;
    logits = h_t · E_items (tied embeddings). Training sequences are cut, from their end,
    into windows of ``max_len + 1`` items overlapping by one, so every transition of every
    user is a training target exactly once per epoch. Early stopping: validation NDCG@10
    (full catalog, history excluded) every epoch, ``patience`` epochs, best weights kept.

    Cost: the full softmax dominates (~1.4 TFLOP per ML-1M epoch at hidden 64). On a
    machine shared with other jobs set ``OMP_NUM_THREADS=1`` (or ``torch.set_num_threads``):
    spinning OpenMP workers make two threads several times slower than one there.
    """

    def _build(self, num_items: int):
        import torch
        from torch import nn

        H, make_encoder = self.hidden, self._encoder

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.item = nn.Embedding(num_items + 1, H, padding_idx=0)
                self.enc = make_encoder()  # after the item table: the seeded init order
                nn.init.normal_(self.item.weight, std=0.02)
                nn.init.normal_(self.enc.pos.weight, std=0.02)
                with torch.no_grad():
                    self.item.weight[0].zero_()

            def forward(self, tokens):  # (B, T) -> (B, T, H)
                return self.enc(self.item(tokens) * math.sqrt(H))

            def logits(self, h):  # (..., H) -> (..., N) over real items
                return h @ self.item.weight[1:].T

        return Net()


class TextSASRec(_CausalSeqModel):
    """UniSRec-style text-sequence SASRec (Hou et al., KDD 2022), zero-shot across catalogs.

    An item is read only through its (L2-normalised) text embedding ê_i, never through an
    item ID, so the network trained on one domain scores any other catalog unchanged
    (:meth:`with_catalog`)::

        r_i = W_in ê_i + b_in (the adaptor: one item representation for input and output)
        x_t = r_{h_t} + p_t ;  z = pre-LN causal transformer(x), last position T
        score(i) = cos(W_out z_T + b_out, r_i) / temperature

    Trained like :class:`SASRec` (same windows, full-softmax cross-entropy over the whole
    training catalog at every position, early stopping on validation NDCG@10). The adaptor
    is one linear map (UniSRec uses a mixture of whitening experts) and there is no
    pre-training on several domains: it is trained on the source domain only.

    Args:
        item_embeddings: (N, d) finite text embeddings of the training catalog, row i = item i.
        temperature: of the cosine logits (> 0).
        other arguments: as :class:`SASRec`.
    """

    def __init__(self, item_embeddings, *, hidden: int = 64, blocks: int = 2, heads: int = 2,
                 max_len: int = 50, dropout: float = 0.2, lr: float = 1e-3,
                 weight_decay: float = 0.0, batch_size: int = 128, max_epochs: int = 200,
                 patience: int = 5, max_seconds: float | None = None, temperature: float = 0.05,
                 seed: int = 0, device: str = "cpu", verbose: bool = False) -> None:
        super().__init__(hidden=hidden, blocks=blocks, heads=heads, max_len=max_len,
                         dropout=dropout, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                         max_epochs=max_epochs, patience=patience, max_seconds=max_seconds,
                         seed=seed, device=device, verbose=verbose)
        if not (float(temperature) > 0.0):
            raise ValueError(f"TextSASRec: temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        e = self._catalog(item_embeddings, "TextSASRec")
        self.dim = e.shape[1]
        self._set_catalog(e)

    @staticmethod
    def _catalog(item_embeddings, where: str) -> np.ndarray:
        try:
            e = np.asarray(item_embeddings, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: item_embeddings must be a numeric (num_items, d) array, "
                             f"got {type(item_embeddings).__name__} ({exc})") from None
        if e.ndim != 2 or e.shape[0] < 1 or e.shape[1] < 1:
            raise ValueError(f"{where}: item_embeddings must be a 2-D (num_items, d) array with "
                             f"num_items >= 1 and d >= 1, got shape {e.shape}")
        bad = ~np.isfinite(e).all(axis=1)
        if bad.any():
            raise ValueError(f"{where}: item_embeddings must be finite, got NaN/inf in "
                             f"{int(bad.sum())} of {e.shape[0]} rows (first: row {int(np.argmax(bad))})")
        return e

    def _set_catalog(self, e: np.ndarray) -> None:
        import torch
        self.emb = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        self.num_items = e.shape[0]
        # row 0 = padding token, row i+1 = item i
        pad = np.concatenate([np.zeros((1, e.shape[1]), np.float32), self.emb])
        self._cat = torch.from_numpy(pad).to(self.device)

    def with_catalog(self, item_embeddings) -> "TextSASRec":
        """A copy that scores another catalog ((N', d) text embeddings, same d), sharing the
        trained network: how the model is applied zero-shot to a domain it never saw."""
        e = self._catalog(item_embeddings, "TextSASRec.with_catalog")
        if e.shape[1] != self.dim:
            raise ValueError(f"TextSASRec.with_catalog: item_embeddings must have d={self.dim} "
                             f"columns (the width the model was built for), got shape {e.shape}")
        new = copy.copy(self)
        new.history_ = list(self.history_)
        new._set_catalog(e)
        return new

    def fit(self, train_sequences, num_items: int | None = None, *, valid_histories=None,
            valid_targets=None, **_) -> "TextSASRec":
        """As :meth:`SASRec.fit` on the current catalog; ``num_items`` (optional) must equal
        its size."""
        if num_items is not None and num_items != self.num_items:
            raise ValueError(f"TextSASRec.fit: num_items={num_items} but item_embeddings has "
                             f"{self.num_items} rows")
        return super().fit(train_sequences, self.num_items, valid_histories=valid_histories,
                           valid_targets=valid_targets)

    def _build(self, num_items: int):
        from torch import nn
        import torch.nn.functional as F

        H, d, tau, make_encoder = self.hidden, self.dim, self.temperature, self._encoder

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.inp = nn.Linear(d, H)
                self.enc = make_encoder()
                self.out = nn.Linear(H, H)
                nn.init.normal_(self.enc.pos.weight, std=0.02)

            def forward(self, tokens, cat):  # (B, T), (N+1, d) normalised -> (B, T, H)
                return self.enc(self.inp(cat[tokens]))

            def logits(self, h, cat):  # (..., H) -> (..., N) cosine with the adapted items / temperature
                # the catalog goes through the adaptor once per call: N x d x H, not per position
                return F.normalize(self.out(h), dim=-1) @ F.normalize(self.inp(cat[1:]), dim=-1).T / tau

        return Net()

    def _hidden(self, tokens):
        return self.net(tokens, self._cat)

    def _logits(self, h):
        return self.net.logits(h, self._cat)


# ----------------------------------------------------------------------------------------------
# Rating prediction baselines (explicit ratings; users and items by index, transductive)
# ----------------------------------------------------------------------------------------------
def _rating_triples(users, items, ratings):
    u = np.asarray(users, dtype=np.int64).reshape(-1)
    i = np.asarray(items, dtype=np.int64).reshape(-1)
    r = np.asarray(ratings, dtype=np.float64).reshape(-1)
    if not (len(u) == len(i) == len(r)) or len(r) == 0:
        raise ValueError(f"fit: users, items and ratings need one entry per rating (and at least one), got "
                         f"{len(u)}, {len(i)}, {len(r)}")
    if u.min() < 0 or i.min() < 0:
        raise ValueError("fit: user and item indices must be >= 0")
    if not np.isfinite(r).all():
        raise ValueError("fit: ratings must be finite")
    return u, i, r


class GlobalMean:
    """r̂ = the mean training rating."""

    def fit(self, users, items, ratings) -> "GlobalMean":
        self.mu = float(_rating_triples(users, items, ratings)[2].mean())
        return self

    def predict(self, users, items) -> np.ndarray:
        return np.full(len(np.asarray(users).reshape(-1)), self.mu)


class BiasBaseline:
    """r̂_ui = μ + b_u + b_i, the regularised least-squares biases of
    Σ (r - μ - b_u - b_i)² + reg_u Σ b_u² + reg_i Σ b_i² (Koren 2010; ``surprise.BaselineOnly``),
    solved by alternating exact minimisation (each half-step solves its biases in closed form:
    b_i = Σ_u (r - μ - b_u) / (reg_i + n_i), then b_u likewise), which converges to the unique
    minimum. Unknown users or items get bias 0."""

    def __init__(self, reg_u: float = 15.0, reg_i: float = 10.0, iterations: int = 20):
        if not reg_u >= 0 or not reg_i >= 0 or iterations < 1:
            raise ValueError(f"BiasBaseline: reg_u, reg_i must be >= 0 and iterations >= 1, got {reg_u}, {reg_i}, {iterations}")
        self.reg_u, self.reg_i, self.iterations = float(reg_u), float(reg_i), int(iterations)

    def fit(self, users, items, ratings) -> "BiasBaseline":
        u, i, r = _rating_triples(users, items, ratings)
        self.mu = float(r.mean())
        nu, ni = int(u.max()) + 1, int(i.max()) + 1
        cu, ci = np.bincount(u, minlength=nu), np.bincount(i, minlength=ni)
        self.bu, self.bi = np.zeros(nu), np.zeros(ni)
        for _ in range(self.iterations):
            self.bi = np.bincount(i, r - self.mu - self.bu[u], minlength=ni) / (self.reg_i + ci)
            self.bu = np.bincount(u, r - self.mu - self.bi[i], minlength=nu) / (self.reg_u + cu)
        return self

    def _bias(self, users, items):
        u, i = np.asarray(users, dtype=np.int64).reshape(-1), np.asarray(items, dtype=np.int64).reshape(-1)
        bu = np.where(u < len(self.bu), self.bu[np.minimum(u, len(self.bu) - 1)], 0.0)
        bi = np.where(i < len(self.bi), self.bi[np.minimum(i, len(self.bi) - 1)], 0.0)
        return u, i, bu, bi

    def predict(self, users, items) -> np.ndarray:
        _, _, bu, bi = self._bias(users, items)
        return self.mu + bu + bi


class MatrixFactorization(BiasBaseline):
    """Biased matrix factorisation r̂_ui = μ + b_u + b_i + p_u·q_i (Koren et al. 2009; the SVD of
    ``surprise``) fitted by alternating least squares with weighted regularisation (ALS-WR, Zhou et
    al. 2008): minimise Σ (r - r̂)² + reg Σ_u n_u (|p_u|² + b_u²) + reg Σ_i n_i (|q_i|² + b_i²).
    Each half-step solves every user's (then item's) [p, b] exactly from its ratings -- a ridge
    regression on the other side's [q, 1] -- so the objective never increases. Seeded; unknown
    users or items fall back to the biases they have (0 when unseen)."""

    def __init__(self, factors: int = 32, reg: float = 0.05, iterations: int = 15, seed: int = 0):
        if factors < 1 or not reg > 0 or iterations < 1:
            raise ValueError(f"MatrixFactorization: factors >= 1, reg > 0 and iterations >= 1, got "
                             f"{factors}, {reg}, {iterations}")
        self.factors, self.reg, self.iterations, self.seed = int(factors), float(reg), int(iterations), int(seed)

    @staticmethod
    def _solve_side(rows, cols, resid, other, n_rows, reg):
        """For every row: argmin_x Σ_j (resid_j - [other_j, 1]·x)² + reg n_row |x|² (x = [factors, bias])."""
        k = other.shape[1]
        out = np.zeros((n_rows, k + 1))
        order = np.argsort(rows, kind="stable")
        rows_s, cols_s, res_s = rows[order], cols[order], resid[order]
        bounds = np.flatnonzero(np.r_[True, rows_s[1:] != rows_s[:-1], True])
        eye = np.eye(k + 1)
        for a, b in zip(bounds[:-1], bounds[1:]):
            design = np.hstack([other[cols_s[a:b]], np.ones((b - a, 1))])
            out[rows_s[a]] = np.linalg.solve(design.T @ design + reg * (b - a) * eye, design.T @ res_s[a:b])
        return out[:, :k], out[:, k]

    def objective(self, users, items, ratings) -> float:
        """The regularised loss this fit minimises (for tests and diagnostics)."""
        u, i, r = _rating_triples(users, items, ratings)
        err = r - self.mu - self.bu[u] - self.bi[i] - (self.p[u] * self.q[i]).sum(1)
        nu, ni = np.bincount(u, minlength=len(self.bu)), np.bincount(i, minlength=len(self.bi))
        return float((err ** 2).sum() + self.reg * (nu * ((self.p ** 2).sum(1) + self.bu ** 2)).sum()
                     + self.reg * (ni * ((self.q ** 2).sum(1) + self.bi ** 2)).sum())

    def fit(self, users, items, ratings) -> "MatrixFactorization":
        u, i, r = _rating_triples(users, items, ratings)
        self.mu = float(r.mean())
        nu, ni = int(u.max()) + 1, int(i.max()) + 1
        rng = np.random.default_rng(self.seed)
        self.p = rng.normal(0.0, 0.1, size=(nu, self.factors))
        self.q = rng.normal(0.0, 0.1, size=(ni, self.factors))
        self.bu, self.bi = np.zeros(nu), np.zeros(ni)
        self.history = []
        for _ in range(self.iterations):
            self.p, self.bu = self._solve_side(u, i, r - self.mu - self.bi[i], self.q, nu, self.reg)
            self.q, self.bi = self._solve_side(i, u, r - self.mu - self.bu[u], self.p, ni, self.reg)
            self.history.append(self.objective(u, i, r))
        return self

    def predict(self, users, items) -> np.ndarray:
        u, i, bu, bi = self._bias(users, items)
        known = (u < len(self.p)) & (i < len(self.q))
        dot = np.zeros(len(u))
        dot[known] = (self.p[u[known]] * self.q[i[known]]).sum(1)
        return self.mu + bu + bi + dot


# ----------------------------------------------------------------------------------------------
# Command line: reproducible baseline numbers
# ----------------------------------------------------------------------------------------------
def prepare(name: str, *, cache_dir=None, min_rating: float | None = None, user_k: int = 0,
            item_k: int = 0):
    """Load a dataset, optionally make it implicit (rating >= min_rating) and k-core it, and
    split it leave-one-out. Returns (dataset, split)."""
    from . import datasets
    from .data.splits import leave_one_out
    ds = datasets.load(name, cache_dir)
    if min_rating is not None:
        ds = ds.to_implicit(min_rating)
    if user_k or item_k:
        ds = ds.kcore(user_k, item_k)
    return ds, leave_one_out(ds)


def item_text_embeddings(ds, *, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Text embeddings (catalog order) of a dataset's items with its domain's template."""
    from .data.encoder import TextEncoder
    from .data.text import render_items
    enc = TextEncoder(batch_size=batch_size, progress=progress)
    emb = enc.encode(render_items(ds.items, ds.domain))
    return emb, enc.last_stats


def main(argv=None) -> dict:
    import argparse
    import json
    from .evaluate import evaluate_rankings

    ap = argparse.ArgumentParser(prog="python -m recbase.baselines",
                                 description="Leave-one-out, full-catalog baseline numbers")
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--models", default="pop,textknn,sasrec")
    ap.add_argument("--min-rating", type=float, default=None)
    ap.add_argument("--user-k", type=int, default=0)
    ap.add_argument("--item-k", type=int, default=0)
    ap.add_argument("--include-history", action="store_true",
                    help="allow history items in the ranking (default: excluded)")
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--ctr", action="store_true",
                    help="also run the CTR/AUC protocol (pop, textknn): per user the last <=10 "
                         "items are positives, 10 random unseen items negatives, seed 0")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    ds, split = prepare(args.dataset, cache_dir=args.cache_dir, min_rating=args.min_rating,
                        user_k=args.user_k, item_k=args.item_k)
    print(ds, split, f"({time.perf_counter() - t0:.1f}s)", flush=True)
    excl = not args.include_history
    results: dict = {"dataset": args.dataset, "stats": ds.stats(), "exclude_history": excl}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t = time.perf_counter()
        if name == "pop":
            model = Popularity().fit(split.train_sequences, split.num_items)
        elif name == "textknn":
            emb, st = item_text_embeddings(ds)
            results["encoder"] = st
            print("encoder:", {k: round(v, 2) if isinstance(v, float) else v for k, v in st.items()},
                  flush=True)
            model = TextKNN(emb)
            tuned = model.tune(split.valid_histories, split.valid_targets)
            print("textknn tuned on validation:", tuned, flush=True)
        elif name == "sasrec":
            model = SASRec(hidden=args.hidden, blocks=args.blocks, heads=args.heads,
                           max_len=args.max_len, dropout=args.dropout, lr=args.lr,
                           batch_size=args.batch_size, max_epochs=args.max_epochs,
                           patience=args.patience, max_seconds=args.max_seconds, seed=args.seed,
                           verbose=True)
            model.fit(split.train_sequences, split.num_items,
                      valid_histories=split.valid_histories, valid_targets=split.valid_targets)
        else:
            raise SystemExit(f"unknown model {name!r}; choose from pop, textknn, sasrec")
        fit_s = time.perf_counter() - t
        rank = model.recommend(split.test_histories, 20, exclude_history=excl)
        res = evaluate_rankings(rank, split.test_targets)
        vrank = model.recommend(split.valid_histories, 10, exclude_history=excl)
        res["valid_ndcg@10"] = evaluate_rankings(vrank, split.valid_targets, ks=(10,))["ndcg@10"]
        res["seconds"] = time.perf_counter() - t
        res["fit_seconds"] = fit_s
        if name == "sasrec":
            res["epochs"] = len(model.history_)
        results[name] = res
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}),
              flush=True)
    if args.ctr:
        results["ctr"] = ctr_protocol(ds, split, [m for m in args.models.split(",") if m != "sasrec"])
    return results


def ctr_protocol(ds, split, models, *, max_positives: int = 10, num_negatives: int = 10,
                 seed: int = 0) -> dict:
    """RecBase-style AUC: per evaluated user, the last ``max_positives`` items (at least one
    history item kept) are positives, ``num_negatives`` uniformly drawn items the user never
    interacted with are negatives; models see only the histories (popularity is counted on
    the histories + short users' sequences, so no positive leaks into it)."""
    import json
    from .data.splits import holdout_last
    from .evaluate import build_ctr_pairs, evaluate_ctr
    hist, pos, kept = holdout_last(split.sequences, max_positives, min_history=1)
    pairs = build_ctr_pairs(pos, split.num_items, num_negatives=num_negatives,
                            exclude=[split.sequences[u] for u in kept], seed=seed)
    cands = pairs.candidates(len(hist))
    out = {}
    for name in models:
        name = name.strip()
        if name == "pop":
            model = Popularity().fit(hist + list(split.short_sequences), split.num_items)
        elif name == "textknn":
            model = TextKNN(item_text_embeddings(ds, progress=False)[0])
            model.tune(split.valid_histories, split.valid_targets)
        else:
            continue
        sc = model.score(hist, cands)
        flat = np.empty(len(pairs), dtype=np.float64)
        # candidates() keeps pair order within a user: scatter back to pair positions
        order = np.argsort(pairs.user, kind="stable")
        flat[order] = np.concatenate(sc)
        out[name] = evaluate_ctr(flat, pairs)
        print("ctr", name, json.dumps(out[name]), flush=True)
    return out


if __name__ == "__main__":
    main()
