"""Loads the compiled core ``recbase._C`` with an actionable error when it is missing."""
from __future__ import annotations

try:
    from recbase import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "recbase's compiled core (recbase._C) is missing: install the package with "
        "`pip install .` (or `pip install -e . --no-build-isolation`) so CMake builds it. "
        f"Original error: {exc}"
    ) from exc

C = _C
