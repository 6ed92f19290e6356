"""Recommender: a tiny pretrain + recommend on CPU that learns; likelihood scores are exact."""
import numpy as np
import pytest
import torch

from recbase.model import RecBaseConfig, RecBaseForCausalLM
from recbase.recommend import Recommender, history_tokens, score_candidates
from recbase.tokenizer import ConceptVocab
from recbase.train import Trainer, TrainConfig

L, K, N_ITEMS = 3, 8, 60


@pytest.fixture(scope="module")
def catalog():
    rng = np.random.default_rng(0)
    rows = rng.choice(K ** L, size=N_ITEMS, replace=False)
    codes = np.stack([(rows // K ** (L - 1 - l)) % K for l in range(L)], 1).astype(np.int64)
    nxt = rng.permutation(N_ITEMS)
    return codes, nxt


def walks(nxt, n_users, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_users):
        seq = [int(rng.integers(N_ITEMS))]
        for _ in range(int(rng.integers(3, 9))):
            seq.append(int(nxt[seq[-1]]))
        out.append(np.array(seq))
    return out


@pytest.fixture(scope="module")
def trained(catalog):
    codes, nxt = catalog
    vocab = ConceptVocab(L, K)
    tokens = vocab.to_tokens(codes)
    seqs = [np.r_[vocab.BOS, tokens[s].reshape(-1)] for s in walks(nxt, 300, seed=1)]
    torch.manual_seed(0)
    model = RecBaseForCausalLM(RecBaseConfig.from_preset("tiny", levels=L, codebook_size=K, max_items=12))
    Trainer(model, seqs, seqs[:30], TrainConfig(epochs=8, tokens_per_batch=2048, lr=1e-2, warmup_steps=3,
                                                progress=False, patience=10)).fit()
    return model.eval(), vocab


def test_pretrain_then_recommend_learns_the_walk(catalog, trained):
    codes, nxt = catalog
    model, vocab = trained
    rec = Recommender(model, vocab, {"toy": codes})
    hist = [s[:-1] for s in walks(nxt, 60, seed=2)]
    target = np.array([nxt[h[-1]] for h in hist])
    items, scores = rec.recommend(hist, k=5, num_beams=10, exclude_history=False)
    assert items.shape == (60, 5)
    assert ((items >= 0) & (items < N_ITEMS)).all()
    assert all(len(set(r)) == len(r) for r in items.tolist())
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # sorted by score
    hit = (items == target[:, None]).any(1).mean()
    assert hit > 0.5  # random would be 5/60 = 0.08
    # excluding history never returns a history item
    items_x, _ = rec.recommend(hist, k=5, num_beams=10, exclude_history=True)
    assert not any(set(r) & set(h.tolist()) for r, h in zip(items_x.tolist(), hist))


def test_candidate_scores_equal_full_forward_likelihood(catalog, trained):
    codes, nxt = catalog
    model, vocab = trained
    rng = np.random.default_rng(3)
    hist = [s[:-1] for s in walks(nxt, 4, seed=4)]
    cands = [rng.choice(N_ITEMS, size=rng.integers(1, 6), replace=False) for _ in hist]
    got = score_candidates(model, history_tokens(hist, codes, vocab), cands, codes)
    tokens = vocab.to_tokens(codes)
    for b, (h, c) in enumerate(zip(hist, cands)):
        for j, item in enumerate(c):
            seq = torch.as_tensor(np.r_[vocab.BOS, tokens[h].reshape(-1), tokens[item]])[None]
            with torch.no_grad():
                logits = model(input_ids=seq, output_logits=True).logits[0]  # [T, K] next-level
            lp = torch.log_softmax(logits.double(), -1)
            start = 1 + L * len(h)
            ref = sum(float(lp[start - 1 + l, codes[item, l]]) for l in range(L))
            assert got[b][j] == pytest.approx(ref, abs=1e-4)


def test_bad_inputs(catalog, trained):
    codes, _ = catalog
    model, vocab = trained
    rec = Recommender(model, vocab, {"a": codes, "b": codes[:10]})
    with pytest.raises(ValueError, match="domain"):
        rec.recommend([[1, 2]], k=3)
    with pytest.raises(ValueError, match="domain"):
        rec.recommend([[1, 2]], k=3, domain="c")
    with pytest.raises(ValueError, match="out of range"):
        rec.recommend([[1, 200]], k=3, domain="a")
    with pytest.raises(ValueError, match="num_beams"):
        rec.recommend([[1, 2]], k=30, domain="a", num_beams=5)
    with pytest.raises(ValueError, match="candidates"):
        rec.score([[1, 2]], [[1], [2]], domain="a")
    with pytest.raises(ValueError, match="catalogs"):
        Recommender(model, vocab, {})
