"""Item tokenizer: item embeddings -> unique hierarchical concept IDs, and the shared vocabulary.

An item's concept ID is the tuple of its residual-quantization codes (``ResidualQuantizer``).
Two items with the same tuple would make an ID that does not identify one item, which silently
corrupts generation and evaluation, so ``ItemTokenizer`` always makes IDs unique:

* ``dedup="extra_level"`` (default, as TIGER): one more level is appended; it numbers the
  items that share a semantic tuple 0, 1, 2, ... (closest to its reconstruction first).
  Every ID has ``levels + 1`` codes.
* ``dedup="reassign"`` (as RecBase): colliding items are moved, greedily by distance, to the
  nearest free code of the last level under the same prefix. IDs keep ``levels`` codes.

Tokens: 4 specials (PAD=0, BOS=1, EOS=2, MASK=3), then the token of code ``c`` at level ``l``
is ``4 + l*K + c`` — one vocabulary shared by every domain.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import torch

from recbase._atomic import atomic_dir
from recbase.quantize import ResidualQuantizer

_FORMAT_VERSION = 1


class ConceptVocab:
    """Token ids of concept codes: ``token = NUM_SPECIAL + level * K + code``.

    >>> v = ConceptVocab(levels=3, codebook_size=256)
    >>> v.size, int(v.to_tokens(np.array([[1, 2, 3]]))[0, 2])
    (772, 519)
    """

    PAD, BOS, EOS, MASK = 0, 1, 2, 3
    NUM_SPECIAL = 4

    def __init__(self, levels: int, codebook_size: int):
        if levels < 1 or codebook_size < 1:
            raise ValueError(f"levels and codebook_size must be >= 1, got {levels}, {codebook_size}")
        self.levels = int(levels)
        self.codebook_size = int(codebook_size)

    @property
    def size(self) -> int:
        return self.NUM_SPECIAL + self.levels * self.codebook_size

    def _offsets(self, like):
        off = self.NUM_SPECIAL + np.arange(self.levels) * self.codebook_size
        return torch.as_tensor(off, device=like.device) if isinstance(like, torch.Tensor) else off

    def to_tokens(self, codes):
        """(N, L) codes -> (N, L) token ids (numpy or torch, same kind as given)."""
        _check_codes(codes, self.levels, self.codebook_size, "codes")
        return codes + self._offsets(codes)

    def to_codes(self, tokens):
        """(N, L) token ids of whole items -> (N, L) codes; raises on specials or misaligned levels."""
        if tokens.ndim != 2 or tokens.shape[1] != self.levels:
            raise ValueError(f"tokens: expected shape (N, {self.levels}), got {tuple(tokens.shape)}")
        codes = tokens - self._offsets(tokens)
        if bool((codes < 0).any()) or bool((codes >= self.codebook_size).any()):
            raise ValueError("tokens: some token is a special token or belongs to another level")
        return codes

    def level_of(self, tokens):
        """Level of each concept token (-1 for special tokens)."""
        lvl = (tokens - self.NUM_SPECIAL) // self.codebook_size
        return lvl.clip(-1, self.levels - 1) if isinstance(lvl, np.ndarray) else lvl.clamp(-1, self.levels - 1)


def _check_codes(codes, levels: int, k: int, name: str) -> None:
    if codes.ndim != 2 or codes.shape[1] != levels:
        raise ValueError(f"{name}: expected shape (N, {levels}), got {tuple(codes.shape)}")
    if codes.shape[0] and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise ValueError(
            f"{name}: codes must lie in [0, {k}), got range [{int(codes.min())}, {int(codes.max())}]"
        )


def _as_numpy_embeddings(x, name: str = "embeddings") -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array (items, dim), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty input (0 items)")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name}: expected floating point values, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return x


def centre_embeddings(embeddings) -> np.ndarray:
    """One catalog's embeddings minus their mean, re-normalised to unit length (float32).

    Centre each domain on its own mean before tokenizing: the words its template shares with
    every item (``Describe a movie: ...``) otherwise dominate the first level, so two domains
    would share no first-level concept.
    """
    x = _as_numpy_embeddings(embeddings)
    x = x - x.mean(0, keepdims=True)
    return (x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def _group_rank(keys: np.ndarray, order_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows of ``keys``: (group id, rank within group by ``order_key`` then index)."""
    _, group = np.unique(keys, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.lexsort((np.arange(len(keys)), order_key, group))
    sorted_group = group[order]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(order)) - first
    return group, rank


def _rows_sharing_prefix(registry: np.ndarray, keys: np.ndarray, width: int) -> np.ndarray:
    """The rows of ``registry`` whose first ``width`` codes equal those of some row of ``keys``.
    Vectorised (a 64-bit row hash picks candidates, an exact comparison keeps the true ones), so a
    million-item registry costs milliseconds, not a Python loop over every row."""
    if not len(registry) or not len(keys):
        return registry[:0]
    mult = np.random.default_rng(0x5EED).integers(1, 2 ** 62, size=width, dtype=np.int64) | 1

    def row_hash(a):  # int64 products wrap around: a hash, not a number
        return (a[:, :width].astype(np.int64) * mult).sum(1)
    cand = registry[np.isin(row_hash(registry), row_hash(keys))]
    wanted = {tuple(r) for r in keys[:, :width].tolist()}
    return cand[np.fromiter((tuple(r) in wanted for r in cand[:, :width].tolist()), bool, len(cand))]


class ItemTokenizer:
    """Turns item embeddings into unique concept IDs over a shared vocabulary.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(2000, 32)).astype(np.float32)
    >>> tok = ItemTokenizer(levels=2, codebook_size=16).fit(x)
    >>> ids = tok.codes                       # (2000, 3): 2 semantic levels + 1 disambiguation
    >>> len(np.unique(ids, axis=0)) == len(ids)
    True
    >>> tok.vocab_size
    52
    """

    def __init__(
        self,
        levels: int = 3,
        codebook_size: int = 256,
        method: str = "kmeans",
        dedup: str = "extra_level",
        seed: int = 0,
        **quantizer_kwargs,
    ):
        if dedup not in ("extra_level", "reassign", "none"):
            raise ValueError(f"dedup: expected 'extra_level', 'reassign' or 'none', got {dedup!r}")
        if dedup == "reassign" and method != "kmeans":
            raise ValueError("dedup='reassign' needs method='kmeans' (it reassigns in input space)")
        self.levels = int(levels)
        self.codebook_size = int(codebook_size)
        self.method = method
        self.dedup = dedup
        self.seed = seed
        self.quantizer = ResidualQuantizer(levels, codebook_size, method=method, seed=seed,
                                           **quantizer_kwargs)
        self.codes: np.ndarray | None = None
        self._report: dict | None = None

    # -- shape of the IDs ---------------------------------------------------------------------
    @property
    def id_length(self) -> int:
        return self.levels + (1 if self.dedup == "extra_level" else 0)

    @property
    def vocab(self) -> ConceptVocab:
        return ConceptVocab(self.id_length, self.codebook_size)

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def num_items(self) -> int:
        return 0 if self.codes is None else len(self.codes)

    # -- fitting and encoding -------------------------------------------------------------------
    def fit(self, embeddings, progress: bool = True) -> "ItemTokenizer":
        """Fit the quantizer on the catalog's embeddings and assign each item a unique ID."""
        x = _as_numpy_embeddings(embeddings)
        if x.shape[0] < self.codebook_size:
            raise ValueError(
                f"embeddings: fewer items ({x.shape[0]}) than codewords per level "
                f"(codebook_size={self.codebook_size})"
            )
        self.quantizer.fit(x, progress=progress)
        self.codes = None  # fitted catalog is assigned against an empty registry
        semantic = np.asarray(self.quantizer.encode(x), dtype=np.int64)
        self.codes = self._make_unique(x, semantic)
        self._report = self._health(x, semantic)
        return self

    def encode(self, embeddings, avoid_fitted: bool = True, avoid=None) -> np.ndarray:
        """Unique concept IDs (N, id_length) for a catalog, reusing the fitted codebooks.

        Used for a new domain (zero-shot). With ``avoid_fitted`` (default), new items never
        take an ID that an item of the fitted catalog already has, so the two catalogs can
        share one trie. ``avoid``: more (M, id_length) IDs already in use that the new items must
        not take either (a living catalog's items, when new ones are added to it).
        """
        x = _as_numpy_embeddings(embeddings)
        registry = []
        if avoid is not None:
            avoid = np.asarray(avoid, dtype=np.int64)
            _check_codes(avoid, self.id_length, self.codebook_size, "avoid")
            registry.append(avoid)
        return self._encode(x, avoid_fitted, registry)[1]

    def _encode(self, x: np.ndarray, avoid_fitted: bool, extra=()) -> tuple[np.ndarray, np.ndarray]:
        """(semantic IDs before de-duplication, unique IDs) of a catalog's embeddings."""
        self._check_fitted()
        semantic = np.asarray(self.quantizer.encode(x), dtype=np.int64)
        used = ([self.codes] if avoid_fitted else []) + list(extra)
        registry = np.concatenate(used) if used else None
        return semantic, self._make_unique(x, semantic, registry=registry)

    def for_catalog(self, embeddings) -> "ItemTokenizer":
        """A tokenizer of another catalog (a new domain) on these codebooks: same vocabulary and
        concept content, IDs from :meth:`encode` (unique, never an ID of this catalog's items)
        and a health report of the new catalog. This one is left unchanged."""
        x = _as_numpy_embeddings(embeddings)
        semantic, codes = self._encode(x, avoid_fitted=True)
        new = copy.copy(self)
        new.codes = codes
        new._report = new._health(x, semantic)
        return new

    def decode(self, codes) -> np.ndarray:
        """Reconstructed embeddings of (N, id_length) concept IDs (disambiguation level ignored)."""
        self._check_fitted()
        codes = np.asarray(codes, dtype=np.int64)
        _check_codes(codes, self.id_length, self.codebook_size, "codes")
        return np.asarray(self.quantizer.decode(np.ascontiguousarray(codes[:, : self.levels])))

    def tokens(self, codes) -> np.ndarray:
        """Token ids (N, id_length) of concept IDs."""
        return self.vocab.to_tokens(np.asarray(codes, dtype=np.int64))

    # -- uniqueness -----------------------------------------------------------------------------
    def _distance_to_reconstruction(self, x: np.ndarray, semantic: np.ndarray) -> np.ndarray:
        x_hat = np.asarray(self.quantizer.decode(semantic), dtype=np.float64)
        return ((x.astype(np.float64) - x_hat) ** 2).sum(1)

    def _make_unique(self, x, semantic, registry: np.ndarray | None = None) -> np.ndarray:
        if self.dedup == "none":
            return semantic
        dist = self._distance_to_reconstruction(x, semantic)
        if self.dedup == "extra_level":
            return self._extra_level(semantic, dist, registry)
        return self._reassign(x, semantic, dist, registry)

    def _extra_level(self, semantic, dist, registry) -> np.ndarray:
        k = self.codebook_size
        group, rank = _group_rank(semantic, dist)
        extra = rank.copy()
        if registry is not None and len(registry):
            registry = _rows_sharing_prefix(registry, semantic, semantic.shape[1])
        if registry is not None and len(registry):
            # Codes the registry already uses under each semantic tuple: skip them.
            used: dict[tuple, set] = {}
            for row in registry:
                used.setdefault(tuple(row[:-1]), set()).add(int(row[-1]))
            hit = np.flatnonzero([tuple(r) in used for r in semantic])
            by_group: dict[int, list[int]] = {}
            for i in hit[np.lexsort((hit, rank[hit]))]:
                by_group.setdefault(int(group[i]), []).append(int(i))
            for members in by_group.values():
                taken = used[tuple(semantic[members[0]])]
                free = (c for c in range(k) if c not in taken)
                for i in members:
                    extra[i] = next(free, k)
        if len(extra) and extra.max() >= k:
            worst = semantic[int(np.argmax(extra))]
            raise ValueError(
                f"more than codebook_size={k} items share the concept prefix {worst.tolist()}: "
                "the disambiguation level cannot number them. Use more levels or a larger "
                "codebook_size."
            )
        return np.concatenate([semantic, extra[:, None]], axis=1)

    def _reassign(self, x, semantic, dist, registry) -> np.ndarray:
        k = self.codebook_size
        cb = np.asarray(self.quantizer.codebooks, dtype=np.float64)
        codes = semantic.copy()
        _, rank = _group_rank(semantic, dist)
        if registry is not None and len(registry):  # only rows under the new items' prefixes matter
            registry = _rows_sharing_prefix(registry, semantic, self.levels - 1)
        # Codes taken under each (L-1)-prefix, by the registry and by items that keep their code.
        taken: dict[tuple, set] = {}
        rows = [codes[rank == 0]] + ([registry] if registry is not None and len(registry) else [])
        for r in np.concatenate(rows):
            taken.setdefault(tuple(r[:-1]), set()).add(int(r[-1]))
        movers = np.flatnonzero(rank > 0)
        if registry is not None and len(registry):
            reg = {tuple(r) for r in registry}
            movers = np.union1d(movers, [i for i in range(len(codes)) if tuple(codes[i]) in reg])
        if len(movers) == 0:
            return codes
        prefix_sum = np.zeros((len(movers), x.shape[1]))
        for lvl in range(self.levels - 1):
            prefix_sum += cb[lvl][codes[movers, lvl]]
        residual = x[movers].astype(np.float64) - prefix_sum
        d_last = ((residual[:, None, :] - cb[-1][None]) ** 2).sum(-1)  # (movers, K)
        for j in np.argsort(d_last.min(1), kind="stable"):
            i = movers[j]
            used = taken.setdefault(tuple(codes[i, :-1]), set())
            for c in np.argsort(d_last[j], kind="stable"):
                if int(c) not in used:
                    codes[i, -1] = c
                    used.add(int(c))
                    break
            else:
                raise ValueError(
                    f"all {k} last-level codes under prefix {codes[i, :-1].tolist()} are taken: "
                    "reassignment cannot make IDs unique. Use dedup='extra_level'."
                )
        return codes

    # -- health ---------------------------------------------------------------------------------
    def _health(self, x: np.ndarray, semantic: np.ndarray) -> dict:
        k = self.codebook_size
        per_level = []
        for lvl in range(self.levels):
            counts = np.bincount(semantic[:, lvl], minlength=k)
            p = counts[counts > 0] / counts.sum()
            per_level.append({
                "level": lvl,
                "usage": float((counts > 0).mean()),
                "perplexity": float(np.exp(-(p * np.log(p)).sum())),
            })
        _, inverse, counts = np.unique(semantic, axis=0, return_inverse=True, return_counts=True)
        colliding = counts[inverse.reshape(-1)] > 1
        x64 = x.astype(np.float64)
        x_hat = np.asarray(self.quantizer.decode(semantic), dtype=np.float64)
        rel = float(((x64 - x_hat) ** 2).sum() / max(((x64 - x64.mean(0)) ** 2).sum(), 1e-300))
        return {
            "num_items": int(len(semantic)),
            "levels": self.levels,
            "codebook_size": k,
            "id_length": self.id_length,
            "dedup": self.dedup,
            "per_level": per_level,
            "collision_rate": float(colliding.mean()),
            "colliding_groups": int((counts > 1).sum()),
            "max_items_per_tuple": int(counts.max()),
            "relative_reconstruction_error": rel,
            "unique_after_dedup": bool(len(np.unique(self.codes, axis=0)) == len(self.codes)),
        }

    def report(self) -> dict:
        """Codebook usage and perplexity per level, collision rate before de-duplication,
        relative reconstruction error ``||x - x_hat||^2 / ||x - mean||^2``."""
        self._check_fitted()
        return self._report

    def _check_fitted(self) -> None:
        if self.codes is None:
            raise RuntimeError("ItemTokenizer is not fitted: call .fit(embeddings) first")

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer to directory ``path`` atomically (all files or none). A non-empty
        ``path`` that is not a tokenizer folder is refused (nothing of the user's is deleted); files
        of an existing tokenizer folder that the tokenizer does not write are kept."""
        self._check_fitted()
        from safetensors.numpy import save_file

        with atomic_dir(path, marker="tokenizer.json") as tmp:
            self.quantizer.save(tmp / "quantizer.safetensors")
            save_file({"codes": np.ascontiguousarray(self.codes)}, str(tmp / "codes.safetensors"))
            meta = {"format_version": _FORMAT_VERSION, "levels": self.levels,
                    "codebook_size": self.codebook_size, "method": self.method,
                    "dedup": self.dedup, "seed": self.seed, "report": self._report}
            (tmp / "tokenizer.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ItemTokenizer":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(path)
        meta_file = path / "tokenizer.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"path: no tokenizer.json in {path}")
        try:
            meta = json.loads(meta_file.read_text())
            version = meta["format_version"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"path: {meta_file} is corrupt ({exc})") from exc
        if version != _FORMAT_VERSION:
            raise ValueError(f"path: tokenizer format {version} is not supported "
                             f"(this recbase reads {_FORMAT_VERSION})")
        tok = cls.__new__(cls)
        tok.levels, tok.codebook_size = int(meta["levels"]), int(meta["codebook_size"])
        tok.method, tok.dedup, tok.seed = meta["method"], meta["dedup"], meta["seed"]
        tok.quantizer = ResidualQuantizer.load(path / "quantizer.safetensors")
        try:
            tok.codes = load_file(str(path / "codes.safetensors"))["codes"]
        except (SafetensorError, KeyError, OSError) as exc:
            raise ValueError(f"path: {path / 'codes.safetensors'} is corrupt ({exc})") from exc
        _check_codes(tok.codes, tok.id_length, tok.codebook_size, "codes.safetensors")
        if tok.quantizer.levels != tok.levels or tok.quantizer.codebook_size != tok.codebook_size:
            raise ValueError(f"path: quantizer in {path} does not match tokenizer.json")
        tok._report = meta.get("report")
        return tok

