"""``recbase.info()``: what this installation can do."""
from __future__ import annotations

import os


def info() -> dict:
    """Return version, native-core features, GPU and Triton availability, thread count.

    >>> import recbase
    >>> sorted(recbase.info())[:3]
    ['cuda_available', 'cuda_compiled', 'device_name']
    """
    import torch

    from recbase import __version__
    from recbase._native import C

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional on CPU-only machines
        triton_version = None
    cuda_available = torch.cuda.is_available()
    return {
        "version": __version__,
        "cuda_compiled": bool(C.cuda_compiled),
        "cuda_available": cuda_available,
        "device_name": torch.cuda.get_device_name(0) if cuda_available else None,
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "openmp": bool(C.openmp),
        # the RQ kernels' instruction set, chosen at run time from this CPU (one build for all)
        "cpu_isa": str(C.rq_isa()),
        "threads": int(C.max_threads()),
        "torch": torch.__version__,
    }
