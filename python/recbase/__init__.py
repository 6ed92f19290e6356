"""recbase: generative, zero-shot recommendation with concept IDs.

Data flow: item text -> embeddings (``recbase.data``) -> concept IDs (``ResidualQuantizer``,
``ItemTokenizer``) -> sequences -> model (``RecBaseForCausalLM``) -> constrained decoding
(``ConceptTrie``, ``beam_search``) -> metrics (``recbase.evaluate``).

Public names are imported lazily so ``import recbase`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "info": "recbase._info",
    "ResidualQuantizer": "recbase.quantize",
    "ItemTokenizer": "recbase.tokenizer",
    "ConceptVocab": "recbase.tokenizer",
    "centre_embeddings": "recbase.tokenizer",
    "ConceptTrie": "recbase.trie",
    "beam_search": "recbase.search",
    "ConceptTrieLogitsProcessor": "recbase.search",
    "RecBaseConfig": "recbase.model",
    "RecBaseForCausalLM": "recbase.model",
    "Recommender": "recbase.recommend",
    "lora_model": "recbase.finetune",
}
_SUBMODULES = {"ops", "datasets", "data", "evaluate", "baselines", "train", "model", "kernels",
               "finetune", "masking", "bundle"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"recbase.{name}")
    else:
        raise AttributeError(f"module 'recbase' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
