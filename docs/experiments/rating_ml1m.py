"""#17 on MovieLens-1M (in-domain): one model for next-item and rating prediction.

    python docs/experiments/rating_ml1m.py OUT [--valid]

Two models of the demo's settings (hidden 128, 2 layers; otherwise recbase.pipeline.PretrainSettings
defaults: 15 items, 5 epochs of 2,048-token batches, rotation 0.5, recent pass, dense channel),
pretrained on the same ML-1M windows for the same number of steps: sequential only, and a
task mixture of 1:1 (each window drawn per step as a next-item or a RATE sequence; nothing tuned).
Then, on the same 2,000 seeded users (test items, or validation items with --valid):
* sequential: evaluate_domain (popularity, text-kNN, recbase generative / dense / hybrid), with
  the direct protocol (1 + 99 candidates);
* rating: the held-out (last rated) item's rating, recbase multi-task next to the global mean,
  user + item biases and biased MF (ALS), fitted on the same training ratings.
* zero-shot rating on Book-Crossing's explicit ratings (1-10, rating >= 1, 5-core; the model never
  saw a book): its catalog tokenized on the movie codebooks (for_catalog), read by content alone,
  predictions mapped to the books' scale; the baselines there fit the books' own training ratings
  (context, not zero-shot).
Writes OUT/rating_ml1m.json and prints the tables.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from recbase.data import TextEncoder
from recbase.data.corpus import Corpus, CorpusDomain
from recbase.pipeline import (PretrainSettings, evaluate_domain, evaluate_ratings, prepare_domains, pretrain_domains,
                              rating_baselines, sample_users, tokenize_domains)
from recbase.recommend import Recommender

out = Path(sys.argv[1])
on_valid = "--valid" in sys.argv
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
corpus = Corpus([CorpusDomain("movies", dataset="ml-1m", kcore=5)], seed=0, source="rating_ml1m")
domains = prepare_domains(corpus, TextEncoder())
tok = tokenize_domains(domains, levels=3, codebook_size=256, dedup="reassign", seed=0)
d = domains["movies"]
users = sample_users(d.split.num_users, 2000, 0 if not on_valid else 7)
split = "valid" if on_valid else "test"
result = {"split": split, "arms": {}}
for arm, tasks in (("sequential only", {"sequential": 1.0}), ("multi-task 1:1", {"sequential": 1.0, "rating": 1.0})):
    t0 = time.perf_counter()
    settings = PretrainSettings(hidden_size=128, num_layers=2, tasks=tasks)  # the demo's (DemoConfig)
    pre = pretrain_domains(domains, tok, ["movies"], settings, output_dir=out / arm.split()[0])
    wall = time.perf_counter() - t0
    rows = evaluate_domain(pre.model, tok, domains, "movies", zero_shot=False, split=split, max_users=2000,
                           seed=0 if not on_valid else 7, auc=False, direct=True)
    entry = {"pretrain_s": wall, "steps": pre.history[-1]["steps"] if pre.history else None, "sequential": rows}
    if "rating" in tasks:
        rec = Recommender(pre.model, tok.vocab, {"movies": d.codes}, item_embeddings={"movies": d.embeddings})
        predictors = {"recbase (multi-task)": lambda u, h, hr, items: rec.predict_rating(h, hr, items, domain="movies"),
                      **rating_baselines(d.split)}
        entry["rating"] = evaluate_ratings(d.split, users, predictors, on_valid=on_valid)
    result["arms"][arm] = entry
    print(arm, f"pretrain {wall:.0f} s", flush=True)
    for r in rows:
        print(f"  {r['model']:32s} R@10 {r['recall@10']:.4f} ±{r['se_recall@10']:.4f}  NDCG@10 {r['ndcg@10']:.4f} "
              f"±{r['se_ndcg@10']:.4f}  direct HR@10 {r['direct_hr@10']:.4f} ±{r['direct_se_hr@10']:.4f}", flush=True)
    for r in entry.get("rating", []):
        print(f"  {r['model']:32s} RMSE {r['rmse']:.4f} ±{r['se_rmse']:.4f}  MAE {r['mae']:.4f} ±{r['se_mae']:.4f}",
              flush=True)
# zero-shot: Book-Crossing's explicit ratings, read by the multi-task model by content alone
from recbase import datasets
from recbase.data.splits import leave_one_out
from recbase.data.text import render_items
from recbase.tokenizer import centre_embeddings

bx = datasets.load("book-crossing")
bx = bx._replace(bx.interactions[bx.interactions["rating"] >= 1], "explicit ratings only").kcore(5, 5)
bsp = leave_one_out(bx)
bemb = centre_embeddings(TextEncoder().encode(render_items(bx.items.set_index("item_id").loc[
    bsp.item_index.decode(np.arange(bsp.num_items))].reset_index(), bx.domain)))
rec.add_catalog("books", tok.for_catalog(bemb).codes, unseen=True, item_embeddings=bemb, unordered=True)
busers = sample_users(bsp.num_users, 2000, 0 if not on_valid else 7)
result["books_zero_shot_rating"] = evaluate_ratings(bsp, busers, {
    "recbase (multi-task, zero-shot)": lambda u, h, hr, items: rec.predict_rating(h, hr, items, domain="books",
                                                                                  scale=(1.0, 10.0)),
    **rating_baselines(bsp)}, on_valid=on_valid)
print("books (zero-shot rating)", flush=True)
for r in result["books_zero_shot_rating"]:
    print(f"  {r['model']:32s} RMSE {r['rmse']:.4f} ±{r['se_rmse']:.4f}  MAE {r['mae']:.4f} ±{r['se_mae']:.4f}",
          flush=True)
(out / "rating_ml1m.json").write_text(json.dumps(result, indent=2, default=float))
