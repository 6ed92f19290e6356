"""Sixth round of docs/results.md: the dense channel on unordered histories (no books involved).

    recbase demo --evaluate-on valid --output recbase-valid   # a model to read with
    python docs/experiments/set_reading.py recbase-valid

Movie validation users (source domain) as given and shuffled, and the held-out IBM articles
catalog (tokenized on the demo codebooks, read by content alone) as given and shuffled: model
weights vs the set reading ("perm": weights averaged over 8 orderings) vs uniform weights vs
text-kNN, at several kernel temperatures (``--quick``: the learned one only). Writes
set_reading.json beside the model folder.
"""
import sys, json, numpy as np, torch
from pathlib import Path
from recbase import datasets
from recbase.data import TextEncoder
from recbase.data.splits import leave_one_out
from recbase.data.text import render_items
from recbase.model import RecBaseForCausalLM
from recbase.tokenizer import ItemTokenizer, centre_embeddings
from recbase.recommend import Recommender
from recbase.model.dense import dense_top_n
from recbase.evaluate import ndcg_at_k, recall_at_k
from recbase.baselines import TextKNN

out = Path(sys.argv[1]); torch.set_num_threads(1)
tok = ItemTokenizer.load(out / "tokenizer"); model = RecBaseForCausalLM.from_pretrained(out / "model").eval()
enc = TextEncoder()
def prep(name, kcore=5, implicit=None):
    ds = datasets.load(name)
    if implicit is not None: ds = ds.to_implicit(implicit)
    ds = ds.kcore(kcore, kcore); sp = leave_one_out(ds)
    e = centre_embeddings(enc.encode(render_items(ds.items.set_index("item_id").loc[sp.item_index.decode(np.arange(sp.num_items))].reset_index(), ds.domain)))
    return sp, e
ml, ml_e = prep("ml-1m")
ar, ar_e = prep("ibm-articles")
codes_ml = tok.codes[:len(ml_e)]
rec = Recommender(model, tok.vocab, {"movies": codes_ml}, max_items=model.config.max_items, item_embeddings={"movies": ml_e})
rec.add_catalog("articles", tok.for_catalog(ar_e).codes, unseen=True, item_embeddings=ar_e)
tau = float(model.dense_temperature()); print("tau", tau)
rng = np.random.default_rng(123)

def weights_for(hists, domain, reading_unseen):
    saved = rec.unseen_domains
    rec.unseen_domains = saved | {domain} if reading_unseen else saved - {domain}
    try:
        toks, vecs, kept = rec._prefill_inputs(hists, domain)
        with torch.no_grad(), rec._reading(domain):
            w = rec._history_weights(model, toks, vecs)
    finally:
        rec.unseen_domains = saved
    return w, kept

def evaluate(domain, hists, targets, variant, P=8, unseen=True, last=20, taus=(0.13,)):
    ranked = []
    unit = rec.unit[domain]
    for s in range(0, len(hists), 64):
        ch = hists[s:s+64]
        if variant == "model":
            w, kept = weights_for(ch, domain, unseen)
            items = kept; W = [w[b, :len(h)] for b, h in enumerate(kept)]
        elif variant.startswith("perm"):
            items = [np.asarray(h[-last:]) if last else np.asarray(h) for h in ch]
            acc = [torch.zeros(len(h)) for h in items]
            for p in range(P):
                perms = [rng.permutation(len(h)) for h in items]
                w, kept = weights_for([h[pm] for h, pm in zip(items, perms)], domain, unseen)
                for b, pm in enumerate(perms):
                    m = len(kept[b]); idx = pm[len(pm)-m:]  # positions in items[b] the window kept
                    acc[b][torch.as_tensor(idx)] += w[b, :m] / P
            W = acc
        elif variant == "uniform":
            items = [np.asarray(h[-last:]) for h in ch]
            W = [torch.full((len(h),), 1.0 / len(h)) for h in items]
        m = max(len(h) for h in items)
        full = torch.zeros(len(ch), m); hist = torch.zeros(len(ch), m, unit.shape[1])
        for b, h in enumerate(items):
            full[b, :len(h)] = W[b]; hist[b, :len(h)] = unit[torch.as_tensor(h)]
        ranked.append([dense_top_n(full, hist, unit, t, 10, banned=[np.asarray(h) for h in ch])[0].numpy() for t in taus])
    out = {}
    for i, t in enumerate(taus):
        r = np.concatenate([x[i] for x in ranked])
        out[t] = (float(recall_at_k(r, targets, 10)), float(ndcg_at_k(r, targets, 10)))
    return out

def sample(n, limit, seed):
    return np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
res = {}
TAUS = (tau,) if "--quick" in sys.argv[2:] else (tau, 0.2, 0.3, 0.5, 1.0, 3.0)
for domain, sp, emb, users, unseen in (("movies", ml, ml_e, sample(ml.num_users, 1000, 1), True),
                                       ("articles", ar, ar_e, np.arange(ar.num_users), True)):
    tgt = sp.valid_targets[users]
    for order in ("ordered", "shuffled"):
        r = np.random.default_rng(7)
        hists = [np.asarray(sp.valid_histories[u]) for u in users]
        if order == "shuffled": hists = [h[r.permutation(len(h))] for h in hists]
        knn = TextKNN(emb, max_history=20).fit()
        kr = knn.recommend(hists, 10)
        res[(domain, order, "text-kNN")] = (float(recall_at_k(kr, tgt, 10)), float(ndcg_at_k(kr, tgt, 10)))
        for v in ("model", "perm", "uniform"):
            for t, val in evaluate(domain, hists, tgt, v, unseen=unseen, taus=TAUS).items():
                res[(domain, order, f"{v} tau={t}")] = val
        for k_, v_ in res.items():
            if k_[0] == domain and k_[1] == order: print(k_, "R@10 %.4f NDCG@10 %.4f" % v_, flush=True)
json.dump({" / ".join(k): v for k, v in res.items()}, open(out / "set_reading.json", "w"), indent=1)
