"""A living catalog: adding / removing items in place vs rebuilding the catalog, same run.

Anchor: "rebuild" -- what a catalog change costs without ``add_items``: encode every item's
embedding on the codebooks with unique IDs (``ItemTokenizer.encode``), and build the Recommender
(its trie and dense channel) anew. Ours: ``Recommender.add_items`` (1,000 new items: encode only
them against the catalog's IDs, rebuild the trie, append to the dense channel; the first add to a
fresh catalog also copies its embeddings once into a growth buffer) and
``Recommender.remove_items`` (1,000 items out: a trie subset and a mask).

Catalog: N items of d=384 (the packaged MiniLM's width), 3 levels x K=256 + a disambiguation
level; the codebooks are fitted on a 50k sample (fitting is not part of either path).

Run:        python -m pytest bench/bench_catalog.py --benchmark-only -s
Full size:  RECBASE_BENCH_FULL=1 ... (N = 1M; default N = 200k)
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import recbase
from recbase.recommend import Recommender

FULL = os.environ.get("RECBASE_BENCH_FULL", "") not in ("", "0")
N = 1_000_000 if FULL else 200_000
D, LEVELS, K, ADD = 384, 3, 256, 1_000


@pytest.fixture(scope="module")
def catalog():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2000, D)).astype(np.float32)  # clustered, like text embeddings
    x = centres[rng.integers(0, len(centres), N + ADD)] + 0.3 * rng.normal(size=(N + ADD, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tok = recbase.ItemTokenizer(levels=LEVELS, codebook_size=K, seed=0).fit(x[:50_000], progress=False)
    codes = tok.encode(x[:N], avoid_fitted=False)
    cfg = recbase.RecBaseConfig.from_preset("tiny", levels=tok.id_length, codebook_size=K, item_vector_dim=D)
    torch.manual_seed(0)
    model = recbase.RecBaseForCausalLM(cfg).eval()
    return tok, model, codes, x[:N], x[N:]


def _recommender(tok, model, codes, x):
    return Recommender(model, tok.vocab, {"shop": codes}, item_embeddings={"shop": x}, tokenizer=tok,
                       item_ids={"shop": [f"i{i}" for i in range(len(codes))]})


@pytest.mark.parametrize("path", ["rebuild", "add_items-first", "add_items-later"])
def test_add_1000_items(benchmark, catalog, path):
    """"first": the first add to a freshly built catalog (its embeddings are copied once into a
    growth buffer); "later": an add after an earlier one (steady state: only the new rows move)."""
    tok, model, codes, x, new = catalog
    ids = [f"new{i}" for i in range(ADD)]
    warm = ADD // 10 if path == "add_items-later" else 0
    if path == "rebuild":
        both = np.concatenate([x, new])

        def run():
            return _recommender(tok, model, tok.encode(both, avoid_fitted=False), both)
        rec = benchmark.pedantic(run, rounds=2, iterations=1)
    else:
        def setup():
            rec = _recommender(tok, model, codes[:N - warm], x[:N - warm])
            if warm:  # an earlier add: the catalog is N items when the timed one starts
                rec.add_items("shop", [f"i{i}" for i in range(N - warm, N)], x[N - warm:N])
            return (rec,), {}

        def run(rec):
            rec.add_items("shop", ids, new)
            return rec
        rec = benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    assert len(rec.codes["shop"]) == N + ADD
    assert len(np.unique(rec.codes["shop"], axis=0)) == N + ADD
    benchmark.extra_info.update(items=N, added=ADD, path=path)


def test_remove_1000_items(benchmark, catalog):
    tok, model, codes, x, _ = catalog
    gone = [f"i{i}" for i in np.random.default_rng(1).choice(N, ADD, replace=False)]

    def setup():
        return (_recommender(tok, model, codes, x),), {}
    rec = benchmark.pedantic(lambda rec: (rec.remove_items("shop", gone), rec)[1], setup=setup, rounds=3, iterations=1)
    assert rec.tries["shop"].num_items == N - ADD
    benchmark.extra_info.update(items=N, removed=ADD)
