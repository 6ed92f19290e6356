"""Shared bench plumbing: a per-session results table printed at the end of the run."""
from __future__ import annotations

import pytest


def pytest_configure(config):
    config._recbase_bench_rows = []  # list of dicts appended by the bench modules


@pytest.fixture(scope="session")
def bench_rows(request):
    return request.config._recbase_bench_rows


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = getattr(config, "_recbase_bench_rows", [])
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = {k: (lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)) for k in cols}
    cells = [[fmt[k](r.get(k, "")) for k in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    tr = terminalreporter
    tr.section("recbase bench summary (ratios are measured in this run)")
    tr.write_line("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        tr.write_line("  ".join(c.ljust(w) for c, w in zip(row, widths)))
