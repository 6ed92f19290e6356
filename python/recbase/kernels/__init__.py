"""Triton kernels over concept-ID sequences (installed as ``recbase.kernels``).

One file per op: the Triton kernel, its autograd Function and one public function. The op files
live in the repository's top-level ``kernels/`` folder, which the wheel installs here. That folder
has no ``__init__.py`` on purpose: a regular package named ``kernels`` at the repository root would
shadow the PyPI ``kernels`` package that transformers imports, whenever Python runs from the root.
Importing this package never requires Triton; each op module checks for it.
"""

import importlib as _importlib
import os as _os

# A source checkout (PYTHONPATH=python): find the op files in <root>/kernels.
_root = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "kernels")):
    __path__.append(_os.path.join(_root, "kernels"))

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
