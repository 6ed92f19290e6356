"""Unified item text ("feature mapping"): any domain's attributes -> one text format.

RecBase writes every item of every domain in the same shape so that one text encoder places
items of all domains in one space::

    Describe a movie: {"Title": "Toy Story", "Year": 1995, "Genres": "Animation, Comedy"}
    Describe a book: {"Title": "Clara Callan", "Author": "Richard Bruce Wright", "Year": 2001, ...}

Values are JSON-encoded (strings quoted and escaped, integers bare, lists as JSON arrays);
missing values (None, NaN, pd.NA, empty/blank strings, empty lists) are omitted by default,
or written as a placeholder (``missing="unknown"``).

Example:
    >>> t = ItemTemplate("movie", {"Title": "title", "Year": "year"})
    >>> t.render({"title": "Heat", "year": 1995})
    'Describe a movie: {"Title": "Heat", "Year": 1995}'
    >>> t.render({"title": "Heat", "year": None})
    'Describe a movie: {"Title": "Heat"}'
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["ItemTemplate", "MOVIE_TEMPLATE", "BOOK_TEMPLATE", "ARTICLE_TEMPLATE", "TEMPLATES", "template_for",
           "render_items"]


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, np.floating) and np.isnan(value):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) == 0:
        return True
    return False


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return int(f) if f.is_integer() else f  # 1995.0 (a float column with NaNs) -> 1995
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value if not _is_missing(v)]
    return str(value)


@dataclass(frozen=True)
class ItemTemplate:
    """``Describe a {domain_noun}: {"Field": value, ...}``.

    Args:
        domain_noun: the noun after "Describe a" ("movie", "book", "game"). "a"/"an" is
            chosen from its first letter.
        fields: display name -> column name (a mapping), or a list of column names (the
            display name is the column name in Title Case, "_" -> " ").
        missing: None (default) omits missing values; a string is written in their place.
    """

    domain_noun: str
    fields: Mapping[str, str] | Sequence[str]
    missing: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.domain_noun, str) or not self.domain_noun.strip():
            raise ValueError(f"ItemTemplate: domain_noun must be a non-empty str, got {self.domain_noun!r}")
        if isinstance(self.fields, str) or not isinstance(self.fields, (Mapping, Sequence)):
            raise TypeError("ItemTemplate: fields must be a mapping {display name: column} or a "
                            f"list of column names, got {type(self.fields).__name__}")
        if isinstance(self.fields, Mapping):
            pairs = tuple((str(k), str(v)) for k, v in self.fields.items())
        else:
            pairs = tuple((str(c).replace("_", " ").title(), str(c)) for c in self.fields)
        if not pairs:
            raise ValueError("ItemTemplate: fields is empty; give at least one column")
        object.__setattr__(self, "_pairs", pairs)

    @property
    def columns(self) -> list[str]:
        return [c for _, c in self._pairs]  # type: ignore[attr-defined]

    @property
    def prefix(self) -> str:
        noun = self.domain_noun.strip()
        article = "an" if noun[0].lower() in "aeiou" else "a"
        return f"Describe {article} {noun}: "

    def render(self, record: Mapping[str, Any]) -> str:
        """Text of one item; ``record`` maps column names to values (dict, pandas row)."""
        body = {}
        for display, col in self._pairs:  # type: ignore[attr-defined]
            value = record[col] if col in record else None
            if _is_missing(value):
                if self.missing is None:
                    continue
                body[display] = self.missing
            else:
                body[display] = _jsonable(value)
        return self.prefix + json.dumps(body, ensure_ascii=False)

    def render_frame(self, items: pd.DataFrame) -> list[str]:
        """Texts of all rows of ``items`` (columns absent from the frame are missing)."""
        if not isinstance(items, pd.DataFrame):
            raise TypeError(f"render_frame: items must be a DataFrame, got {type(items).__name__}")
        present = [c for c in self.columns if c in items.columns]
        if not present:
            raise ValueError(f"render_frame: items has none of the template columns {self.columns}; "
                             f"it has {list(items.columns)}")
        records = items[present].to_dict("records")
        return [self.render(r) for r in records]


MOVIE_TEMPLATE = ItemTemplate("movie", {"Title": "title", "Year": "year", "Genres": "genres"})
BOOK_TEMPLATE = ItemTemplate("book", {"Title": "title", "Author": "author", "Year": "year",
                                      "Publisher": "publisher"})
ARTICLE_TEMPLATE = ItemTemplate("article", {"Title": "title", "Description": "description"})
TEMPLATES: dict[str, ItemTemplate] = {"movies": MOVIE_TEMPLATE, "books": BOOK_TEMPLATE,
                                      "articles": ARTICLE_TEMPLATE}


def template_for(domain: str) -> ItemTemplate:
    """Built-in template of a domain ("movies", "books", "articles")."""
    if domain not in TEMPLATES:
        raise ValueError(f"template_for: no built-in template for domain {domain!r} (have "
                         f"{sorted(TEMPLATES)}); declare one with ItemTemplate(noun, fields)")
    return TEMPLATES[domain]


def render_items(items: pd.DataFrame, template: ItemTemplate | str) -> list[str]:
    """Texts of a catalog, with a template or a built-in domain name."""
    if isinstance(template, str):
        template = template_for(template)
    return template.render_frame(items)
