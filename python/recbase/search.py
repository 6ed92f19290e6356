"""Trie-constrained beam search over concept IDs, and a HuggingFace ``LogitsProcessor``.

``beam_search(model, trie, histories, num_beams, k)`` decodes one item (L codes) per user:
at each level every beam's trie state yields its valid children through one CSR gather
(``recbase.ops.constrained_beam_step``), beams with no valid child die (score -inf), and the
best ``num_beams`` expansions per user survive. Scores are summed log-probabilities; the
result is the top-``k`` distinct catalog items per user.

``model`` may be
  (a) a callable ``fn(users: LongTensor[R], prefixes: LongTensor[R, t]) -> log_probs [R, K]``
      over level ``t``'s codes (``histories`` is then a batch size or a LongTensor of user ids);
  (b) an object with the generation protocol (``start_generation`` / ``select_generation`` /
      ``step_generation``, see HELPERS conventions): each history is prefilled once, the cache
      is expanded to beams with ``select_generation`` and reordered by parent each level;
  (c) a HuggingFace causal LM over concept tokens (token id ``4 + l*K + c``), wrapped in
      :class:`HFConceptLM` (same protocol, ``past_key_values``).

Example:
    >>> import torch
    >>> from recbase import ConceptTrie, beam_search
    >>> trie = ConceptTrie(torch.tensor([[0, 1], [0, 2], [3, 0]]), codebook_size=4)
    >>> def scorer(users, prefixes):  # same log-probs at every level
    ...     return torch.log_softmax(torch.tensor([3.0, 0.0, 2.0, 1.0]).expand(len(users), 4), -1)
    >>> items, scores = beam_search(scorer, trie, histories=1, num_beams=3, k=3)
    >>> items.tolist()
    [[1, 2, 0]]
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from recbase.ops.beam import constrained_beam_step
from recbase.trie import ConceptTrie

__all__ = ["beam_search", "ConceptTrieLogitsProcessor", "HFConceptLM"]

PAD, BOS, EOS, MASK = 0, 1, 2, 3
NUM_SPECIALS = 4


def _check_log_probs_shape(lp: torch.Tensor, rows: int, K: int, level: int) -> torch.Tensor:
    if not isinstance(lp, torch.Tensor) or lp.dim() != 2 or lp.shape[0] != rows or lp.shape[1] != K:
        shape = tuple(lp.shape) if isinstance(lp, torch.Tensor) else type(lp).__name__
        raise ValueError(f"model: expected log_probs of shape ({rows}, {K}) at level {level} "
                         f"(rows x trie.codebook_size), got {shape}")
    return lp


def _refuse_bad_log_probs(count: int, level: int, where: str = "") -> None:
    if count:  # -inf is a masked code; NaN / +inf is a broken model
        raise ValueError(f"model: log_probs at level {level} hold {count} NaN or +inf value(s){where} "
                         "(a diverged or corrupt model); refusing to rank by them")


def _check_log_probs(lp: torch.Tensor, rows: int, K: int, level: int) -> torch.Tensor:
    _check_log_probs_shape(lp, rows, K, level)
    _refuse_bad_log_probs(int((torch.isnan(lp) | (lp == float("inf"))).sum()), level)
    return lp


_NATIVE_CPU_DRIVER = True  # False: the tensor-op driver (the one CUDA uses) also on CPU (tests)


def _native_search(proto, state, lp, tt, B: int, L: int, K: int, num_beams: int):
    """The CPU search driver: one native call per level steps, accumulates and computes the next
    level's parent rows and tokens (``C.beam_search_level``), and checks the log-probs the step
    reads for NaN / +inf, so no tensor work runs between the model's calls."""
    from recbase._native import C

    offsets, codes = tt.offsets.numpy(), tt.codes.numpy()
    scores = np.zeros((B, 1), dtype=np.float32)
    states = np.zeros((B, 1), dtype=np.int64)
    for level in range(L):
        lp_np = lp.detach().to(torch.float32).contiguous().numpy()
        scores, rows, tokens, states, bad = C.beam_search_level(lp_np, scores, states, offsets, codes, num_beams)
        _refuse_bad_log_probs(bad, level, " among the catalog's codes")
        if level == L - 1:
            break
        state = proto.select_generation(state, torch.from_numpy(rows))
        state, lp = proto.step_generation(state, torch.from_numpy(tokens), level)
        _check_log_probs_shape(lp, B * num_beams, K, level + 1)
        if lp.device.type != "cpu":
            raise ValueError(f"model: log_probs moved to {lp.device} at level {level + 1} (the search runs on cpu)")
    return torch.from_numpy(scores), torch.from_numpy(states)


class HFConceptLM:
    """Generation-protocol adapter for a HuggingFace causal LM over concept tokens.

    Prefills each history once (left padding + ``attention_mask`` + ``position_ids``), expands
    and reorders ``past_key_values`` by row index, and returns log-softmax over the K logits of
    the next level's tokens ``4 + level*K + c`` (the rest of the vocabulary is ignored).
    """

    def __init__(self, model, levels: int, codebook_size: int):
        import inspect

        self.model = model
        # transformers >= 5.x renames ``past_key_values`` to ``cache``; use what forward takes.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.levels = int(levels)
        self.codebook_size = int(codebook_size)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        need = NUM_SPECIALS + self.levels * self.codebook_size
        if vocab is not None and vocab < need:
            raise ValueError(f"model: vocab_size {vocab} is smaller than 4 + L*K = {need} "
                             f"(L={self.levels}, K={self.codebook_size})")

    @staticmethod
    def _cache_of(out):
        cache = getattr(out, "past_key_values", None)
        return cache if cache is not None else getattr(out, "cache", None)

    def _level_log_probs(self, logits: torch.Tensor, level: int) -> torch.Tensor:
        lo = NUM_SPECIALS + level * self.codebook_size
        return torch.log_softmax(logits[:, lo:lo + self.codebook_size].float(), dim=-1)

    @torch.no_grad()
    def start_generation(self, histories: Sequence[torch.Tensor]):
        dev = next(self.model.parameters()).device
        seqs = []
        for i, h in enumerate(histories):
            h = torch.as_tensor(h, dtype=torch.long).reshape(-1)
            if h.numel() == 0:
                h = torch.tensor([BOS])  # an empty history starts from BOS
            seqs.append(h)
        B, T = len(seqs), max(int(s.numel()) for s in seqs)
        ids = torch.full((B, T), PAD, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding: the last position is real for every row
            ids[i, T - s.numel():] = s
            mask[i, T - s.numel():] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        state = {"past": self._cache_of(out), "mask": mask, "next_pos": pos[:, -1] + 1}
        return state, self._level_log_probs(out.logits[:, -1], 0)

    def select_generation(self, state, index: torch.Tensor):
        past = state["past"]
        index = index.to(state["mask"].device)
        if hasattr(past, "reorder_cache"):
            past.reorder_cache(index)
        else:  # legacy tuple cache
            past = tuple(tuple(t.index_select(0, index) for t in layer) for layer in past)
        return {"past": past, "mask": state["mask"].index_select(0, index),
                "next_pos": state["next_pos"].index_select(0, index)}

    @torch.no_grad()
    def step_generation(self, state, codes: torch.Tensor, level: int):
        mask = state["mask"]
        ids = (NUM_SPECIALS + level * self.codebook_size + codes.to(mask.device)).unsqueeze(1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = state["next_pos"].unsqueeze(1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         use_cache=True, **{self._cache_kw: state["past"]})
        new = {"past": self._cache_of(out), "mask": mask, "next_pos": state["next_pos"] + 1}
        return new, self._level_log_probs(out.logits[:, -1], level + 1)


class _CallableProtocol:
    """The generation protocol over a plain ``fn(users, prefixes)`` scorer."""

    def __init__(self, fn: Callable, users: torch.Tensor):
        self.fn, self.users = fn, users

    def start_generation(self, histories):
        users = self.users
        prefixes = torch.zeros((users.shape[0], 0), dtype=torch.long, device=users.device)
        return {"users": users, "prefixes": prefixes}, self.fn(users, prefixes)

    def select_generation(self, state, index):
        return {k: v.index_select(0, index.to(v.device)) for k, v in state.items()}

    def step_generation(self, state, codes, level):
        prefixes = torch.cat([state["prefixes"], codes.to(state["prefixes"].device).unsqueeze(1)], 1)
        state = {"users": state["users"], "prefixes": prefixes}
        return state, self.fn(state["users"], prefixes)


def _is_hf_model(model) -> bool:
    import sys

    if "transformers" not in sys.modules:  # an HF model implies transformers is imported
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


@torch.no_grad()
def beam_search(model, trie: ConceptTrie, histories=None, num_beams: int = 20, k: int = 10):
    """Top-``k`` catalog items per user by trie-constrained beam search.

    Returns ``(items LongTensor (B, k), scores Tensor (B, k))`` sorted by score (summed
    log-probs); item ``-1`` / score ``-inf`` where fewer than ``k`` valid items were reached.
    Exact (equal to exhaustive enumeration) whenever ``num_beams >= trie.num_items``.
    """
    if not isinstance(trie, ConceptTrie):
        raise TypeError(f"trie: expected a recbase.ConceptTrie, got {type(trie).__name__}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    if not isinstance(num_beams, int) or num_beams < k:
        raise ValueError(f"num_beams: expected an int >= k = {k}, got {num_beams!r}")
    L, K = trie.depth, trie.codebook_size
    # more beams than items cannot find more (the search is exhaustive at num_items beams)
    num_beams = min(num_beams, max(k, trie.num_items))

    if hasattr(model, "start_generation"):
        proto = model
    elif _is_hf_model(model):
        proto = HFConceptLM(model, L, K)
    elif callable(model):
        if isinstance(histories, int) and not isinstance(histories, bool):
            if histories < 1:
                raise ValueError(f"histories: expected a batch size >= 1, got {histories}")
            users = torch.arange(histories)
        elif isinstance(histories, torch.Tensor) and histories.dim() == 1 and not histories.is_floating_point():
            users = histories.long()
        else:
            raise TypeError("histories: with a callable scorer pass a batch size (int) or a 1-d "
                            f"LongTensor of user ids, got {type(histories).__name__}")
        proto = _CallableProtocol(model, users)
        histories = None
    else:
        raise TypeError(f"model: expected a callable scorer, a generation-protocol object or a "
                        f"HuggingFace causal LM, got {type(model).__name__}")

    cfg = getattr(proto, "config", None)
    for attr, want in (("levels", L), ("codebook_size", K)):
        got = getattr(cfg, attr, None) if cfg is not None else getattr(proto, attr, None)
        if got is not None and int(got) != want:
            raise ValueError(f"model: config.{attr} = {got} but the trie has {attr} = {want}")

    if isinstance(proto, _CallableProtocol):
        B = proto.users.shape[0]
    else:
        if isinstance(histories, torch.Tensor) and histories.dim() == 2:
            histories = list(histories)
        if not isinstance(histories, (list, tuple)):
            raise TypeError("histories: expected a list of 1-d LongTensors of token ids "
                            f"(one per user), got {type(histories).__name__}")
        B = len(histories)
        if B == 0:
            raise ValueError("histories: empty batch")

    state, lp = proto.start_generation(histories)
    dev = lp.device if isinstance(lp, torch.Tensor) else None
    if dev is not None and dev.type == "cpu" and _NATIVE_CPU_DRIVER:
        _check_log_probs_shape(lp, B, K, 0)
        beam_scores, states = _native_search(proto, state, lp, trie.tensors(dev), B, L, K, num_beams)
        return trie.items_of(states[:, :k]), beam_scores[:, :k]
    _check_log_probs(lp, B, K, 0)
    tt = trie.tensors(dev)
    beam_scores = torch.zeros((B, 1), dtype=torch.float32, device=dev)
    states = torch.zeros((B, 1), dtype=torch.long, device=dev)
    user_base = torch.arange(B, device=dev).unsqueeze(1)
    for level in range(L):
        W = states.shape[1]
        beam_scores, parent, token, states = constrained_beam_step(
            lp.float(), beam_scores, states, tt.offsets, tt.codes, num_beams)
        if level == L - 1:
            break
        # Row of each new beam's parent (dead slots point at the user's first row; ignored).
        rows = (user_base * W + parent.clamp(min=0)).reshape(-1)
        state = proto.select_generation(state, rows)
        state, lp = proto.step_generation(state, token.clamp(min=0).reshape(-1), level)
        _check_log_probs(lp, B * num_beams, K, level + 1)
    items = trie.items_of(states[:, :k])
    scores = beam_scores[:, :k]
    return items, scores


class ConceptTrieLogitsProcessor:
    """HuggingFace ``LogitsProcessor`` restricting ``generate`` to catalog items.

    Duck-typed (``LogitsProcessorList`` only calls it), so ``recbase.search`` does not import
    transformers.

    Tracks each row's trie state from its generated suffix (tokens after ``prompt_length``)
    with one vectorised search per level (no Python loop over beams), keeps the scores of the
    state's valid children ``4 + t*K + code`` and sets every other token to ``-inf``; after L
    tokens only ``eos_token_id`` is allowed. A row whose suffix left the trie gets all ``-inf``
    (dead, never unconstrained).

    Args:
        trie: the catalog's ConceptTrie.
        prompt_length: length of the (padded) prompt; if None, taken from the first call
            (use a fresh processor per ``generate`` call then).
        eos_token_id: token allowed once an item is complete (default EOS=2).

    Example:
        >>> import torch
        >>> from recbase import ConceptTrie, ConceptTrieLogitsProcessor
        >>> trie = ConceptTrie(torch.tensor([[0, 1], [0, 2], [3, 0]]), codebook_size=4)
        >>> proc = ConceptTrieLogitsProcessor(trie, prompt_length=1)
        >>> out = proc(torch.tensor([[1, 4]]), torch.zeros(1, 12))  # after code 0 at level 0
        >>> torch.isfinite(out[0]).nonzero().flatten().tolist()     # level-1 codes 1, 2
        [9, 10]
    """

    def __init__(self, trie: ConceptTrie, prompt_length: int | None = None, eos_token_id: int = EOS):
        if not isinstance(trie, ConceptTrie):
            raise TypeError(f"trie: expected a recbase.ConceptTrie, got {type(trie).__name__}")
        self.trie = trie
        self.trie_id = trie.trie_id
        self.prompt_length = prompt_length
        self.eos_token_id = int(eos_token_id)
        n = trie.num_nodes
        offsets = trie.offsets
        # BFS order sorts non-root nodes by (parent, code): one global sorted key per edge.
        parent = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
        self._edge_key_np = parent * trie.codebook_size + trie.codes[1:]
        self._cache: dict[str, torch.Tensor] = {}

    def _edge_key(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(self._edge_key_np).to(device)
        return self._cache[key]

    def states_of(self, suffix: torch.Tensor) -> torch.Tensor:
        """Trie node of each row after its generated tokens ``suffix`` [R, t] (-1 = left the trie)."""
        K, L = self.trie.codebook_size, self.trie.depth
        edge_key = self._edge_key(suffix.device)
        state = torch.zeros(suffix.shape[0], dtype=torch.long, device=suffix.device)
        for level in range(min(suffix.shape[1], L)):
            code = suffix[:, level] - NUM_SPECIALS - level * K
            ok = (state >= 0) & (code >= 0) & (code < K)
            q = state.clamp(min=0) * K + code.clamp(0, K - 1)
            pos = torch.searchsorted(edge_key, q).clamp(max=edge_key.shape[0] - 1)
            found = ok & (edge_key[pos] == q)
            state = torch.where(found, pos + 1, torch.full_like(state, -1))
        return state

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        K, L = self.trie.codebook_size, self.trie.depth
        if scores.dim() != 2 or scores.shape[1] < NUM_SPECIALS + L * K:
            raise ValueError(f"scores: expected shape (rows, vocab >= 4 + L*K = "
                             f"{NUM_SPECIALS + L * K}) for this trie (L={L}, K={K}), got "
                             f"{tuple(scores.shape)}: is the trie from another tokenizer?")
        if input_ids.shape[0] != scores.shape[0]:
            raise ValueError(f"input_ids: expected {scores.shape[0]} rows like scores, got "
                             f"{input_ids.shape[0]}")
        t = input_ids.shape[1] - self.prompt_length
        if t < 0:
            raise ValueError(f"input_ids: length {input_ids.shape[1]} is shorter than "
                             f"prompt_length {self.prompt_length}")
        out = torch.full_like(scores, float("-inf"))
        if t >= L:
            out[:, self.eos_token_id] = scores[:, self.eos_token_id]
            return out
        state = self.states_of(input_ids[:, self.prompt_length:])
        tt = self.trie.tensors(scores.device)
        live = state >= 0
        s = state.clamp(min=0)
        start = tt.offsets[s]
        count = torch.where(live, tt.offsets[s + 1] - start, torch.zeros_like(start))
        C = int(count.max()) if count.numel() else 0
        if C == 0:
            return out
        j = torch.arange(C, device=scores.device)
        valid = j < count.unsqueeze(1)
        # Padding slots repeat the row's first child: same value written twice, harmless.
        node = start.unsqueeze(1) + torch.where(valid, j, torch.zeros_like(j))
        tok = NUM_SPECIALS + t * K + tt.codes[node]
        tok = torch.where(live.unsqueeze(1), tok, torch.zeros_like(tok))
        vals = scores.gather(1, tok)
        vals = torch.where(live.unsqueeze(1), vals, torch.full_like(vals, float("-inf")))
        out.scatter_(1, tok, vals)  # dead rows write -inf at placeholder token 0
        return out
