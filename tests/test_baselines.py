import numpy as np
import pytest

from recbase.baselines import Popularity, SASRec, TextKNN, TextSASRec, top_k
from recbase.evaluate import evaluate_rankings


def test_popularity_exact():
    train = [np.array([0, 1, 1, 3]), np.array([1, 3, 4]), np.array([4])]
    pop = Popularity().fit(train, num_items=6)
    assert pop.counts.tolist() == [1, 3, 0, 2, 2, 0]
    # ties (3, 4 have 2; 2, 5 have 0) go to the lower index
    assert pop.recommend([np.array([], np.int64)], k=6).tolist() == [[1, 3, 4, 0, 2, 5]]
    assert pop.recommend([np.array([1, 4])], k=4).tolist() == [[3, 0, 2, 5]]
    assert pop.recommend([np.array([1, 4])], k=4, exclude_history=False).tolist() == [[1, 3, 4, 0]]
    # more than the allowed items -> -1 padding
    assert pop.recommend([np.array([0, 1, 2, 3])], k=4).tolist() == [[4, 5, -1, -1]]
    s = pop.score([np.array([0]), np.array([2])], [np.array([1, 2]), np.array([5])])
    assert [x.tolist() for x in s] == [[3.0, 0.0], [0.0]]


@pytest.mark.parametrize("seed", range(3))
def test_top_k_vs_bruteforce(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=(20, 30)).astype(np.float32)  # many ties
    banned = [rng.choice(30, size=rng.integers(0, 28), replace=False) for _ in range(20)]
    got = top_k(scores, 7, banned)
    for b in range(20):
        allowed = [i for i in range(30) if i not in set(banned[b].tolist())]
        ref = sorted(allowed, key=lambda i: (-scores[b, i], i))[:7]
        assert got[b].tolist() == ref + [-1] * (7 - len(ref))
    with pytest.raises(ValueError, match="NaN"):
        top_k(np.array([[np.nan, 1.0]]), 1)


def test_textknn_vs_bruteforce():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 8))
    knn = TextKNN(emb, max_history=3).fit(None, 40)
    hist = [rng.choice(40, size=rng.integers(1, 7), replace=False) for _ in range(15)]
    rec = knn.recommend(hist, 5)
    en = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for b, h in enumerate(hist):
        u = en[h[-3:]].mean(0)
        cos = en @ u / np.linalg.norm(u)
        ref = [i for i in np.argsort(-cos, kind="stable") if i not in set(h.tolist())][:5]
        assert rec[b].tolist() == ref
    cand = [np.array([0, 1, 2])] * 15
    sc = knn.score(hist, cand)
    u = en[hist[0][-3:]].mean(0)
    np.testing.assert_allclose(sc[0], (en[:3] @ u) / np.linalg.norm(u), rtol=1e-5)
    with pytest.raises(ValueError, match=r"item index 40 >= num_items=40"):
        knn.recommend([np.array([40])], 3)
    with pytest.raises(ValueError, match="num_items=3 but item_embeddings has 40"):
        knn.fit(None, 3)


@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_textknn_recency_decay_vs_bruteforce(decay):
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(30, 6))
    en = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    hist = [rng.choice(30, size=rng.integers(1, 9), replace=False) for _ in range(10)]
    got = TextKNN(emb, decay=decay).scores(hist)
    for b, h in enumerate(hist):
        u = sum(decay ** (len(h) - 1 - j) * en[i] for j, i in enumerate(h))
        np.testing.assert_allclose(got[b], en @ u / np.linalg.norm(u), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\]"):
        TextKNN(emb, decay=0.0)


def test_textknn_tune_picks_best_on_validation():
    # item i+1 is the nearest neighbour of item i and the target is the successor of the LAST
    # item: a strong decay (recent item dominates) must win over the plain mean
    rng = np.random.default_rng(2)
    n = 60
    emb = np.cumsum(rng.normal(size=(n, 16)), axis=0)
    hist = [rng.choice(n - 1, size=6, replace=False) for _ in range(40)]
    tgt = np.array([h[-1] + 1 for h in hist])
    knn = TextKNN(emb)
    res = knn.tune(hist, tgt, decays=(1.0, 0.1), max_histories=(None,))
    assert res["decay"] == 0.1 and knn.decay == 0.1
    assert res["ndcg"]["0.1/None"] > res["ndcg"]["1.0/None"]


def _pattern(seed, n_items=40, users=300):
    """Each user walks the cycle i -> i+3 (mod N) from a random start."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(n_items) + 3 * np.arange(rng.integers(6, 16))) % n_items for _ in range(users)]


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and much faster on a loaded machine."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sasrec_learns_sequential_pattern(one_thread):
    seqs = _pattern(0, users=150)
    n = 40
    train, vh, vt = [s[:-2] for s in seqs], [s[:-2] for s in seqs], np.array([s[-2] for s in seqs])
    th, tt = [s[:-1] for s in seqs], np.array([s[-1] for s in seqs])
    m = SASRec(hidden=32, max_len=12, batch_size=64, max_epochs=12, patience=2, seed=0)
    m.fit(train, n, valid_histories=vh, valid_targets=vt)
    sas = evaluate_rankings(m.recommend(th, 10), tt, ks=(10,))["ndcg@10"]
    pop = evaluate_rankings(Popularity().fit(train, n).recommend(th, 10), tt, ks=(10,))["ndcg@10"]
    assert sas > 0.9 and sas > 3 * pop
    # early stopping kept the best epoch; scores are finite; candidates scored consistently
    assert m.best_valid_ndcg10_ == max(h["valid_ndcg@10"] for h in m.history_)
    full = m.scores(th[:2])
    part = m.score(th[:2], [np.array([5, 7]), np.array([1])])
    np.testing.assert_allclose(part[0], full[0, [5, 7]], rtol=1e-5)
    # same seed -> same model
    m2 = SASRec(hidden=32, max_len=12, max_epochs=1, seed=0).fit(train, n)
    m3 = SASRec(hidden=32, max_len=12, max_epochs=1, seed=0).fit(train, n)
    np.testing.assert_array_equal(m2.scores(th[:5]), m3.scores(th[:5]))


def test_sasrec_windows_cover_every_transition():
    m = SASRec(max_len=4)
    seq = np.arange(11)
    w = m._windows([seq])
    pairs = set()
    for row in w:
        toks = row[row > 0] - 1
        pairs |= {(a, b) for a, b in zip(toks[:-1], toks[1:])}
    assert pairs == {(i, i + 1) for i in range(10)}
    assert sum(int((r > 0).sum()) - 1 for r in w) == 10  # each transition exactly once


def test_errors():
    with pytest.raises(ValueError, match="divisible"):
        SASRec(hidden=30, heads=4)
    with pytest.raises(RuntimeError, match="fit"):
        SASRec().scores([np.array([1])])
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        Popularity().fit([np.array([0])], 2).recommend([np.array([0])], 0)
    with pytest.raises(TypeError, match="single 1-D array"):
        Popularity().fit([np.array([0])], 2).recommend(np.array([0, 1]), 1)
    with pytest.raises(ValueError, match="num_items=2"):
        Popularity().fit([np.array([5])], 2)



def _nn_walks(seed, n=300, d=8, users=300):
    """Random text embeddings; each user walks from a random item to the nearest (cosine)
    not yet visited item, 6-13 steps: the next item is the text neighbour of the last one."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d))
    en = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = en @ en.T
    seqs = []
    for _ in range(users):
        s = [int(rng.integers(n))]
        for _ in range(int(rng.integers(6, 14)) - 1):
            row = sim[s[-1]].copy()
            row[s] = -np.inf
            s.append(int(np.argmax(row)))
        seqs.append(np.array(s))
    return emb, seqs


def _text_sasrec_reference(m, emb, hist):
    """Independent float64 forward of a TextSASRec (eval mode) for one history."""
    import math
    torch = pytest.importorskip("torch")
    sd = {k: v.detach().cpu().double() for k, v in m.net.state_dict().items()}
    E = torch.from_numpy(np.asarray(emb, np.float64))
    E = E / E.norm(dim=1, keepdim=True)
    h = torch.as_tensor(np.asarray(hist)[-m.max_len:])
    T, H, nh = len(h), m.hidden, m.heads

    def ln(x, pre):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[pre + ".weight"] + sd[pre + ".bias"]

    def lin(x, pre):
        return x @ sd[pre + ".weight"].T + sd[pre + ".bias"]

    x = lin(E[h], "inp") + sd["enc.pos.weight"][:T]
    causal = torch.ones(T, T).tril().bool()
    for b in range(m.blocks):
        pre = f"enc.blocks.{b}"
        q, k, v = lin(ln(x, pre + ".ln1"), pre + ".qkv").split(H, dim=-1)
        heads = []
        for j in range(nh):
            sl = slice(j * H // nh, (j + 1) * H // nh)
            att = (q[:, sl] @ k[:, sl].T) / math.sqrt(H // nh)
            att = torch.softmax(att.masked_fill(~causal, -math.inf), dim=-1)
            heads.append(att @ v[:, sl])
        x = x + lin(torch.cat(heads, dim=-1), pre + ".proj")
        f = lin(ln(x, pre + ".ln2"), pre + ".ff.0")
        f = 0.5 * f * (1 + torch.erf(f / math.sqrt(2)))
        x = x + lin(f, pre + ".ff.3")
    z = ln(x, "enc.ln")[-1]
    u = lin(z, "out")
    r = lin(E, "inp")  # the adapted items, the same map as the input's
    r = r / r.norm(dim=1, keepdim=True)
    return (r @ (u / u.norm()) / m.temperature).numpy()


def test_text_sasrec_matches_float64_reference(one_thread):
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(25, 6)) * rng.uniform(0.5, 3, size=(25, 1))  # norms vary
    train = [rng.integers(0, 25, size=rng.integers(2, 10)) for _ in range(30)]
    m = TextSASRec(emb, hidden=8, blocks=2, heads=2, max_len=6, temperature=0.1,
                   max_epochs=2, seed=0).fit(train, 25)
    hist = [rng.integers(0, 25, size=n) for n in (1, 3, 6, 9)]  # 9 > max_len: truncated
    got = m.scores(hist + [np.array([], np.int64)])
    assert got.dtype == np.float32 and got.shape == (5, 25)
    for b, h in enumerate(hist):
        np.testing.assert_allclose(got[b], _text_sasrec_reference(m, emb, h), rtol=1e-4, atol=1e-4)
    assert not got[-1].any()  # empty history -> all-zero row
    # another catalog (other N, same d): same network, new items
    emb2 = rng.normal(size=(40, 6))
    m2 = m.with_catalog(emb2)
    assert m2.net is m.net and m2.num_items == 40 and m.num_items == 25
    got2 = m2.scores(hist)
    assert got2.shape == (4, 40)
    for b, h in enumerate(hist):
        h2 = h + 10  # indices of the new catalog
        np.testing.assert_allclose(m2.scores([h2])[0], _text_sasrec_reference(m2, emb2, h2),
                                   rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(m.scores(hist + [np.array([], np.int64)]), got)  # original untouched


def test_text_sasrec_learns_and_transfers_zero_shot(one_thread):
    emb, seqs = _nn_walks(0)
    n = len(emb)
    train, vh, vt = [s[:-2] for s in seqs], [s[:-2] for s in seqs], np.array([s[-2] for s in seqs])
    th, tt = [s[:-1] for s in seqs], np.array([s[-1] for s in seqs])
    m = TextSASRec(emb, hidden=32, max_len=12, batch_size=64, lr=3e-3, max_epochs=10, patience=3,
                   seed=0)
    m.fit(train, n, valid_histories=vh, valid_targets=vt)
    random_recall = 10 / n
    rec = evaluate_rankings(m.recommend(th, 10), tt, ks=(10,))["recall@10"]
    assert rec > 0.5 and rec > 10 * random_recall
    assert m.best_valid_ndcg10_ == max(h["valid_ndcg@10"] for h in m.history_)
    # a fresh catalog built the same way, never trained on
    emb2, seqs2 = _nn_walks(1)
    z = m.with_catalog(emb2)
    zs = evaluate_rankings(z.recommend([s[:-1] for s in seqs2], 10), np.array([s[-1] for s in seqs2]),
                           ks=(10,))["recall@10"]
    assert zs > 0.3 and zs > 5 * random_recall
    part = z.score(th[:2], [np.array([5, 7]), np.array([1])])
    np.testing.assert_allclose(part[0], z.scores(th[:1])[0, [5, 7]], rtol=1e-5)


def test_text_sasrec_deterministic(one_thread):
    emb, seqs = _nn_walks(2, n=50, users=40)
    fit = lambda seed: TextSASRec(emb, hidden=16, max_len=8, max_epochs=2, seed=seed).fit(seqs)
    a, b, c = fit(0), fit(0), fit(1)
    np.testing.assert_array_equal(a.scores(seqs[:5]), b.scores(seqs[:5]))
    assert [h["loss"] for h in a.history_] == [h["loss"] for h in b.history_]
    assert not np.array_equal(a.scores(seqs[:5]), c.scores(seqs[:5]))


def test_text_sasrec_errors():
    emb = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(ValueError, match=r"item_embeddings must be a 2-D .* got shape \(10,\)"):
        TextSASRec(emb[:, 0])
    with pytest.raises(ValueError, match=r"item_embeddings must be a 2-D .* got shape \(0, 4\)"):
        TextSASRec(np.zeros((0, 4)))
    bad = emb.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"item_embeddings must be finite.*1 of 10 rows.*row 3"):
        TextSASRec(bad)
    m = TextSASRec(emb, hidden=8, max_epochs=1)
    with pytest.raises(ValueError, match=r"with_catalog: item_embeddings must have d=4 .*\(7, 5\)"):
        m.with_catalog(np.zeros((7, 5)))
    inf = emb.copy()
    inf[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"with_catalog: item_embeddings must be finite"):
        m.with_catalog(inf)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        TextSASRec(emb, temperature=0.0)
    with pytest.raises(ValueError, match="divisible"):
        TextSASRec(emb, hidden=30, heads=4)
    with pytest.raises(RuntimeError, match="fit"):
        m.scores([np.array([1])])
    with pytest.raises(ValueError, match="num_items=3 but item_embeddings has 10"):
        m.fit([np.array([0, 1])], 3)
    with pytest.raises(ValueError, match=r"item index 10 >= num_items=10"):
        m.fit([np.array([0, 10])])


@pytest.mark.parametrize("module", ['recbase.baselines'])
def test_docstring_examples(module):
    import doctest
    import importlib
    res = doctest.testmod(importlib.import_module(module))
    assert res.failed == 0 and res.attempted > 0
