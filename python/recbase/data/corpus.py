"""A pretraining corpus: several domains, each a built-in dataset or the user's own files.

A corpus is a TOML file (or the same as :class:`Corpus` in Python)::

    [mixing]
    alpha = 0.5          # sampling exponent: 1 = by size, 0 = every domain equally (below)
    seed = 0

    [[domain]]
    name = "movies"
    dataset = "ml-1m"    # built-in: ml-1m, ml-100k, book-crossing, ibm-articles
    kcore = 5

    [[domain]]
    name = "shop"
    items = "shop/items.csv"               # CSV / TSV / Parquet, relative to the TOML file
    interactions = "shop/interactions.csv" # user_id, item_id[, timestamp][, rating]
    template = { noun = "product", fields = { Title = "title", Brand = "brand" } }
    kcore = 5
    min_rating = 4       # optional: keep ratings >= 4 (then implicit)
    weight = 2.0         # optional sampling weight (default 1)
    ordered = true       # optional: false when the histories have no order (read as sets)

**Mixing** follows multilingual language models (XLM, mT5): a domain with ``n_i`` training
sequences and weight ``w_i`` is drawn with probability ``q_i ∝ (w_i n_i)^alpha``; an epoch holds as
many sequences as the corpus (``sum_i n_i``), ``round(q_i * sum n)`` of them from domain ``i`` --
sampled without replacement where that is fewer than it has, every sequence plus repeats where
more (seeded). ``alpha < 1`` lifts small domains so one large domain does not drown them.

Everything is checked before any work starts (:func:`load_corpus`): TOML syntax (with the line),
unknown keys, unknown dataset names, missing files, duplicate domain names, weights <= 0, template
fields that are not columns of the item file.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["CorpusDomain", "Corpus", "load_corpus", "mixing_counts", "mix_sequences"]

_DOMAIN_KEYS = {"name", "dataset", "items", "interactions", "template", "kcore", "min_rating", "weight",
                "ordered"}
_MIXING_KEYS = {"alpha", "seed"}


class CorpusError(ValueError):
    """A corpus file or object that cannot be used (the message names the file and the entry)."""


@dataclass
class CorpusDomain:
    """One domain of a corpus: a built-in ``dataset`` or the user's ``items`` + ``interactions``
    files; ``template``: {"noun": ..., "fields": {display: column}} (built-in datasets and the
    domains movies/books/articles have one already)."""

    name: str
    dataset: str | None = None
    items: str | None = None
    interactions: str | None = None
    template: dict | None = None
    kcore: int = 5
    min_rating: float | None = None
    weight: float = 1.0
    ordered: bool | None = None  # None: the dataset's own (Book-Crossing has no order), else True

    def load(self):
        """The domain's :class:`recbase.datasets.Dataset` (k-core and rating filter applied)."""
        from recbase import datasets

        try:
            if self.dataset is not None:
                ds = datasets.load(self.dataset)
                ds.domain = self.name
            else:
                ds = datasets.from_files(self.items, self.interactions, domain=self.name)
            if self.min_rating is not None or self.dataset == "book-crossing":
                ds = ds.to_implicit(self.min_rating)
            return ds.kcore(self.kcore, self.kcore) if self.kcore else ds
        except ValueError as exc:  # say which domain
            raise CorpusError(f"domain {self.name!r}: {exc}") from exc

    def item_template(self):
        """The text template of this domain's items."""
        from recbase import datasets
        from recbase.data.text import ItemTemplate, template_for

        if self.template is not None:
            return ItemTemplate(self.template["noun"], self.template["fields"])
        if self.dataset is not None:
            return template_for(datasets.DATASETS[self.dataset].domain)
        return template_for(self.name)

    @property
    def is_ordered(self) -> bool:
        if self.ordered is not None:
            return bool(self.ordered)
        return self.dataset != "book-crossing"  # its order is a seeded permutation (datasets.load)


@dataclass
class Corpus:
    """Domains plus the mixing of their sequences (module docstring)."""

    domains: list[CorpusDomain]
    alpha: float = 0.5
    seed: int = 0
    source: str = "<python>"  # where it was read from, for messages

    def __post_init__(self) -> None:
        validate(self)

    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    def domain(self, name: str) -> CorpusDomain:
        for d in self.domains:
            if d.name == name:
                return d
        raise CorpusError(f"{self.source}: no domain {name!r}; the corpus has {self.names()}")


def _fail(where: str, msg: str):
    raise CorpusError(f"{where}: {msg}")


def _columns(path: Path) -> list[str]:
    """Column names of a CSV/TSV/Parquet file without reading it whole."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    return list(pd.read_csv(path, nrows=0, sep="\t" if suffix in (".tsv", ".tab") else ",").columns)


def validate(corpus: Corpus) -> None:
    """Every check of the module docstring; raises :class:`CorpusError` naming the entry."""
    from recbase import datasets

    src = corpus.source
    if not isinstance(corpus.domains, list) or not corpus.domains:
        _fail(src, "the corpus has no [[domain]] entry; list at least one")
    if isinstance(corpus.alpha, bool) or not isinstance(corpus.alpha, (int, float)) or not 0 <= corpus.alpha <= 1:
        _fail(src, f"[mixing] alpha must be a number in [0, 1], got {corpus.alpha!r}")
    if isinstance(corpus.seed, bool) or not isinstance(corpus.seed, int):
        _fail(src, f"[mixing] seed must be an int, got {corpus.seed!r}")
    seen: set[str] = set()
    for i, d in enumerate(corpus.domains):
        where = f"{src}: domain #{i + 1}" + (f" ({d.name!r})" if isinstance(d.name, str) else "")
        if not isinstance(d.name, str) or not d.name.strip():
            raise CorpusError(f"{where}: name must be a non-empty string, got {d.name!r}")
        if d.name in seen:
            raise CorpusError(f"{where}: duplicate domain name {d.name!r}; each domain needs its own name")
        seen.add(d.name)
        if isinstance(d.weight, bool) or not isinstance(d.weight, (int, float)) or not d.weight > 0 \
                or not math.isfinite(d.weight):
            raise CorpusError(f"{where}: weight must be a number > 0, got {d.weight!r}")
        if isinstance(d.kcore, bool) or not isinstance(d.kcore, int) or d.kcore < 0:
            raise CorpusError(f"{where}: kcore must be an int >= 0, got {d.kcore!r}")
        if d.min_rating is not None and (isinstance(d.min_rating, bool) or not isinstance(d.min_rating, (int, float))):
            raise CorpusError(f"{where}: min_rating must be a number, got {d.min_rating!r}")
        if d.ordered is not None and not isinstance(d.ordered, bool):
            raise CorpusError(f"{where}: ordered must be true or false, got {d.ordered!r}")
        if (d.dataset is None) == (d.items is None and d.interactions is None):
            raise CorpusError(f"{where}: give either dataset = \"<name>\" or both items and interactions files")
        if d.dataset is not None:
            if d.dataset not in datasets.DATASETS:
                raise CorpusError(f"{where}: unknown dataset {d.dataset!r}; built-in: {sorted(datasets.DATASETS)}")
            columns = None
        else:
            for key in ("items", "interactions"):
                value = getattr(d, key)
                if value is None:
                    raise CorpusError(f"{where}: {key} is missing (a file of your own needs both items and "
                                      "interactions)")
                if not Path(value).is_file():
                    raise CorpusError(f"{where}: {key} file {str(value)!r} does not exist")
                if Path(value).suffix.lower() not in (".csv", ".tsv", ".tab", ".parquet", ".pq"):
                    raise CorpusError(f"{where}: {key} must be a .csv, .tsv or .parquet file, got {str(value)!r}")
            try:
                columns = _columns(Path(d.items))
                inter_cols = _columns(Path(d.interactions))
            except Exception as exc:  # unreadable: say which file
                raise CorpusError(f"{where}: cannot read the header of {d.items!r} / {d.interactions!r} ({exc})") from exc
            if "item_id" not in columns:
                raise CorpusError(f"{where}: items file {d.items!r} has no item_id column (has {columns})")
            missing = [c for c in ("user_id", "item_id") if c not in inter_cols]
            if missing:
                raise CorpusError(f"{where}: interactions file {d.interactions!r} lacks column(s) {missing} "
                                  f"(has {inter_cols})")
        if d.template is not None:
            t = d.template
            if not isinstance(t, dict) or set(t) - {"noun", "fields"} or not isinstance(t.get("noun"), str) \
                    or not isinstance(t.get("fields"), dict) or not t["fields"]:
                raise CorpusError(f"{where}: template must be {{ noun = \"...\", fields = {{ Display = \"column\" }} }}, "
                                  f"got {t!r}")
            if columns is not None:
                absent = [c for c in t["fields"].values() if c not in columns]
                if absent:
                    raise CorpusError(f"{where}: template field(s) {absent} are not columns of {d.items!r} "
                                      f"(it has {columns})")
        elif d.dataset is None:
            from recbase.data.text import TEMPLATES

            if d.name not in TEMPLATES:
                raise CorpusError(f"{where}: no built-in template for a domain named {d.name!r} "
                                  f"(built-in: {sorted(TEMPLATES)}); add template = {{ noun = ..., fields = ... }}")
            absent = [c for c in TEMPLATES[d.name].columns if c not in columns]
            if len(absent) == len(TEMPLATES[d.name].columns):
                raise CorpusError(f"{where}: {d.items!r} has none of the {d.name} template's columns "
                                  f"{TEMPLATES[d.name].columns}; add a template")


def load_corpus(path: str | os.PathLike) -> Corpus:
    """Read and check a corpus TOML file; relative file paths are relative to its folder."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"--corpus: {str(path)!r} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:  # its message carries "(at line L, column C)"
        raise CorpusError(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not UTF-8 text ({exc})") from exc
    unknown = set(raw) - {"domain", "mixing"}
    if unknown:
        raise CorpusError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected [[domain]] and [mixing]")
    mixing = raw.get("mixing", {})
    if not isinstance(mixing, dict) or set(mixing) - _MIXING_KEYS:
        raise CorpusError(f"{path}: [mixing] takes only {sorted(_MIXING_KEYS)}, got {mixing!r}")
    entries = raw.get("domain", [])
    if not isinstance(entries, list):
        raise CorpusError(f"{path}: domains are written [[domain]] (an array of tables)")
    domains = []
    for i, e in enumerate(entries):
        bad = set(e) - _DOMAIN_KEYS
        if bad:
            raise CorpusError(f"{path}: domain #{i + 1}: unknown key(s) {sorted(bad)}; expected {sorted(_DOMAIN_KEYS)}")
        e = dict(e)
        for key in ("items", "interactions"):
            if isinstance(e.get(key), str):
                e[key] = str((path.parent / e[key]).resolve()) if not Path(e[key]).is_absolute() else e[key]
        domains.append(CorpusDomain(**e))
    return Corpus(domains, alpha=mixing.get("alpha", 0.5), seed=mixing.get("seed", 0), source=str(path))


def mixing_counts(sizes: Sequence[int], weights: Sequence[float], alpha: float) -> np.ndarray:
    """Sequences per domain in one epoch: ``round(q_i * sum(sizes))``, ``q_i ∝ (w_i n_i)^alpha``."""
    sizes = np.asarray(sizes, dtype=np.float64)
    mass = (np.asarray(weights, dtype=np.float64) * sizes) ** alpha
    mass[sizes == 0] = 0.0
    q = mass / mass.sum()
    return np.rint(q * sizes.sum()).astype(np.int64)


def mix_sequences(per_domain: Sequence[Sequence[Any]], weights: Sequence[float], alpha: float,
                  seed: int) -> tuple[list, np.ndarray]:
    """The mixed training list (seeded) and the domain index of each of its sequences."""
    counts = mixing_counts([len(s) for s in per_domain], weights, alpha)
    rng = np.random.default_rng([seed, 0x6D6978])
    out, owner = [], []
    for i, (seqs, c) in enumerate(zip(per_domain, counts)):
        n = len(seqs)
        if n == 0 or c == 0:
            continue
        if c <= n:
            pick = rng.choice(n, size=c, replace=False)
        else:  # every sequence, then repeats
            pick = np.concatenate([np.arange(n)] * (c // n) + [rng.choice(n, size=c % n, replace=False)])
        out.extend(seqs[j] for j in np.sort(pick))
        owner.extend([i] * len(pick))
    return out, np.asarray(owner, dtype=np.int64)
