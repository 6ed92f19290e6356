"""One pretraining step of a demo-sized model (hidden 128, 2 layers, 4-token items, 384-d concept
content, 2,048-token batches of 81-token sequences; the demo itself now uses 3-token IDs):

* ``plain``: a step that reads concepts by free row + content;
* ``rotated``: a content-only step under a fresh Haar rotation (``content_rotation_rate = 1``);
* ``rotated, numpy QR`` (the anchor): the same step with the rotation drawn by ``numpy.linalg.qr``,
  as before 2026-12-02. numpy's BLAS threads keep spinning after the call and take the cores from
  the step that follows, so this anchor and ``rotated`` are timed in blocks of their own
  (``test_pretraining_step``): interleaved, the spinning would land on the other mode's step;
* ``rotated, turned vectors + AdamW per tensor`` (second anchor): the rotated step as of
  commit becaed4 (2026-12-02): the [L*K, d] content vectors turned instead of the [H, d] projection, and
  AdamW updating one parameter at a time instead of fused (the clipping and target counting of
  this version stay, so the second ratio slightly understates the whole change). The difference
  is a few per cent, which separate blocks on a shared machine cannot resolve, so it is timed
  interleaved with ``rotated`` and ``plain``, step by step on the same batches
  (``test_interleaved_steps``).

    python -m pytest bench/bench_train.py -q -s
"""
from __future__ import annotations

import time

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


def _mode_trainer(mode: str, monkeypatch) -> tuple[Trainer, callable]:
    """A trainer for ``mode`` and a context-free ``patch(on)`` that swaps the anchor's code in/out."""
    trainer = _trainer(0.0 if mode == "plain" else 1.0)
    if mode == ANCHOR_2:
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in trainer.opt.param_groups]
        trainer.opt = torch.optim.AdamW(groups, lr=trainer.cfg.lr, foreach=False)
    targets = {ANCHOR: (train_mod, "random_rotation", _numpy_rotation),
               ANCHOR_2: (modeling, "_with_content", _turned_vectors)}.get(mode)

    def patch(on: bool):
        if targets is not None:
            module, name, anchor_code = targets
            if on:
                monkeypatch.setattr(module, name, anchor_code)
            else:
                monkeypatch.undo()
    return trainer, patch


def _batches(trainer: Trainer):
    return train_mod.pack_batches([len(s) for s in trainer.train_seqs], BATCH, 0, 0)


@pytest.mark.parametrize("mode", [ANCHOR, "rotated"])
def test_pretraining_step(benchmark, bench_rows, monkeypatch, mode):
    trainer, patch = _mode_trainer(mode, monkeypatch)
    patch(True)
    batches = _batches(trainer)
    step = iter(range(10**9))

    def fn():
        return trainer.train_step(batches[next(step) % len(batches)])

    for _ in range(3):  # warm-up
        fn()
    loss = benchmark.pedantic(fn, rounds=ROUNDS, iterations=1)
    patch(False)
    assert np.isfinite(loss)
    t = benchmark.stats.stats.median
    _TIMES[mode] = t
    row = {"bench": f"pretraining step, {BATCH} tokens (blocks)", "mode": mode, "ms": t * 1e3,
           "threads": torch.get_num_threads()}
    if mode == "rotated" and ANCHOR in _TIMES:
        row["x anchor"] = _TIMES[ANCHOR] / t
    benchmark.extra_info.update(row)
    bench_rows.append(row)


INTERLEAVED = [ANCHOR_2, "rotated", "plain"]
INTERLEAVED_ROUNDS = 60


def test_interleaved_steps(benchmark, bench_rows, monkeypatch):
    """Each round: one step of every mode on the same batch, the order rotating from round to
    round. Reported: each mode's median step time and, for ``rotated``, the median over rounds of
    the paired ratio anchor-2 time / rotated time (pairs share the batch and the machine's mood)."""
    runs = {mode: _mode_trainer(mode, monkeypatch) for mode in INTERLEAVED}
    batches = _batches(runs["plain"][0])
    times = {mode: [] for mode in INTERLEAVED}
    rnd = iter(range(10**9))

    def one_round():
        r = next(rnd)
        batch = batches[r % len(batches)]
        for j in range(len(INTERLEAVED)):
            mode = INTERLEAVED[(r + j) % len(INTERLEAVED)]
            trainer, patch = runs[mode]
            patch(True)
            t0 = time.perf_counter()
            loss = trainer.train_step(batch)
            times[mode].append(time.perf_counter() - t0)
            patch(False)
            assert np.isfinite(loss)

    for _ in range(2):  # warm-up rounds
        one_round()
    for mode in INTERLEAVED:
        times[mode].clear()
    benchmark.pedantic(one_round, rounds=INTERLEAVED_ROUNDS, iterations=1)
    med = {mode: float(np.median(times[mode])) for mode in INTERLEAVED}
    paired = float(np.median(np.asarray(times[ANCHOR_2]) / np.asarray(times["rotated"])))
    for mode in INTERLEAVED:
        row = {"bench": f"pretraining step, {BATCH} tokens (interleaved)", "mode": mode,
               "ms": med[mode] * 1e3, "threads": torch.get_num_threads()}
        if mode == "rotated":
            row["x anchor 2"] = paired
        bench_rows.append(row)
    benchmark.extra_info.update({f"{m} ms": med[m] * 1e3 for m in INTERLEAVED})
