"""Triton kernels over concept-ID sequences (installed as ``recbase.kernels``).

One file per op: the Triton kernel, its autograd Function and one public function.
Importing this package never requires Triton; each op module checks for it.
"""

import importlib as _importlib

# public function -> module (imported on first use, so Triton stays optional)
_EXPORTS = {
    "concept_attention_triton": "concept_attention",
    "concept_embedding_triton": "concept_embedding",
    "level_cross_entropy_triton": "level_cross_entropy",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
