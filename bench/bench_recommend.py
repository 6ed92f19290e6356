"""End-to-end recommendation throughput (users/s), model included, same run.

Two comparisons on one catalog (17,000 items, the size of the demo's book catalog; IDs of L=4
codes, K=256) and one batch of 64 users with 10-item histories, 20 beams, top 10:

* HuggingFace ``generate`` (beam search) + ``ConceptTrieLogitsProcessor`` -- the way peers decode --
  against ``recbase.beam_search`` on the SAME HuggingFace model (a Qwen2 of the demo model's size:
  width 128, 2 layers, 4 heads): the search machinery differs, the model is identical.
* ``Recommender.recommend`` with the demo's own model shape (``RecBaseConfig`` "small", width 128,
  2 layers, max_items 15), the path users call (prefill once, KV cache, native driver).

Random weights: the cost of a forward pass does not depend on training.

Run:   python -m pytest bench/bench_recommend.py --benchmark-only -s
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import recbase
from recbase import ConceptTrie, ConceptTrieLogitsProcessor, beam_search

L, K, N, USERS, HIST, BEAMS, TOP = 4, 256, 17_000, 64, 10, 20, 10
_ROWS: list[dict] = []


@pytest.fixture(scope="module")
def catalog():
    rng = np.random.default_rng(0)
    flat = rng.choice(K ** (L - 1), N, replace=False)
    codes = np.stack([(flat // K ** (L - 2 - lvl)) % K for lvl in range(L - 1)] + [rng.integers(0, 4, N)], 1)
    codes = np.unique(codes, axis=0)
    hist = [rng.integers(0, len(codes), HIST) for _ in range(USERS)]
    return codes.astype(np.int64), ConceptTrie(codes, codebook_size=K), hist


def _qwen():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=4 + L * K, hidden_size=128, intermediate_size=384,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _prompts(codes, hist):
    toks = 4 + np.arange(L) * K + codes
    return torch.tensor(np.stack([np.r_[1, toks[h].reshape(-1)] for h in hist]))


def _best(fn, reps=3):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def test_search_on_the_same_hf_model(benchmark, catalog):
    from transformers import LogitsProcessorList

    codes, trie, hist = catalog
    model = _qwen()
    prompts = _prompts(codes, hist)
    histories = list(prompts)

    def ours():
        with torch.no_grad():
            return beam_search(model, trie, histories, num_beams=BEAMS, k=TOP)

    def hf():
        proc = ConceptTrieLogitsProcessor(trie, prompt_length=prompts.shape[1])
        with torch.no_grad():
            return model.generate(prompts, logits_processor=LogitsProcessorList([proc]), num_beams=BEAMS,
                                  num_return_sequences=TOP, max_new_tokens=L + 1, do_sample=False,
                                  pad_token_id=0, eos_token_id=2, length_penalty=0.0)
    items, _ = benchmark.pedantic(ours, rounds=3, iterations=1)
    assert (items >= 0).all()
    t_ours = benchmark.stats.stats.min
    out = hf()
    assert out.shape == (USERS * TOP, prompts.shape[1] + L + 1)
    t_hf = _best(hf)
    row = dict(bench="same HF model", users_per_s=USERS / t_ours, hf_generate_users_per_s=USERS / t_hf,
               x_hf=t_hf / t_ours, threads=torch.get_num_threads())
    benchmark.extra_info.update(row)
    _ROWS.append(row)
    print(f"\n{row}")


def test_recommender_with_the_demo_model(benchmark, catalog):
    codes, trie, hist = catalog
    cfg = recbase.RecBaseConfig.from_preset("small", levels=L, codebook_size=K, max_items=15,
                                            hidden_size=128, intermediate_size=384, num_hidden_layers=2)
    torch.manual_seed(0)
    model = recbase.RecBaseForCausalLM(cfg).eval()
    rec = recbase.Recommender(model, recbase.ConceptVocab(L, K), {"books": codes})
    items, _ = benchmark.pedantic(lambda: rec.recommend(hist, k=TOP, num_beams=BEAMS, mode="generative"),
                                  rounds=3, iterations=1)
    assert (items >= 0).all()
    row = dict(bench="Recommender, demo model", users_per_s=USERS / benchmark.stats.stats.min,
               threads=torch.get_num_threads())
    benchmark.extra_info.update(row)
    _ROWS.append(row)
    print(f"\n{row}")
