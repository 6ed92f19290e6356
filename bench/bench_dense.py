"""Exact dense top-N over a large catalog: the dense head's kernel-mixture score vs its anchor.

Anchor: "mean-vector" — the text-kNN way, one user vector (the mean of the history's unit
embeddings), one [B, d] x [d, N] matmul and ``torch.topk`` over the whole catalog at once.
Ours: ``recbase.model.dense.dense_top_n`` — the kernel mixture log sum_m w_m exp(cos(h_m, c)/tau)
over M history items per user, exact, in catalog blocks with a running partial sort. It does M
times the anchor's multiply-adds plus B*M*N exps, so the ratio to expect is about M (14 here).
Both are timed interleaved, round by round, in one test; the ratio is the median of the paired
ratios.

Run: python -m pytest bench/bench_dense.py -q -s   (RECBASE_BENCH_FULL=1: the 1M-item catalog)
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from recbase.model.dense import dense_top_n, unit_rows

FULL = os.environ.get("RECBASE_BENCH_FULL", "") not in ("", "0")
SIZES = [100_000, 1_000_000] if FULL else [100_000]
B, M, D, N_TOP, ROUNDS = 64, 14, 384, 60, 5


def _anchor(hist, catalog, n):
    user = unit_rows(hist.mean(1))
    return torch.topk(user @ catalog.T, n, dim=1)


@pytest.mark.parametrize("num_items", SIZES)
def test_dense_top_n_vs_mean_vector(num_items, benchmark):
    g = torch.Generator().manual_seed(0)
    catalog = unit_rows(torch.randn(num_items, D, generator=g))
    hist = unit_rows(torch.randn(B, M, D, generator=g))
    weights = torch.softmax(torch.randn(B, M, generator=g), 1)
    times = {"anchor": [], "ours": []}
    for _ in range(ROUNDS):  # interleaved: each round times both on the same inputs
        t = time.perf_counter()
        _anchor(hist, catalog, N_TOP)
        times["anchor"].append(time.perf_counter() - t)
        t = time.perf_counter()
        items, _ = dense_top_n(weights, hist, catalog, 0.13, N_TOP)
        times["ours"].append(time.perf_counter() - t)
    assert items.shape == (B, N_TOP) and bool((items >= 0).all())
    ratio = float(np.median(np.array(times["ours"]) / np.array(times["anchor"])))
    ms_user = 1e3 * float(np.median(times["ours"])) / B
    benchmark.extra_info.update(num_items=num_items, ratio_vs_mean_vector=ratio, ms_per_user=ms_user,
                                anchor_ms_per_user=1e3 * float(np.median(times["anchor"])) / B)
    print(f"\n[dense top-{N_TOP}] N={num_items:,} B={B} M={M} d={D}: {ms_user:.2f} ms/user, "
          f"x mean-vector anchor {ratio:.1f} (median of {ROUNDS} paired rounds)")
    benchmark.pedantic(dense_top_n, args=(weights, hist, catalog, 0.13, N_TOP), rounds=1, iterations=1)
