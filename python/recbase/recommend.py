"""``Recommender``: model + tokenizer + trie, recommending catalog items from histories.

Histories are item indices of a catalog; they become BOS + concept tokens, the model
generates the next item's concept ID under the catalog's trie (constrained beam search), and
candidate items are scored by the likelihood of their concept IDs (the paper's CTR protocol).

With a dense item channel (``RecBaseConfig.item_vector_dim``) and the catalogs' text embeddings
(``item_embeddings``) there are three modes:

* ``"generative"``: beam search, likelihood scores;
* ``"dense"``: the dense head's kernel score (``recbase.model.dense``), exact top-N over the whole
  catalog in blocks;
* ``"hybrid"`` (the default then): the beam's items together with the dense top-N, re-ranked by
  ``(1 - w) * log-likelihood + w * dense score``, w = ``model.config.fusion_weights["seen"|"unseen"]``
  (chosen on the source domains' validation items by :func:`choose_fusion`).

A domain whose histories have no order (``unordered_domains``; e.g. Book-Crossing, whose order is
a seeded random permutation) is read as a set by the dense channel: the model's history weights are
averaged over ``SET_PERMUTATIONS`` seeded orderings of the user's whole history (up to
``SET_MAX_ITEMS`` latest items, sorted first, so the score depends on the set alone), each ordering
read through the model's context as usual: every item of the set gets the weight the model gives it
on average over where it could stand, and items beyond the context are read too. The generative
channel reads the history in the order given. Measured (docs/results.md): on shuffled movie
validation histories and on the held-out articles catalog, shuffled, it lifts the dense Recall@10
from 0.020 to 0.027 and from 0.067 to 0.075.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch

from recbase.model.dense import dense_top_n, dense_user_scores, frame_alignment, unit_rows
from recbase.tokenizer import ConceptVocab

MODES = ("generative", "dense", "hybrid")
DEFAULT_FUSION_WEIGHT = 0.5  # before choose_fusion has set one
SET_PERMUTATIONS = 8  # orderings averaged when a history is read as a set
SET_MAX_ITEMS = 50  # most recent items of a history read as a set (bounds the cost)
_SET_SEED = 0x5E7  # the orderings are a pure function of (this seed, history length, p)


class _WithItemVectors:
    """The model's generation protocol with each history's item vectors passed to the prefill
    (what beam_search calls); keeps the prefill's dense history weights."""

    def __init__(self, model, vectors):
        self.model, self.vectors, self.history_weights = model, vectors, None

    def start_generation(self, histories):
        state, lp = self.model.start_generation(histories, item_vectors=self.vectors)
        self.history_weights = state.history_weights
        return state, lp

    def select_generation(self, state, index):
        return self.model.select_generation(state, index)

    def step_generation(self, state, codes, level):
        return self.model.step_generation(state, codes, level)


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
    if np.isnan(total).any():
        raise ValueError(f"model: {int(np.isnan(total).sum())} candidate log-likelihood(s) are NaN (a diverged or "
                         "corrupt model); refusing to score by them")
    bounds = np.cumsum([0] + [len(c) for c in candidates])
    return [total[bounds[b]:bounds[b + 1]] for b in range(len(candidates))]


def _checked_scale(scale) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale: expected (lowest, highest), got {scale!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"scale: expected finite (lowest, highest) with lowest < highest, got {scale!r}")
    return lo, hi


def normalise_ratings(ratings, scale) -> np.ndarray:
    """A domain's ratings on [lowest, highest] -> [-1, 1] (what the rating task reads and predicts;
    NaN stays NaN)."""
    lo, hi = _checked_scale(scale)
    return 2.0 * (np.asarray(ratings, dtype=np.float64) - lo) / (hi - lo) - 1.0


def denormalise_ratings(values, scale) -> np.ndarray:
    """Inverse of :func:`normalise_ratings`."""
    lo, hi = _checked_scale(scale)
    return lo + (np.asarray(values, dtype=np.float64) + 1.0) * (hi - lo) / 2.0


def _checked_item_ids(domain: str, ids, n: int) -> list[str]:
    """A catalog's item ids as strings, one per row and unique (default: the row numbers)."""
    if ids is None:
        return [str(i) for i in range(n)]
    if isinstance(ids, (str, bytes)) or len(ids) != n:
        got = "a single string" if isinstance(ids, (str, bytes)) else f"{len(ids)} ids"
        raise ValueError(f"item_ids[{domain!r}]: expected one id per catalog item ({n}), got {got}")
    ids = [str(i) for i in ids]
    if len(set(ids)) != n:
        seen: set = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"item_ids[{domain!r}]: duplicate id {dup!r}")
    return ids


def _checked_mean(domain: str, mean) -> np.ndarray:
    mean = np.asarray(mean, dtype=np.float32)
    if mean.ndim != 1 or not np.isfinite(mean).all():
        raise ValueError(f"embedding_means[{domain!r}]: expected a finite 1-d vector, got shape {mean.shape}")
    return mean


class Recommender:
    """Recommends items of one or more catalogs (domains) with a pretrained concept-ID model.

    ``catalogs`` maps a domain name to the (N, L) concept IDs of its items (row = item index).
    ``unseen_domains``: domains the model never trained on; they are read from concept content
    alone (``model.content_only``; needs a model with concept vectors), since there a concept's
    free embedding holds the statistics of the domains it was trained on.
    ``item_embeddings`` maps a domain to its items' text embeddings (N, d), the vectors the model's
    dense channel was trained on (e.g. centred per domain); needed for the "dense" and "hybrid"
    modes and read by every mode when the model has a dense channel.
    ``unseen_frame``: how an unseen domain's content is read. "identity" (default): as it comes,
    in the one text encoder's space shared with the source domains. "aligned": turned by
    ``frame_alignment`` (the new domain's principal axes onto those of the seen domains' item
    embeddings, which must be given), so every score is unchanged when the new domain's embeddings
    and codebooks come turned by any orthogonal matrix (e.g. from another encoder of that width).

    A living catalog (serving): ``item_ids`` maps a domain to its items' ids (row order; default
    ``"0"``, ``"1"``, ...); with the ``tokenizer`` whose codebooks the catalogs were encoded on,
    :meth:`add_items` encodes new items (text embeddings only) and :meth:`remove_items` takes items
    out; ``embedding_means`` maps a domain to the mean its embeddings were centred on
    (``centre_embeddings``), so that new items' raw embeddings are centred the same way;
    ``text_settings`` maps a domain to how its item text became vectors (``{"domain", "fields",
    "encoder"}``, written by ``recbase tokenize``; what ``recbase catalog --add`` renders and encodes).
    :meth:`save` / :meth:`load` keep all of it in one folder.
    """

    def __init__(self, model, vocab: ConceptVocab, catalogs: dict[str, np.ndarray],
                 max_items: int | None = None, device: str | torch.device = "cpu",
                 unseen_domains: Sequence[str] = (), item_embeddings: dict | None = None,
                 unseen_frame: str = "identity", unordered_domains: Sequence[str] = (),
                 item_ids: dict | None = None, tokenizer=None, embedding_means: dict | None = None,
                 text_settings: dict | None = None):
        if not catalogs:
            raise ValueError("catalogs: need at least one domain")
        unknown = sorted(set(unseen_domains) - set(catalogs))
        if unknown:
            raise ValueError(f"unseen_domains: {unknown} not among the catalogs {sorted(catalogs)}")
        if unseen_domains and not getattr(model.config, "concept_vector_dim", 0):
            raise ValueError("unseen_domains needs a model with concept vectors (concept_vector_dim > 0)")
        if isinstance(unordered_domains, str):
            raise TypeError(f"unordered_domains: expected a list of domain names, got the str {unordered_domains!r}")
        unknown = sorted(set(unordered_domains) - set(catalogs))
        if unknown:
            raise ValueError(f"unordered_domains: {unknown} not among the catalogs {sorted(catalogs)}")
        self.unseen_domains = frozenset(unseen_domains)
        self.unordered_domains = frozenset(unordered_domains)
        self.model = model.to(device).eval()
        self.vocab = vocab
        self.device = torch.device(device)
        # the generated item needs one slot of the model's context
        limit = max_items or getattr(model.config, "max_items", None)
        self.max_items = None if limit is None else limit - 1
        self.codes = {d: np.asarray(c, dtype=np.int64) for d, c in catalogs.items()}
        self.tries = {d: self._trie(d, c) for d, c in self.codes.items()}
        self._full_tries = dict(self.tries)  # every item's ID; ``tries`` leaves removed items out
        self._stores: dict[tuple, torch.Tensor] = {}  # growth buffers behind appended embeddings
        self.tokenizer = tokenizer
        for name, given in (("item_ids", item_ids), ("embedding_means", embedding_means),
                            ("text_settings", text_settings)):
            unknown = sorted(set(given or {}) - set(self.codes))
            if unknown:
                raise ValueError(f"{name}: {unknown} not among the catalogs {sorted(self.codes)}")
        self.item_ids, self._index_of, self.removed, self.means = {}, {}, {}, {}
        self.text_settings = {d: dict(t) for d, t in (text_settings or {}).items() if t}
        for d in self.codes:
            self._set_item_ids(d, _checked_item_ids(d, (item_ids or {}).get(d), len(self.codes[d])))
            if (embedding_means or {}).get(d) is not None:
                self.means[d] = _checked_mean(d, embedding_means[d])
        self.embeddings, self.unit = {}, {}
        if item_embeddings and not getattr(model.config, "item_vector_dim", 0):
            raise ValueError("item_embeddings needs a model with a dense item channel (item_vector_dim > 0)")
        for d, e in (item_embeddings or {}).items():
            if d not in self.codes:
                raise ValueError(f"item_embeddings: domain {d!r} is not among the catalogs {sorted(self.codes)}")
            self._set_embeddings(d, e)
        if unseen_frame not in ("identity", "aligned"):
            raise ValueError(f"unseen_frame: expected 'identity' or 'aligned', got {unseen_frame!r}")
        self.unseen_frame = unseen_frame
        self.frames = {}
        for d in self.unseen_domains:
            self._set_frame(d)

    def _trie(self, domain: str, codes: np.ndarray):
        """The catalog's trie over the model's K codes per level (not the largest code the catalog
        happens to use: a catalog whose codes stop below K would otherwise not match the model)."""
        from recbase.trie import ConceptTrie

        k, levels = int(self.model.config.codebook_size), int(self.model.config.levels)
        if codes.ndim != 2 or codes.shape[1] != levels:
            raise ValueError(f"catalogs[{domain!r}]: expected (N, {levels}) concept IDs (the model's levels), "
                             f"got shape {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= k):
            raise ValueError(f"catalogs[{domain!r}]: codes must lie in [0, {k}) (the model's codebook_size), "
                             f"got [{codes.min()}, {codes.max()}]")
        return ConceptTrie(codes, codebook_size=k)

    def _set_item_ids(self, domain: str, ids: list[str]) -> None:
        self.item_ids[domain] = ids
        self._index_of[domain] = {i: r for r, i in enumerate(ids)}
        self.removed[domain] = np.zeros(len(ids), dtype=bool)

    def _set_embeddings(self, domain: str, e) -> None:
        dim = getattr(self.model.config, "item_vector_dim", 0)
        e = np.asarray(e)
        n = len(self.codes[domain])
        if e.ndim != 2 or e.shape != (n, dim) or not np.issubdtype(e.dtype, np.floating):
            raise ValueError(f"item_embeddings[{domain!r}]: expected a float array of shape ({n}, {dim}) (one "
                             f"row per catalog item, the model's item_vector_dim), got {e.dtype} {e.shape}")
        if not np.isfinite(e).all():
            raise ValueError(f"item_embeddings[{domain!r}]: contains NaN or inf")
        self.embeddings[domain] = torch.as_tensor(e, dtype=torch.float32).to(self.device)
        self.unit[domain] = unit_rows(self.embeddings[domain])

    def _set_frame(self, domain: str) -> None:
        if self.unseen_frame != "aligned":
            return
        seen = [d for d in self.embeddings if d not in self.unseen_domains]
        if not seen or domain not in self.embeddings:
            raise ValueError("unseen_frame='aligned' needs item_embeddings of every unseen domain and of at "
                             f"least one seen domain (seen given: {seen}; {domain!r} given: "
                             f"{domain in self.embeddings})")
        source = torch.cat([self.embeddings[d] for d in seen]).cpu()
        self.frames[domain] = frame_alignment(self.embeddings[domain].cpu(), source).float().to(self.device)

    def add_catalog(self, domain: str, codes, unseen: bool = True, item_embeddings=None,
                    unordered: bool = False, item_ids=None, embedding_mean=None) -> None:
        """Add (or replace) one domain's catalog: its (N, L) concept IDs, whether the model never
        trained on it, its items' text embeddings (for the dense channel), whether its
        histories have no order (read as sets by the dense channel), its item ids and the mean
        its embeddings were centred on (see the class docstring)."""

        if unseen and not getattr(self.model.config, "concept_vector_dim", 0):
            raise ValueError("unseen needs a model with concept vectors (concept_vector_dim > 0)")
        if item_embeddings is not None and not getattr(self.model.config, "item_vector_dim", 0):
            raise ValueError("item_embeddings needs a model with a dense item channel (item_vector_dim > 0)")
        codes = np.asarray(codes, dtype=np.int64)
        trie = self._trie(domain, codes)
        ids = _checked_item_ids(domain, item_ids, len(codes))
        mean = None if embedding_mean is None else _checked_mean(domain, embedding_mean)
        self.codes[domain], self.tries[domain], self._full_tries[domain] = codes, trie, trie
        self._set_item_ids(domain, ids)
        self.means.pop(domain, None)
        if mean is not None:
            self.means[domain] = mean
        self.embeddings.pop(domain, None), self.unit.pop(domain, None), self.frames.pop(domain, None)
        if item_embeddings is not None:
            self._set_embeddings(domain, item_embeddings)
        self.unseen_domains = self.unseen_domains | {domain} if unseen else self.unseen_domains - {domain}
        self.unordered_domains = (self.unordered_domains | {domain} if unordered
                                  else self.unordered_domains - {domain})
        if unseen:
            self._set_frame(domain)

    # -- a living catalog -----------------------------------------------------------------------
    def save(self, path) -> None:
        """Write everything this recommender serves from into folder ``path``, atomically: the
        model, the tokenizer, every catalog (ids, concept IDs, removed items, what the dense channel
        reads) and the settings (``recbase.bundle``). A non-empty folder that is not a bundle is
        refused; files of yours inside a bundle folder are kept."""
        from recbase.bundle import save_bundle

        save_bundle(self, path)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "Recommender":
        """The recommender :meth:`save` wrote to ``path`` (no pickle: JSON and safetensors)."""
        from recbase.bundle import load_bundle

        return load_bundle(path, device=device)

    def indices_of(self, domain: str | None, item_ids) -> np.ndarray:
        """Row indices of the given item ids (raises on an unknown id, naming it)."""
        domain = self._domain(domain)
        if isinstance(item_ids, (str, bytes)):
            raise TypeError(f"item_ids: expected a list of ids, got the single string {item_ids!r}")
        index = self._index_of[domain]
        out = np.empty(len(item_ids), dtype=np.int64)
        for j, i in enumerate(item_ids):
            r = index.get(str(i))
            if r is None:
                raise KeyError(f"item_ids[{j}]: {str(i)!r} is not an item of the {domain!r} catalog")
            out[j] = r
        return out

    def ids_of(self, domain: str | None, indices) -> list[str]:
        """Item ids of row indices (-1, a padding slot, gives None)."""
        ids = self.item_ids[self._domain(domain)]
        return [ids[i] if i >= 0 else None for i in np.asarray(indices, dtype=np.int64).reshape(-1).tolist()]

    def add_items(self, domain: str | None, item_ids, embeddings) -> np.ndarray:
        """Add new items to a catalog from their text embeddings alone; returns their row indices.

        ``embeddings``: (n, d) from the same text encoder as the catalog's, as the encoder gives
        them (centred on the catalog's ``embedding_means`` entry when it has one). They are encoded
        on the tokenizer's codebooks into IDs that no item of the catalog holds (removed items keep
        theirs, so an old history still reads), the trie and the dense channel take them at once,
        and the model is untouched. Nothing changes when an argument is refused.
        """
        domain = self._domain(domain)
        if self.tokenizer is None:
            raise ValueError("add_items needs the tokenizer whose codebooks the catalog was encoded on: "
                             "Recommender(..., tokenizer=tok) (a saved bundle keeps it)")
        ids = self._new_ids(domain, item_ids)
        x = np.asarray(embeddings)
        width = int(self.tokenizer.quantizer.dim)
        if x.ndim != 2 or x.shape != (len(ids), width) or not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"embeddings: expected a float array of shape ({len(ids)}, {width}) (one row per "
                             f"new item, the tokenizer's width), got {x.dtype} {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("embeddings: contains NaN or inf")
        x = x.astype(np.float32)
        if domain in self.means:
            if self.means[domain].shape != (width,):
                raise ValueError(f"embedding_means[{domain!r}]: width {self.means[domain].shape} does not match "
                                 f"the embeddings' ({width})")
            x = x - self.means[domain]
            x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
        if domain in self.embeddings and self.embeddings[domain].shape[1] != width:
            raise ValueError(f"embeddings: the catalog's dense channel reads width {self.embeddings[domain].shape[1]}, "
                             f"the tokenizer {width}")
        codes = self.tokenizer.encode(x, avoid_fitted=False, avoid=self.codes[domain])
        start = len(self.codes[domain])
        all_codes = np.concatenate([self.codes[domain], codes])
        self._full_tries[domain] = self._trie(domain, all_codes)
        self.codes[domain] = all_codes
        self.item_ids[domain] = self.item_ids[domain] + ids
        self._index_of[domain].update({i: start + r for r, i in enumerate(ids)})
        self.removed[domain] = np.concatenate([self.removed[domain], np.zeros(len(ids), dtype=bool)])
        if domain in self.embeddings:
            new = torch.as_tensor(x, device=self.device)
            self.embeddings[domain] = self._grown(domain, "embeddings", new)
            self.unit[domain] = self._grown(domain, "unit", unit_rows(new))
        self._refresh_trie(domain)
        return np.arange(start, start + len(ids))

    def _grown(self, domain: str, which: str, new: torch.Tensor) -> torch.Tensor:
        """``getattr(self, which)[domain]`` with ``new`` rows appended, as the first rows of a buffer
        with room to spare (doubling), so a catalog that keeps growing copies its rows O(log N)
        times, not on every add."""
        old = getattr(self, which)[domain]
        store = self._stores.get((domain, which))
        n, m = old.shape[0], new.shape[0]
        if store is None or store.data_ptr() != old.data_ptr() or store.shape[0] < n + m:
            store = old.new_empty((max(2 * n, n + m), old.shape[1]))
            store[:n] = old
            self._stores[(domain, which)] = store
        store[n:n + m] = new
        return store[:n + m]

    def _new_ids(self, domain: str, item_ids) -> list[str]:
        if isinstance(item_ids, (str, bytes)):
            raise TypeError(f"item_ids: expected a list of ids, got the single string {item_ids!r}")
        ids = [str(i) for i in item_ids]
        if not ids:
            raise ValueError("item_ids: empty (nothing to add)")
        seen: set = set()
        for j, i in enumerate(ids):
            if i in seen:
                raise ValueError(f"item_ids[{j}]: {i!r} is given twice")
            seen.add(i)
            r = self._index_of[domain].get(i)
            if r is not None:
                state = "removed; ids are never reused" if self.removed[domain][r] else "in the catalog"
                raise ValueError(f"item_ids[{j}]: {i!r} is already an item of the {domain!r} catalog ({state})")
        return ids

    def remove_items(self, domain: str | None, item_ids) -> np.ndarray:
        """Take items out of a catalog at once: no later call returns them (beam search, dense
        top-N, hybrid) and scoring them is refused; their IDs stay reserved, so histories that hold
        them still read. Returns their row indices. Nothing changes when an argument is refused."""
        domain = self._domain(domain)
        rows = self.indices_of(domain, item_ids)
        removed = self.removed[domain]
        gone = rows[removed[rows]]
        if len(gone):
            raise ValueError(f"item_ids: {self.item_ids[domain][gone[0]]!r} was removed already")
        if len(np.unique(rows)) != len(rows):
            raise ValueError("item_ids: an id is given twice")
        if int((~removed).sum()) - len(rows) < 1:
            raise ValueError(f"item_ids: removing them would leave the {domain!r} catalog empty")
        removed = removed.copy()
        removed[rows] = True
        self.removed[domain] = removed
        self._refresh_trie(domain)
        return rows

    def _refresh_trie(self, domain: str) -> None:
        removed = self.removed[domain]
        full = self._full_tries[domain]
        self.tries[domain] = full.subset(np.flatnonzero(~removed)) if removed.any() else full


    def _removed_mask(self, domain: str) -> torch.Tensor | None:
        """[N] bool of the removed items (a view of ``removed``), None when there are none."""
        removed = self.removed[domain]
        return torch.from_numpy(removed) if removed.any() else None

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
        if domain not in self.unseen_domains:
            return contextlib.nullcontext()
        return self.model.content_only(self.frames.get(domain))

    def _mode(self, mode: str | None, domain: str) -> str:
        if mode is None:
            return "hybrid" if domain in self.embeddings else "generative"
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if mode != "generative" and domain not in self.embeddings:
            raise ValueError(f"mode={mode!r} needs item_embeddings of domain {domain!r} (and a model with a "
                             "dense item channel)")
        return mode

    def fusion_weight(self, domain: str) -> float:
        """The dense score's weight w in hybrid scoring for ``domain`` (by its reading)."""
        key = "unseen" if domain in self.unseen_domains else "seen"
        return float(getattr(self.model.config, "fusion_weights", {}).get(key, DEFAULT_FUSION_WEIGHT))

    def _prefill_inputs(self, chunk, domain):
        toks = [t.to(self.device) for t in history_tokens(chunk, self.codes[domain], self.vocab, self.max_items)]
        if domain not in self.embeddings:
            return toks, None, None
        kept = [np.asarray(h, dtype=np.int64)[-self.max_items:] if self.max_items is not None
                else np.asarray(h, dtype=np.int64) for h in chunk]  # the items history_tokens kept
        return toks, [self.embeddings[domain][torch.as_tensor(h)] for h in kept], kept

    def _dense_reading(self, scorer, toks, vectors, kept, chunk, domain):
        """[B, M] weights and [B, M, d] unit embeddings the dense score mixes: the prefill's weights
        over the kept history, or for an unordered domain the set reading (module docstring)."""
        if domain not in self.unordered_domains:
            return self._dense_inputs(self._history_weights(scorer, toks, vectors), kept, domain)
        # sorted first, so the reading is a function of the set alone (the given order never matters)
        items = [np.sort(np.asarray(h, dtype=np.int64)[-SET_MAX_ITEMS:]) for h in chunk]
        acc = [torch.zeros(len(h), device=self.device) for h in items]
        for p in range(SET_PERMUTATIONS):
            perms = [np.random.default_rng([_SET_SEED, len(h), p]).permutation(len(h)) for h in items]
            toks_p, vectors_p, kept_p = self._prefill_inputs([h[pm] for h, pm in zip(items, perms)], domain)
            w = self.model.start_generation(toks_p, item_vectors=vectors_p)[0].history_weights
            for b, pm in enumerate(perms):
                m = len(kept_p[b])  # the window read the last m items of this ordering
                if m:
                    acc[b][torch.as_tensor(pm[len(pm) - m:], device=self.device)] += w[b, :m] / SET_PERMUTATIONS
        return self._dense_inputs(torch.nn.utils.rnn.pad_sequence(acc, batch_first=True) if acc
                                  else torch.zeros(0, 1, device=self.device), items, domain)

    def _dense_inputs(self, weights, kept, domain):
        """Padded [B, M] weights and [B, M, d] unit embeddings of each user's kept history."""
        if not bool(torch.isfinite(weights).all()) or not np.isfinite(float(self.model.dense_temperature())):
            raise ValueError("model: the dense head gave NaN or inf history weights or temperature (a diverged or "
                             "corrupt model); refusing to rank by them")
        m = max(1, max((len(h) for h in kept), default=1))
        unit = self.unit[domain]
        full = torch.zeros(len(kept), m, device=self.device)
        hist = unit.new_zeros((len(kept), m, unit.shape[1]))
        for b, h in enumerate(kept):
            if len(h):  # the prefill's weights follow the kept items, oldest first
                full[b, :len(h)] = weights[b, :len(h)]
                hist[b, :len(h)] = unit[torch.as_tensor(h)]
        return full, hist

    def recommend(self, histories: Sequence[Sequence[int]], k: int = 10, domain: str | None = None,
                  num_beams: int = 20, exclude_history: bool = True, batch_size: int = 64,
                  mode: str | None = None):
        """Top-``k`` item indices (B, k) and scores (B, k) per history; -1 / -inf pad.

        mode: "generative" (beam search), "dense" (exact dense top-k over the catalog) or "hybrid"
        (the beam's ``num_beams`` items with the dense top-``num_beams``, fused); default "hybrid"
        when the Recommender has item embeddings, else "generative".
        """
        domain = self._domain(domain)
        mode = self._mode(mode, domain)
        if num_beams < k:
            raise ValueError(f"num_beams ({num_beams}) must be >= k ({k})")
        w = self.fusion_weight(domain)
        items_out = np.full((len(histories), k), -1, dtype=np.int64)
        scores_out = np.full((len(histories), k), -np.inf, dtype=np.float64)
        for s in range(0, len(histories), batch_size):
            chunk = histories[s:s + batch_size]
            for j, (items, scores) in enumerate(self._ranked(chunk, domain, num_beams, exclude_history, mode, w)):
                sel = slice(0, min(k, len(items)))
                items_out[s + j, sel] = items[sel]
                scores_out[s + j, sel] = scores[sel]
        return items_out, scores_out

    def recommend_frame(self, histories, k: int = 10, domain: str | None = None, *, user_col: str = "user_id",
                        item_col: str = "item_id", time_col: str | None = None, num_beams: int = 20,
                        exclude_history: bool = True, mode: str | None = None, batch_size: int = 64,
                        progress: bool = True):
        """Batch recommendation for pipelines: ``histories`` is a DataFrame of interaction rows
        (``user_col``, ``item_col`` and, to order each history, ``time_col``; without it the rows'
        order is the history's order). Returns a DataFrame ``(user_id, rank, item_id, score)``: ``k``
        rows per user (fewer when the catalog has fewer live items), rank 1 first, users in order
        of first appearance. Item ids are this catalog's (``item_ids``); an unknown one is refused."""
        import pandas as pd
        from tqdm.auto import tqdm

        domain = self._domain(domain)
        if not isinstance(histories, pd.DataFrame):
            raise TypeError(f"histories: expected a pandas DataFrame, got {type(histories).__name__}")
        cols = [c for c in (user_col, item_col, time_col) if c is not None]
        missing = [c for c in cols if c not in histories.columns]
        if missing:
            raise ValueError(f"histories: no column {missing[0]!r} (columns: {list(histories.columns)})")
        if k < 1:
            raise ValueError(f"k: expected >= 1, got {k}")
        frame = histories[cols]
        if time_col is not None:
            frame = frame.sort_values(time_col, kind="stable")
        index = self._index_of[domain]
        rows = frame[item_col].astype(str).map(index)
        if rows.isna().any():
            bad = frame[item_col][rows.isna()]
            raise ValueError(f"histories: {int(rows.isna().sum())} row(s) name an item that is not in the {domain!r} "
                             f"catalog, e.g. {str(bad.iloc[0])!r}")
        users = pd.unique(histories[user_col])
        grouped = dict(tuple(pd.DataFrame({"u": frame[user_col].to_numpy(), "r": rows.to_numpy(np.int64)})
                             .groupby("u", sort=False)["r"]))
        hists = [grouped[u].to_numpy(np.int64) for u in users]
        out_users, out_rank, out_items, out_scores = [], [], [], []
        ids = self.item_ids[domain]
        for s in tqdm(range(0, len(hists), batch_size), desc="recommend", disable=not progress, unit="batch"):
            items, scores = self.recommend(hists[s:s + batch_size], k=k, domain=domain, num_beams=max(num_beams, k),
                                           exclude_history=exclude_history, batch_size=batch_size, mode=mode)
            for u, it, sc in zip(users[s:s + batch_size], items, scores):
                kept = it >= 0
                out_users.extend([u] * int(kept.sum()))
                out_rank.extend(range(1, int(kept.sum()) + 1))
                out_items.extend(ids[i] for i in it[kept].tolist())
                out_scores.extend(sc[kept].tolist())
        return pd.DataFrame({"user_id": out_users, "rank": np.asarray(out_rank, dtype=np.int64),
                             "item_id": out_items, "score": np.asarray(out_scores, dtype=np.float64)})

    def _ranked(self, chunk, domain, num_beams, exclude_history, mode, w):
        """Per history: (items, scores) best first, history items dropped when asked."""
        pools = self.candidate_pool(chunk, domain, num_beams, exclude_history, mode)
        out = []
        for items, gen, dense in pools:
            score = gen if mode == "generative" else dense if mode == "dense" else (1 - w) * gen + w * dense
            order = np.lexsort((items, -score))
            out.append((items[order], score[order]))
        return out

    @torch.no_grad()
    def candidate_pool(self, chunk, domain, num_beams, exclude_history=True, mode="hybrid"):
        """Per history: (candidate items, generative log-likelihoods, dense scores) of the pool a
        mode ranks -- the beam's items ("generative"), the dense top-``num_beams`` ("dense"), or
        both ("hybrid"; every candidate then carries both scores). Unused scores are NaN."""
        from recbase.search import beam_search

        toks, vectors, kept = self._prefill_inputs(chunk, domain)
        scorer = self.model if vectors is None else _WithItemVectors(self.model, vectors)
        pools: list[list[np.ndarray]] = [[] for _ in chunk]
        banned = [np.asarray(h, dtype=np.int64) for h in chunk] if exclude_history else None
        with self._reading(domain):
            if mode in ("generative", "hybrid"):
                items, scores = beam_search(scorer, self.tries[domain], toks, num_beams=num_beams, k=num_beams)
                for j, (it, sc) in enumerate(zip(items.cpu().numpy(), scores.cpu().numpy())):
                    keep = it >= 0
                    if banned is not None:
                        keep &= ~np.isin(it, banned[j])
                    pools[j] = [it[keep], sc[keep].astype(np.float64)]
            if mode in ("dense", "hybrid"):
                full, hist = self._dense_reading(scorer, toks, vectors, kept, chunk, domain)
                tau = float(self.model.dense_temperature().detach())
                d_items, d_scores = dense_top_n(full, hist, self.unit[domain], tau, num_beams, banned=banned,
                                                excluded=self._removed_mask(domain))
                for j, (it, sc) in enumerate(zip(d_items.numpy(), d_scores.numpy())):
                    it = it[it >= 0]
                    if mode == "dense":
                        pools[j] = [it, np.full(len(it), np.nan), sc[:len(it)].astype(np.float64)]
                    else:
                        pools[j][0] = np.union1d(pools[j][0], it)
            if mode == "hybrid":
                cands = [p[0] for p in pools]
                gen = score_candidates(scorer, toks, cands, self.codes[domain])
                dense = self._dense_scores(full, hist, cands, domain, tau)
                pools = [[c, g, d] for c, g, d in zip(cands, gen, dense)]
        if mode == "generative":
            pools = [[it, sc, np.full(len(it), np.nan)] for it, sc in pools]
        return [tuple(p) for p in pools]

    def _history_weights(self, scorer, toks, vectors):
        """The dense weights of the chunk's histories: those the beam search or likelihood scoring
        already prefilled (kept by the adapter), else one prefill for them."""
        if isinstance(scorer, _WithItemVectors) and scorer.history_weights is not None:
            return scorer.history_weights
        return self.model.start_generation(toks, item_vectors=vectors)[0].history_weights

    def _dense_scores(self, full, hist, cands, domain, tau):
        out = []
        for b, c in enumerate(cands):
            c_t = torch.as_tensor(np.asarray(c, dtype=np.int64))
            out.append(dense_user_scores(full[b:b + 1], hist[b:b + 1], self.unit[domain][c_t], tau)[0]
                       .double().cpu().numpy())
        return out

    def score(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
              domain: str | None = None, batch_size: int = 64, mode: str | None = None) -> list[np.ndarray]:
        """Score of each candidate item given its history (zero-shot CTR scoring): its concept
        ID's log-likelihood ("generative"), the dense score ("dense") or their fusion ("hybrid",
        the default with item embeddings), as in :meth:`recommend`."""
        domain = self._domain(domain)
        mode = self._mode(mode, domain)
        w = self.fusion_weight(domain)
        if len(candidates) != len(histories):
            raise ValueError(f"candidates: expected one list per history ({len(histories)}), "
                             f"got {len(candidates)}")
        out: list[np.ndarray] = []
        n = len(self.codes[domain])
        for s in range(0, len(histories), batch_size):
            cands = [np.asarray(c, dtype=np.int64) for c in candidates[s:s + batch_size]]
            for b, c in enumerate(cands):
                if len(c) and (c.min() < 0 or c.max() >= n):
                    bad = int(c[(c < 0) | (c >= n)][0])
                    raise ValueError(f"candidates[{s + b}]: item index {bad} is out of range [0, {n}) "
                                     f"(not in the {domain!r} catalog)")
                gone = c[self.removed[domain][c]]
                if len(gone):
                    raise ValueError(f"candidates[{s + b}]: item {self.item_ids[domain][gone[0]]!r} (index "
                                     f"{int(gone[0])}) was removed from the {domain!r} catalog")
            toks, vectors, kept = self._prefill_inputs(histories[s:s + batch_size], domain)
            with torch.no_grad(), self._reading(domain):
                gen = dense = None
                if mode != "dense":
                    scorer = self.model if vectors is None else _WithItemVectors(self.model, vectors)
                    gen = score_candidates(scorer, toks, cands, self.codes[domain])
                if mode != "generative":
                    full, hist = self._dense_reading(scorer if mode != "dense" else None, toks, vectors, kept,
                                                     histories[s:s + batch_size], domain)
                    dense = self._dense_scores(full, hist, cands, domain, float(self.model.dense_temperature().detach()))
            out.extend(gen if mode == "generative" else dense if mode == "dense"
                       else [(1 - w) * g + w * d for g, d in zip(gen, dense)])
        return out

    def rank_candidates(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                        domain: str | None = None, k: int | None = None, batch_size: int = 64,
                        mode: str | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Direct recommendation: each history's own candidate items (indices, e.g. what an
        upstream system proposed), ranked best first by :meth:`score` (the same mode and fusion).
        Returns ``(items, scores)``: per history the top-``k`` candidates (all if None) and their
        scores; ties keep the candidates' given order. Every list must be non-empty, without
        duplicates, of items in the catalog (``indices_of`` maps ids to indices)."""
        if len(candidates) != len(histories):
            raise ValueError(f"candidates: expected one list per history ({len(histories)}), got {len(candidates)}")
        if k is not None and (not isinstance(k, (int, np.integer)) or k < 1):
            raise ValueError(f"k: expected an int >= 1 or None, got {k!r}")
        cands = []
        for b, c in enumerate(candidates):
            c = np.asarray(c)
            if c.ndim != 1 or c.size == 0:
                raise ValueError(f"candidates[{b}]: expected a non-empty list of item indices, got shape {c.shape}")
            if not np.issubdtype(c.dtype, np.integer):
                raise ValueError(f"candidates[{b}]: expected integer item indices, got dtype {c.dtype} "
                                 "(map item ids with indices_of)")
            c = c.astype(np.int64)
            uniq, counts = np.unique(c, return_counts=True)
            if (counts > 1).any():
                raise ValueError(f"candidates[{b}]: item index {int(uniq[counts > 1][0])} is listed twice")
            cands.append(c)
        scores = self.score(histories, cands, domain=domain, batch_size=batch_size, mode=mode)
        items_out, scores_out = [], []
        for c, sc in zip(cands, scores):
            order = np.argsort(-np.asarray(sc, dtype=np.float64), kind="stable")[:k]
            items_out.append(c[order])
            scores_out.append(np.asarray(sc, dtype=np.float64)[order])
        return items_out, scores_out

    @torch.no_grad()
    def predict_rating(self, histories: Sequence[Sequence[int]], history_ratings: Sequence[Sequence[float]],
                       items: Sequence[int], domain: str | None = None, scale=None,
                       batch_size: int = 64) -> np.ndarray:
        """Rating prediction (the model's rating task): the rating each user would give
        ``items[b]`` after rating the items of ``histories[b]`` with ``history_ratings[b]`` (the
        domain's own scale; NaN = interacted but not rated). One RATE sequence per user: its last
        ``max_items - 1`` history items, their ratings, then the item; the regression head's
        prediction on the item's last token, mapped back to ``scale`` (default: the scale the model
        trained on for ``domain``, ``config.rating_scales``) and clipped to it. Returns float64 [B]."""
        domain = self._domain(domain)
        cfg = self.model.config
        if not getattr(cfg, "rating_task", False):
            raise ValueError("predict_rating needs a model with the rating task (RecBaseConfig(rating_task=True), "
                             "trained with TrainConfig(tasks={'sequential': ..., 'rating': ...}))")
        if scale is None:
            if domain not in cfg.rating_scales:
                raise ValueError(f"scale: the model has no rating scale for domain {domain!r} (it knows "
                                 f"{sorted(cfg.rating_scales)}); pass scale=(lowest, highest)")
            scale = cfg.rating_scales[domain]
        lo, hi = _checked_scale(scale)
        items = np.asarray(items)
        if items.ndim != 1 or len(items) != len(histories) or (len(items) and not np.issubdtype(items.dtype, np.integer)):
            raise ValueError(f"items: expected one integer item index per history ({len(histories)}), got "
                             f"{items.dtype} {items.shape}")
        if len(history_ratings) != len(histories):
            raise ValueError(f"history_ratings: expected one list per history ({len(histories)}), got {len(history_ratings)}")
        n, L = len(self.codes[domain]), cfg.levels
        items = items.astype(np.int64)
        if len(items) and (items.min() < 0 or items.max() >= n):
            raise ValueError(f"items: item index {int(items[(items < 0) | (items >= n)][0])} is out of range [0, {n}) "
                             f"(not in the {domain!r} catalog)")
        gone = items[self.removed[domain][items]]
        if len(gone):
            raise ValueError(f"items: item {self.item_ids[domain][gone[0]]!r} was removed from the {domain!r} catalog")
        keep = cfg.max_items - 1
        seqs, rates = [], []
        for b, (h, r) in enumerate(zip(histories, history_ratings)):
            h, r = np.asarray(h, dtype=np.int64).reshape(-1), np.asarray(r, dtype=np.float64).reshape(-1)
            if len(h) != len(r):
                raise ValueError(f"history_ratings[{b}]: expected one rating per history item ({len(h)}), got {len(r)}")
            bad = ~np.isnan(r) & ((r < lo) | (r > hi))
            if bad.any() or np.isinf(r).any():
                raise ValueError(f"history_ratings[{b}]: rating {float(r[bad | np.isinf(r)][0]):g} is outside the "
                                 f"domain's scale [{lo:g}, {hi:g}]")
            seqs.append(np.r_[h[-keep:] if keep else h[:0], items[b]])
            rates.append(np.r_[normalise_ratings(r[-keep:] if keep else r[:0], (lo, hi)), np.nan])
        out = np.empty(len(items), dtype=np.float64)
        tokens = torch.as_tensor(self.vocab.to_tokens(self.codes[domain]))
        for s in range(0, len(seqs), batch_size):
            chunk, chunk_r = seqs[s:s + batch_size], rates[s:s + batch_size]
            ids = torch.cat([torch.cat([torch.tensor([self.vocab.BOS]), tokens[torch.as_tensor(c)].reshape(-1)])
                             for c in chunk]).to(self.device)
            lens = torch.tensor([1 + L * len(c) for c in chunk])
            cu = torch.zeros(len(chunk) + 1, dtype=torch.int64)
            cu[1:] = lens.cumsum(0)
            per_token = torch.cat([torch.as_tensor(np.r_[np.nan, np.repeat(r, L)], dtype=torch.float32)
                                   for r in chunk_r]).to(self.device)
            extra = {}
            if domain in self.embeddings and getattr(cfg, "item_vector_dim", 0):
                vec = self.embeddings[domain].new_zeros((ids.shape[0], self.embeddings[domain].shape[1]))
                ends = torch.cat([cu[b] + L * torch.arange(1, len(c) + 1) for b, c in enumerate(chunk)])
                vec[ends.to(self.device)] = self.embeddings[domain][torch.as_tensor(np.concatenate(chunk))]
                extra["item_vectors"] = vec
            with self._reading(domain):
                res = self.model(input_ids=ids, cu_seqlens=cu.to(self.device), output_logits=False,
                                 task_ids=torch.ones(len(chunk), dtype=torch.int64, device=self.device),
                                 ratings=per_token, **extra)
            pred = res.rating_predictions[(cu[1:] - 1).to(self.device)].double().cpu().numpy()
            if np.isnan(pred).any():
                raise ValueError("model: a rating prediction is NaN (a diverged or corrupt model)")
            out[s:s + len(chunk)] = np.clip(denormalise_ratings(pred, (lo, hi)), lo, hi)
        return out


def choose_fusion(rec: Recommender, domain: str, histories, targets, *, reading: str,
                  grid: Sequence[float] = tuple(np.round(np.linspace(0, 1, 11), 2)), k: int = 10,
                  num_beams: int = 60, batch_size: int = 64) -> dict:
    """Choose the hybrid fusion weight w on a SOURCE domain's validation items and store it in
    ``rec.model.config.fusion_weights[reading]`` (saved with the model).

    reading="seen" scores the domain as the model reads it in-domain; reading="unseen" reads it by
    content alone, as a domain it never saw would be read, so the weight used zero-shot is chosen
    without any interaction of the target domain. The candidate pool and both scores are computed
    once; each w only re-ranks. Returns {"weight": w, "ndcg@k": {w: NDCG@k}} (ties: the smaller w).
    """
    from recbase.evaluate import ndcg_at_k

    if reading not in ("seen", "unseen"):
        raise ValueError(f"reading: expected 'seen' or 'unseen', got {reading!r}")
    domain = rec._domain(domain)
    rec._mode("hybrid", domain)
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) != len(histories):
        raise ValueError(f"targets: expected one per history ({len(histories)}), got {len(targets)}")
    saved = rec.unseen_domains
    rec.unseen_domains = saved | {domain} if reading == "unseen" else saved - {domain}
    try:
        pools = []
        for s in range(0, len(histories), batch_size):
            pools.extend(rec.candidate_pool(histories[s:s + batch_size], domain, num_beams, True, "hybrid"))
    finally:
        rec.unseen_domains = saved
    table = {}
    for w in grid:
        ranked = np.full((len(pools), k), -1, dtype=np.int64)
        for b, (items, gen, dense) in enumerate(pools):
            order = np.lexsort((items, -((1 - w) * gen + w * dense)))[:k]
            ranked[b, :len(order)] = items[order]
        table[float(w)] = float(ndcg_at_k(ranked, targets, k))
    best = max(table, key=lambda w: (table[w], -w))
    weights = dict(getattr(rec.model.config, "fusion_weights", {}) or {})
    weights[reading] = best
    rec.model.config.fusion_weights = weights
    return {"weight": best, f"ndcg@{k}": table}
