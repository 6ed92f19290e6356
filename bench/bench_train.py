"""One pretraining step of a demo-sized model (hidden 128, 2 layers, 4-token items, 384-d concept
content, 2,048-token batches of 81-token sequences; the demo itself now uses 3-token IDs), in four
modes measured side by side:

* ``plain``: a step that reads concepts by free row + content;
* ``rotated``: a content-only step under a fresh Haar rotation (``content_rotation_rate = 1``);
* ``rotated, numpy QR`` (the anchor): the same step with the rotation drawn by ``numpy.linalg.qr``,
  as before 2026-12-02. numpy's BLAS threads keep spinning after the call and take the cores from
  the step that follows; the ratio column shows what drawing it with torch saves.
* ``rotated, turned vectors + AdamW per tensor`` (second anchor): the rotated step as of
  commit becaed4 (2026-12-02): the [L*K, d] content vectors turned instead of the [H, d] projection, and
  AdamW updating one parameter at a time instead of fused (the clipping and target counting of
  this version stay, so the second ratio slightly understates the whole change).

    python -m pytest bench/bench_train.py -q -s
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import recbase.train as train_mod
from recbase.model import RecBaseConfig, RecBaseForCausalLM, modeling
from recbase.model.config import NUM_SPECIAL_TOKENS
from recbase.train import Trainer, TrainConfig

LEVELS, K, HIDDEN, VEC, ITEMS, BATCH = 4, 256, 128, 384, 20, 2048
ROUNDS = 20
_TIMES: dict = {}


def _numpy_rotation(dim: int, rng: np.random.Generator) -> torch.Tensor:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return torch.as_tensor(q * np.sign(np.diag(r)), dtype=torch.float32)


def _trainer(rate: float) -> Trainer:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = RecBaseConfig.from_preset("small", levels=LEVELS, codebook_size=K, max_items=ITEMS,
                                    hidden_size=HIDDEN, intermediate_size=3 * HIDDEN,
                                    num_hidden_layers=2, concept_vector_dim=VEC)
    model = RecBaseForCausalLM(cfg)
    model.set_concept_vectors(rng.standard_normal((LEVELS - 1, K, VEC)).astype(np.float32))
    # BOS + 20 items of 4 concept tokens (token of level l code c = specials + l*K + c)
    seqs = [np.r_[1, (NUM_SPECIAL_TOKENS + np.arange(LEVELS) * K + rng.integers(0, K, (ITEMS, LEVELS))).reshape(-1)]
            for _ in range(8 * BATCH // (ITEMS * LEVELS + 1))]
    return Trainer(model, seqs, seqs[:4], TrainConfig(tokens_per_batch=BATCH, content_rotation_rate=rate,
                                                    progress=False))


def _turned_vectors(free, project, vectors, mode):
    if mode is None:
        return free + project(vectors)
    return project(vectors if mode[0] is None else vectors @ mode[0]) + 0.0 * free


ANCHOR, ANCHOR_2 = "rotated, numpy QR", "rotated, turned vectors + AdamW per tensor"


@pytest.mark.parametrize("mode", [ANCHOR, ANCHOR_2, "rotated", "plain"])
def test_pretraining_step(benchmark, bench_rows, monkeypatch, mode):
    if mode == ANCHOR:
        monkeypatch.setattr(train_mod, "random_rotation", _numpy_rotation)
    if mode == ANCHOR_2:
        monkeypatch.setattr(modeling, "_with_content", _turned_vectors)
    trainer = _trainer(0.0 if mode == "plain" else 1.0)
    if mode == ANCHOR_2:
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in trainer.opt.param_groups]
        trainer.opt = torch.optim.AdamW(groups, lr=trainer.cfg.lr, foreach=False)
    batches = train_mod.pack_batches([len(s) for s in trainer.train_seqs], BATCH, 0, 0)
    step = iter(range(10**9))

    def fn():
        return trainer.train_step(batches[next(step) % len(batches)])

    for _ in range(3):  # warm-up
        fn()
    loss = benchmark.pedantic(fn, rounds=ROUNDS, iterations=1)
    assert np.isfinite(loss)
    t = benchmark.stats.stats.median
    _TIMES[mode] = t
    row = {"bench": f"pretraining step, {BATCH} tokens", "mode": mode, "ms": t * 1e3,
           "threads": torch.get_num_threads()}
    if mode == "rotated":
        for name, key in ((ANCHOR, "x anchor"), (ANCHOR_2, "x anchor 2")):
            if name in _TIMES:
                row[key] = _TIMES[name] / t
    benchmark.extra_info.update(row)
    bench_rows.append(row)
