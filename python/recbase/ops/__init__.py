"""Low-level ops: one dispatch point per op, each choosing the PyTorch reference, the C++ CPU
engine, the CUDA kernel or the Triton kernel by device. Every op is also registered with
``torch.library`` (namespace ``recbase``) so it works under ``torch.compile``.

Each op family lives in its own module; this package re-exports them.
"""
from __future__ import annotations

import importlib

_MODULES = ("recbase.ops.rq", "recbase.ops.beam", "recbase.ops.attention")


def __getattr__(name: str):
    for mod in _MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                continue
            raise
        if name in getattr(m, "__all__", ()):
            value = getattr(m, name)
            globals()[name] = value
            return value
    raise AttributeError(f"recbase.ops has no op {name!r}")
