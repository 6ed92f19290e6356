"""``Recommender``: model + tokenizer + trie, recommending catalog items from histories.

Histories are item indices of a catalog; they become BOS + concept tokens, the model
generates the next item's concept ID under the catalog's trie (constrained beam search), and
candidate items are scored by the likelihood of their concept IDs (the paper's CTR protocol).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch

from recbase.tokenizer import ConceptVocab


def history_tokens(histories: Sequence[Sequence[int]], codes: np.ndarray, vocab: ConceptVocab,
                   max_items: int | None = None) -> list[torch.Tensor]:
    """BOS + concept tokens of each history's items (the last ``max_items`` items)."""
    tokens = torch.as_tensor(vocab.to_tokens(np.asarray(codes, dtype=np.int64)))
    out = []
    for b, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)
        if h.ndim != 1:
            raise ValueError(f"histories[{b}]: expected a 1-d list of item indices")
        if len(h) and (h.min() < 0 or h.max() >= len(codes)):
            raise ValueError(f"histories[{b}]: item index out of range [0, {len(codes)})")
        if max_items is not None:
            h = h[-max_items:]
        seq = torch.cat([torch.tensor([vocab.BOS]), tokens[torch.as_tensor(h)].reshape(-1)])
        out.append(seq)
    return out


@torch.no_grad()
def score_candidates(model, histories: list[torch.Tensor], candidates: Sequence[np.ndarray],
                     codes: np.ndarray) -> list[np.ndarray]:
    """Log-likelihood of each candidate item's concept ID given its user's history.

    Each history is prefilled once; its cache is shared by all of that user's candidates.
    Returns one float array per user, aligned with ``candidates[b]``.
    """
    codes_t = torch.as_tensor(np.asarray(codes, dtype=np.int64))
    state, lp = model.start_generation(histories)
    owner = torch.cat([torch.full((len(c),), b, dtype=torch.long) for b, c in enumerate(candidates)])
    cand = torch.as_tensor(np.concatenate([np.asarray(c, dtype=np.int64) for c in candidates]))
    cand_codes = codes_t[cand].to(lp.device)
    state = model.select_generation(state, owner.to(lp.device))
    lp = lp[owner.to(lp.device)]
    total = lp.gather(1, cand_codes[:, :1]).squeeze(1).double()
    for level in range(cand_codes.shape[1] - 1):
        state, lp = model.step_generation(state, cand_codes[:, level], level)
        total += lp.gather(1, cand_codes[:, level + 1:level + 2]).squeeze(1).double()
    total = total.cpu().numpy()
    bounds = np.cumsum([0] + [len(c) for c in candidates])
    return [total[bounds[b]:bounds[b + 1]] for b in range(len(candidates))]


class Recommender:
    """Recommends items of one or more catalogs (domains) with a pretrained concept-ID model.

    ``catalogs`` maps a domain name to the (N, L) concept IDs of its items (row = item index).
    ``unseen_domains``: domains the model never trained on; they are read from concept content
    alone (``model.content_only``; needs a model with concept vectors), since there a concept's
    free embedding holds the statistics of the domains it was trained on.
    """

    def __init__(self, model, vocab: ConceptVocab, catalogs: dict[str, np.ndarray],
                 max_items: int | None = None, device: str | torch.device = "cpu",
                 unseen_domains: Sequence[str] = ()):
        from recbase.trie import ConceptTrie

        if not catalogs:
            raise ValueError("catalogs: need at least one domain")
        unknown = sorted(set(unseen_domains) - set(catalogs))
        if unknown:
            raise ValueError(f"unseen_domains: {unknown} not among the catalogs {sorted(catalogs)}")
        if unseen_domains and not getattr(model.config, "concept_vector_dim", 0):
            raise ValueError("unseen_domains needs a model with concept vectors (concept_vector_dim > 0)")
        self.unseen_domains = frozenset(unseen_domains)
        self.model = model.to(device).eval()
        self.vocab = vocab
        self.device = torch.device(device)
        # the generated item needs one slot of the model's context
        limit = max_items or getattr(model.config, "max_items", None)
        self.max_items = None if limit is None else limit - 1
        self.codes = {d: np.asarray(c, dtype=np.int64) for d, c in catalogs.items()}
        self.tries = {d: ConceptTrie(c) for d, c in self.codes.items()}

    def _domain(self, domain: str | None) -> str:
        if domain is None:
            if len(self.codes) > 1:
                raise ValueError(f"domain: several catalogs {sorted(self.codes)}; say which")
            return next(iter(self.codes))
        if domain not in self.codes:
            raise ValueError(f"domain: unknown {domain!r}; known: {sorted(self.codes)}")
        return domain

    def _reading(self, domain: str):
        """The model's mode for ``domain``: content only for an unseen domain."""
        return self.model.content_only() if domain in self.unseen_domains else contextlib.nullcontext()

    def recommend(self, histories: Sequence[Sequence[int]], k: int = 10, domain: str | None = None,
                  num_beams: int = 20, exclude_history: bool = True, batch_size: int = 64):
        """Top-``k`` item indices (B, k) and scores (B, k) per history; -1 / -inf pad."""
        from recbase.search import beam_search

        domain = self._domain(domain)
        if num_beams < k:
            raise ValueError(f"num_beams ({num_beams}) must be >= k ({k})")
        items_out = np.full((len(histories), k), -1, dtype=np.int64)
        scores_out = np.full((len(histories), k), -np.inf, dtype=np.float64)
        for s in range(0, len(histories), batch_size):
            chunk = histories[s:s + batch_size]
            toks = [t.to(self.device) for t in history_tokens(chunk, self.codes[domain], self.vocab, self.max_items)]
            with self._reading(domain):
                items, scores = beam_search(self.model, self.tries[domain], toks, num_beams=num_beams, k=num_beams)
            items, scores = items.cpu().numpy(), scores.cpu().numpy()
            for j, h in enumerate(chunk):
                keep = items[j] >= 0
                if exclude_history:
                    keep &= ~np.isin(items[j], np.asarray(h, dtype=np.int64))
                sel = np.flatnonzero(keep)[:k]
                items_out[s + j, :len(sel)] = items[j, sel]
                scores_out[s + j, :len(sel)] = scores[j, sel]
        return items_out, scores_out

    def score(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
              domain: str | None = None, batch_size: int = 64) -> list[np.ndarray]:
        """Log-likelihood of each candidate item given its history (zero-shot CTR scoring)."""
        domain = self._domain(domain)
        if len(candidates) != len(histories):
            raise ValueError(f"candidates: expected one list per history ({len(histories)}), "
                             f"got {len(candidates)}")
        out: list[np.ndarray] = []
        n = len(self.codes[domain])
        for s in range(0, len(histories), batch_size):
            cands = [np.asarray(c, dtype=np.int64) for c in candidates[s:s + batch_size]]
            for b, c in enumerate(cands):
                if len(c) and (c.min() < 0 or c.max() >= n):
                    raise ValueError(f"candidates[{s + b}]: item index out of range [0, {n})")
            toks = [t.to(self.device) for t in history_tokens(histories[s:s + batch_size], self.codes[domain],
                                                               self.vocab, self.max_items)]
            with self._reading(domain):
                out.extend(score_candidates(self.model, toks, cands, self.codes[domain]))
        return out
