import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from recbase.data.text import BOOK_TEMPLATE, MOVIE_TEMPLATE, ItemTemplate, render_items, template_for


def _parse(text, prefix):
    assert text.startswith(prefix)
    return json.loads(text[len(prefix):])


def test_movie_template_exact():
    t = MOVIE_TEMPLATE.render({"title": "Toy Story", "year": 1995, "genres": "Animation, Comedy"})
    assert t == 'Describe a movie: {"Title": "Toy Story", "Year": 1995, "Genres": "Animation, Comedy"}'


def test_book_template_missing_values_omitted_and_placeholder():
    rec = {"title": "Clara Callan", "author": None, "year": float("nan"), "publisher": "  "}
    assert BOOK_TEMPLATE.render(rec) == 'Describe a book: {"Title": "Clara Callan"}'
    t = ItemTemplate("book", {"Title": "title", "Author": "author"}, missing="unknown")
    assert t.render(rec) == 'Describe a book: {"Title": "Clara Callan", "Author": "unknown"}'


def test_article_and_list_fields():
    t = ItemTemplate("app", ["app_name", "tags"])
    assert t.render({"app_name": "X", "tags": ["a", None, "b"]}) == \
        'Describe an app: {"App Name": "X", "Tags": ["a", "b"]}'


def test_render_frame_with_nullable_dtypes():
    df = pd.DataFrame({"item_id": ["1", "2"], "title": ["A \"quoted\"", "B"],
                       "year": pd.array([1999, None], dtype="Int64"), "genres": ["Drama", None]})
    texts = render_items(df, "movies")
    assert _parse(texts[0], "Describe a movie: ") == {"Title": 'A "quoted"', "Year": 1999, "Genres": "Drama"}
    assert _parse(texts[1], "Describe a movie: ") == {"Title": "B"}


def test_float_year_renders_as_int():
    assert MOVIE_TEMPLATE.render({"title": "A", "year": np.float64(2001.0)}) == \
        'Describe a movie: {"Title": "A", "Year": 2001}'


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["title", "author", "year", "publisher"]),
                       st.one_of(st.none(), st.text(max_size=20), st.integers(-5000, 5000)), max_size=4))
def test_render_is_valid_json_with_exactly_present_fields(rec):
    body = _parse(BOOK_TEMPLATE.render(rec), "Describe a book: ")
    names = {"title": "Title", "author": "Author", "year": "Year", "publisher": "Publisher"}
    expected = {names[k]: (v.strip() if isinstance(v, str) else v) for k, v in rec.items()
                if v is not None and not (isinstance(v, str) and not v.strip())}
    assert body == expected
    assert list(body) == [n for n in names.values() if n in body]  # template order


def test_errors():
    with pytest.raises(ValueError, match="domain_noun"):
        ItemTemplate("", ["title"])
    with pytest.raises(TypeError, match="fields"):
        ItemTemplate("movie", "title")
    with pytest.raises(ValueError, match="fields is empty"):
        ItemTemplate("movie", [])
    with pytest.raises(ValueError, match="no built-in template for domain 'games'"):
        template_for("games")
    with pytest.raises(ValueError, match="none of the template columns"):
        MOVIE_TEMPLATE.render_frame(pd.DataFrame({"x": [1]}))



@pytest.mark.parametrize("module", ['recbase.data.text'])
def test_docstring_examples(module):
    import doctest
    import importlib
    res = doctest.testmod(importlib.import_module(module))
    assert res.failed == 0 and res.attempted > 0
