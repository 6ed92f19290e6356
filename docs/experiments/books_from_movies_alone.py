"""Zero-shot books after pretraining on movies alone, with the tokenizer of the three-domain corpus
(docs/results.md, "A corpus of domains"): the movies + articles row of the same question is the
books row of `recbase zeroshot --corpus docs/experiments/three_domains.toml --output lodo`.

    python docs/experiments/books_from_movies_alone.py      # writes books_from_movies_alone.json
"""
import json, time
from pathlib import Path
import torch
from recbase.data.corpus import load_corpus
from recbase.pipeline import PretrainSettings, prepare_domains, tokenize_domains, pretrain_domains, evaluate_domain
torch.manual_seed(0)
t0 = time.time()
corpus = load_corpus(Path(__file__).with_name("three_domains.toml"))
domains = prepare_domains(corpus)
tok = tokenize_domains(domains)
print("prepared", {n: d.split.num_users for n, d in domains.items()}, round(time.time() - t0), flush=True)
results = {}
for train_on in (["movies"],):
    t1 = time.time()
    torch.manual_seed(0)
    s = PretrainSettings(hidden_size=128, num_layers=2, progress=False)
    model = pretrain_domains(domains, tok, train_on, s).model
    key = "+".join(train_on)
    print(key, "pretrained", round(time.time() - t1), model.config.fusion_weights, flush=True)
    for split in ("valid", "test"):
        rows = evaluate_domain(model, tok, domains, "books", zero_shot=True, split=split, seed=7 if split == "valid" else 0)
        for r in rows:
            print(key, split, r["model"], "R@10 %.4f±%.4f NDCG@10 %.4f±%.4f" % (r["recall@10"], r["se_recall@10"], r["ndcg@10"], r["se_ndcg@10"]), flush=True)
        results[f"{key}/{split}"] = rows
    if "articles" not in train_on:  # articles as a held-out catalog of the movies-only model
        for r in evaluate_domain(model, tok, domains, "articles", zero_shot=True, split="test", seed=0):
            print(key, "articles-test", r["model"], "R@10 %.4f NDCG@10 %.4f" % (r["recall@10"], r["ndcg@10"]), flush=True)
    results[f"{key}/seconds"] = round(time.time() - t1)
json.dump(results, open("books_from_movies_alone.json", "w"), indent=1, default=float)
print("total", round(time.time() - t0))
