"""Data utilities: item text templates, text encoder, splits and sequences."""

from .text import BOOK_TEMPLATE, MOVIE_TEMPLATE, ItemTemplate, render_items, template_for
from .splits import LeaveOneOutSplit, holdout_last, leave_one_out
from .sequences import ItemIndex, user_sequences, truncate_histories

__all__ = ["ItemTemplate", "MOVIE_TEMPLATE", "BOOK_TEMPLATE", "render_items", "template_for",
           "LeaveOneOutSplit", "leave_one_out", "holdout_last", "ItemIndex", "user_sequences",
           "truncate_histories", "TextEncoder"]


def __getattr__(name):  # TextEncoder pulls in transformers: load it lazily
    if name == "TextEncoder":
        from .encoder import TextEncoder
        return TextEncoder
    raise AttributeError(name)
