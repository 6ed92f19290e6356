"""``recbase.datasets``: the public name of the dataset loaders, which live in
``recbase.data.datasets`` with the rest of the data stage. This module *is* that one (the same
module object), so ``recbase.datasets.load`` and ``recbase.data.datasets.load`` are one function."""
import sys

from recbase.data import datasets as _datasets

sys.modules[__name__] = _datasets
