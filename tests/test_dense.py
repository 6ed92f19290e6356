"""The dense item channel: kernel scores, exact top-N, the alignment loss, hybrid scoring,
the rotation property of the aligned zero-shot reading, save/load and bad input."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import recbase
from recbase.model.dense import dense_kernel_scores, dense_top_n, dense_user_scores, frame_alignment, unit_rows
from recbase.recommend import Recommender, choose_fusion
from recbase.train import ItemVectors, Trainer, TrainConfig


def _reference_kernel(w, hist, cand, tau):
    w, hist, cand = (np.asarray(x, dtype=np.float64) for x in (w, hist, cand))
    sim = hist @ cand.T
    return np.log(np.einsum("pj,jc->pc", w, np.exp(sim / tau)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_scores_match_float64(seed):
    rng = np.random.default_rng(seed)
    p, j, c, d = rng.integers(1, 7), rng.integers(1, 9), rng.integers(1, 30), rng.integers(2, 12)
    w = rng.random((p, j))
    w /= w.sum(1, keepdims=True)
    hist = unit_rows(torch.from_numpy(rng.normal(size=(j, d))))
    cand = unit_rows(torch.from_numpy(rng.normal(size=(c, d))))
    tau = float(rng.uniform(0.05, 2.0))
    got = dense_kernel_scores(torch.from_numpy(w), hist, cand, tau).numpy()
    np.testing.assert_allclose(got, _reference_kernel(w, hist, cand, tau), rtol=1e-5, atol=1e-4)


def test_dense_top_n_is_exact_across_blocks():
    rng = np.random.default_rng(3)
    b, m, n, d = 4, 3, 257, 8
    w = rng.random((b, m))
    w[1, 2] = 0.0  # padding
    w /= w.sum(1, keepdims=True)
    hist = unit_rows(torch.from_numpy(rng.normal(size=(b, m, d))).float())
    cat = unit_rows(torch.from_numpy(rng.normal(size=(n, d))).float())
    banned = [rng.choice(n, size=5, replace=False) for _ in range(b)]
    items, scores = dense_top_n(torch.from_numpy(w).float(), hist, cat, 0.2, 7, banned=banned, block=50)
    for u in range(b):
        ref = _reference_kernel(w[u:u + 1], hist[u].double(), cat.double(), 0.2)[0]
        ref[banned[u]] = -np.inf
        top = np.argsort(-ref, kind="stable")[:7]
        assert set(items[u].tolist()) == set(top.tolist())
        np.testing.assert_allclose(scores[u].numpy(), ref[top], rtol=1e-5, atol=1e-4)
    # the per-user form equals the general mixing form with a block-diagonal weight matrix
    full = torch.zeros(b, b * m)
    for u in range(b):
        full[u, u * m:(u + 1) * m] = torch.from_numpy(w[u]).float()
    np.testing.assert_allclose(dense_user_scores(torch.from_numpy(w).float(), hist, cat, 0.3).numpy(),
                               dense_kernel_scores(full, hist.reshape(b * m, d), cat, 0.3).numpy(), rtol=1e-5, atol=1e-5)


def _tiny(levels=2, k=32, dim=16, seed=0, n_movies=300, n_books=200):
    rng = np.random.default_rng(seed)
    movies = rng.normal(size=(n_movies, dim)).astype(np.float32)
    books = rng.normal(size=(n_books, dim)).astype(np.float32)
    tok = recbase.ItemTokenizer(levels=levels, codebook_size=k, dedup="reassign", seed=seed).fit(
        np.concatenate([movies, books]))
    codes = {"movies": tok.codes[:n_movies], "books": tok.codes[n_movies:]}
    cfg = recbase.RecBaseConfig.from_preset("tiny", levels=tok.id_length, codebook_size=k, max_items=8,
                                            concept_vector_dim=dim, item_vector_dim=dim)
    torch.manual_seed(seed)
    model = recbase.RecBaseForCausalLM(cfg)
    model.set_concept_vectors(tok.quantizer.codebooks)
    return tok, codes, {"movies": movies, "books": books}, model


def test_dense_loss_matches_plain_reference():
    tok, codes, emb, model = _tiny()
    rng = np.random.default_rng(1)
    mt = tok.tokens(codes["movies"])
    items = [rng.choice(300, size=n, replace=False) for n in (4, 3, 5)]
    seqs = [np.r_[tok.vocab.BOS, mt[s].ravel()] for s in items]
    ids = torch.from_numpy(np.concatenate(seqs))
    cu = torch.tensor(np.r_[0, np.cumsum([len(s) for s in seqs])])
    table = ItemVectors(mt, emb["movies"], 32)
    vec = table.per_token(model, ids, cu)
    out = model(input_ids=ids, cu_seqlens=cu, return_loss=True, item_vectors=vec, output_hidden_states=True)
    h = out.hidden_states.double()
    # reference: plain loops in float64
    L = tok.id_length
    wq, wk = model.dense_query.weight.double(), model.dense_key.weight.double()
    tau = float(model.dense_temperature().detach())
    batch_items = np.unique(np.concatenate(items))
    e = unit_rows(torch.from_numpy(emb["movies"]).double())
    losses = []
    for b, its in enumerate(items):
        ends = [int(cu[b]) + 1 + L * (m + 1) - 1 for m in range(len(its))]
        for m in range(len(its) - 1):
            q = wq @ h[ends[m]]
            logits = torch.stack([q @ (wk @ h[ends[j]]) for j in range(m + 1)]) / np.sqrt(len(q))
            a = torch.softmax(logits, 0)
            cand = [c for c in batch_items if c not in its[:m + 1]]
            s = torch.stack([torch.log(sum(a[j] * torch.exp(e[its[j]] @ e[c] / tau) for j in range(m + 1)))
                             for c in cand])
            losses.append(-(s[cand.index(its[m + 1])] - torch.logsumexp(s, 0)))
    ref = torch.stack(losses).mean()
    assert torch.allclose(out.dense_loss.double(), ref, rtol=1e-4, atol=1e-5)
    # the total adds the weighted dense loss to the concept CE
    model.config.dense_loss_weight = 0.0
    gen = model(input_ids=ids, cu_seqlens=cu, return_loss=True, item_vectors=vec).loss
    assert torch.allclose(out.loss, gen + 1.0 * out.dense_loss, atol=1e-5)
    assert not torch.allclose(gen, model(input_ids=ids, cu_seqlens=cu, return_loss=True).loss)  # vectors read


def _trained_recommender(frame="identity"):
    tok, codes, emb, model = _tiny()
    rng = np.random.default_rng(0)
    mt = tok.tokens(codes["movies"])
    seqs = [np.r_[tok.vocab.BOS, mt[rng.integers(0, 300, 6)].ravel()] for _ in range(48)]
    Trainer(model, seqs, seqs[:8], TrainConfig(epochs=1, progress=False, content_rotation_rate=0.5),
            item_vectors=ItemVectors(mt, emb["movies"], 32)).fit()
    rec = Recommender(model, tok.vocab, codes, unseen_domains=["books"], item_embeddings=emb, unseen_frame=frame)
    return tok, codes, emb, model, rec


def test_hybrid_scores_fuse_generative_and_dense():
    tok, codes, emb, model, rec = _trained_recommender()
    hist, cands = [[3, 17, 42], [5]], [[1, 2, 3, 9], [4, 7]]
    gen = rec.score(hist, cands, domain="books", mode="generative")
    dense = rec.score(hist, cands, domain="books", mode="dense")
    hyb = rec.score(hist, cands, domain="books", mode="hybrid")
    w = rec.fusion_weight("books")
    for g, d, y in zip(gen, dense, hyb):
        np.testing.assert_allclose(y, (1 - w) * g + w * d, rtol=1e-6)
    # the dense score of a candidate is the kernel mixture under the model's own history weights
    with model.content_only():
        toks = recbase.recommend.history_tokens(hist, codes["books"], tok.vocab)
        st, _ = model.start_generation(toks, item_vectors=[torch.from_numpy(emb["books"][h]) for h in hist])
    e = unit_rows(torch.from_numpy(emb["books"]).double())
    tau = float(model.dense_temperature().detach())
    for b, h in enumerate(hist):
        wb = st.history_weights[b, :len(h)].double()
        ref = [torch.log((wb * torch.exp(e[h] @ e[c] / tau)).sum()).item() for c in cands[b]]
        np.testing.assert_allclose(dense[b], ref, rtol=1e-4, atol=1e-4)
    # recommend: dense mode is the exact top-k of the dense score over the catalog
    items, scores = rec.recommend(hist, k=5, domain="books", mode="dense")
    full = rec.score(hist, [np.arange(200)] * 2, domain="books", mode="dense")
    for b, h in enumerate(hist):
        s = full[b].copy()
        s[h] = -np.inf
        np.testing.assert_allclose(np.sort(scores[b])[::-1], np.sort(s)[::-1][:5], rtol=1e-4, atol=1e-4)
    items, _ = rec.recommend(hist, k=5, domain="books", mode="hybrid", num_beams=10)
    for b, h in enumerate(hist):
        assert not set(items[b].tolist()) & set(h) and (items[b] >= 0).all()


def test_unordered_domain_is_read_as_a_set():
    from recbase.recommend import SET_PERMUTATIONS, _SET_SEED
    tok, codes, emb, model, rec = _trained_recommender()
    rec.add_catalog("books", codes["books"], unseen=True, item_embeddings=emb["books"], unordered=True)
    rng = np.random.default_rng(5)
    # one history inside the context (7 items read), one longer than it
    hist = [rng.choice(200, size=5, replace=False), rng.choice(200, size=12, replace=False)]
    cands = [rng.choice(200, size=9, replace=False) for _ in hist]
    got = rec.score(hist, cands, domain="books", mode="dense")
    # the order given never matters
    shuffled = rec.score([h[rng.permutation(len(h))] for h in hist], cands, domain="books", mode="dense")
    for a, b in zip(got, shuffled):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # brute force: the model's weights over each seeded ordering of the sorted set, averaged per item
    e = unit_rows(torch.from_numpy(emb["books"]).double())
    tau = float(model.dense_temperature().detach())
    for b, h in enumerate(hist):
        items = np.sort(h)
        weight = {int(i): 0.0 for i in items}
        for p in range(SET_PERMUTATIONS):
            order = items[np.random.default_rng([_SET_SEED, len(items), p]).permutation(len(items))][-rec.max_items:]
            toks = recbase.recommend.history_tokens([order], codes["books"], tok.vocab)
            with model.content_only():
                st, _ = model.start_generation(toks, item_vectors=[torch.from_numpy(emb["books"][order])])
            for j, i in enumerate(order):
                weight[int(i)] += float(st.history_weights[0, j]) / SET_PERMUTATIONS
        assert abs(sum(weight.values()) - 1.0) < 1e-5
        if len(h) > rec.max_items:  # items beyond the context are read too
            assert sum(v > 0 for v in weight.values()) > rec.max_items
        ref = [np.log(sum(w * np.exp(float(e[i] @ e[c]) / tau) for i, w in weight.items())) for c in cands[b]]
        np.testing.assert_allclose(got[b], ref, rtol=1e-4, atol=1e-4)
    # the generative channel still reads the given order; recommend uses the same set reading
    items, scores = rec.recommend(hist, k=5, domain="books", mode="dense")
    full = rec.score(hist, [np.arange(200)] * 2, domain="books", mode="dense")
    for b, h in enumerate(hist):
        s_ = full[b].copy()
        s_[h] = -np.inf
        np.testing.assert_allclose(scores[b], np.sort(s_)[::-1][:5], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unordered_domains"):
        Recommender(model, tok.vocab, codes, unordered_domains=["games"])
    with pytest.raises(TypeError, match="unordered_domains"):
        Recommender(model, tok.vocab, codes, unordered_domains="books")


def test_aligned_reading_is_invariant_to_rotating_the_unseen_domain():
    tok, codes, emb, model, rec = _trained_recommender(frame="aligned")
    hist, cands = [[3, 17, 42], [5, 8]], [[1, 2, 3, 9, 150], [4, 7, 199]]
    before = {m: rec.score(hist, cands, domain="books", mode=m) for m in ("generative", "dense", "hybrid")}
    q, _ = torch.linalg.qr(torch.from_numpy(np.random.default_rng(7).normal(size=(16, 16))))
    q = q.float().numpy()
    model.set_concept_vectors(np.asarray(tok.quantizer.codebooks) @ q)  # every codebook turned by Q
    turned = dict(emb, books=emb["books"] @ q)  # and every book embedding
    rec2 = Recommender(model, tok.vocab, codes, unseen_domains=["books"], item_embeddings=turned,
                       unseen_frame="aligned")
    for m, ref in before.items():
        for a, b in zip(ref, rec2.score(hist, cands, domain="books", mode=m)):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_frame_alignment_is_equivariant():
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(200, 6)) * np.arange(1, 7), rng.normal(size=(300, 6)) * np.arange(6, 0, -1)
    t += rng.exponential(size=t.shape)  # skewed, so the signs are defined
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    r, r2 = frame_alignment(t, s).numpy(), frame_alignment(t @ q, s).numpy()
    np.testing.assert_allclose(t @ r, (t @ q) @ r2, atol=1e-8)
    np.testing.assert_allclose(r @ r.T, np.eye(6), atol=1e-10)


def test_fusion_weights_and_dense_head_survive_save_load(tmp_path):
    tok, codes, emb, model, rec = _trained_recommender()
    hist = [[3, 17, 42], [5]]
    choose_fusion(rec, "movies", [[1, 2, 3], [4, 5]], [6, 7], reading="unseen", num_beams=10)
    model.config.fusion_weights = {"seen": 0.3, "unseen": 0.7}
    before = rec.score(hist, [[1, 2], [3]], domain="books", mode="hybrid")
    model.save_pretrained(tmp_path / "m")
    loaded = recbase.RecBaseForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.fusion_weights == {"seen": 0.3, "unseen": 0.7}
    assert loaded.config.item_vector_dim == 16
    rec2 = Recommender(loaded, tok.vocab, codes, unseen_domains=["books"], item_embeddings=emb)
    for a, b in zip(before, rec2.score(hist, [[1, 2], [3]], domain="books", mode="hybrid")):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_bad_input_names_the_argument():
    tok, codes, emb, model = _tiny()
    with pytest.raises(ValueError, match=r"item_embeddings\['books'\].*shape"):
        Recommender(model, tok.vocab, codes, item_embeddings={"books": emb["books"][:, :8]})
    with pytest.raises(ValueError, match=r"item_embeddings\['books'\].*shape"):
        Recommender(model, tok.vocab, codes, item_embeddings={"books": emb["books"][:10]})
    bad = emb["books"].copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"item_embeddings\['books'\].*NaN"):
        Recommender(model, tok.vocab, codes, item_embeddings={"books": bad})
    rec = Recommender(model, tok.vocab, codes, item_embeddings=emb)
    with pytest.raises(ValueError, match="mode: expected one of"):
        rec.recommend([[1]], k=2, domain="books", mode="fused")
    with pytest.raises(ValueError, match="mode: expected one of"):
        rec.score([[1]], [[2]], domain="books", mode="bm25")
    plain = Recommender(model, tok.vocab, codes)
    with pytest.raises(ValueError, match="needs item_embeddings"):
        plain.recommend([[1]], k=2, domain="books", mode="dense")
    half = Recommender(model, tok.vocab, codes, item_embeddings={"movies": emb["movies"]})
    with pytest.raises(ValueError, match="needs item_embeddings of domain 'books'"):
        half.score([[1]], [[2]], domain="books", mode="hybrid")
    assert half.recommend([[1]], k=2, domain="books")[0].shape == (1, 2)  # default: generative there
    with pytest.raises(ValueError, match="item_vectors embeddings"):
        ItemVectors(tok.tokens(codes["movies"]), emb["movies"][:5], 32)
    with pytest.raises(ValueError, match="NaN"):
        ItemVectors(tok.tokens(codes["movies"]), np.full((300, 16), np.nan, np.float32), 32)
    with pytest.raises(ValueError, match="item_vector_dim is 16"):
        Trainer(model, [[1, 4, 40]], [], TrainConfig(progress=False),
                item_vectors=ItemVectors(tok.tokens(codes["movies"]), emb["movies"][:, :4], 32))
    with pytest.raises(ValueError, match="item_vectors: expected a float tensor of shape"):
        model(input_ids=torch.tensor([[1, 4, 40]]), return_loss=True, item_vectors=torch.zeros(1, 3, 5))
    with pytest.raises(ValueError, match="item_vector_dim"):
        recbase.RecBaseConfig(concept_vector_dim=8, item_vector_dim=16)
    with pytest.raises(ValueError, match="fusion_weights"):
        recbase.RecBaseConfig(fusion_weights={"seen": 1.5})
    with pytest.raises(ValueError, match="unseen_frame"):
        Recommender(model, tok.vocab, codes, unseen_frame="pca")


def test_a_catalog_whose_codes_stop_below_k_is_searched_on_the_models_k():
    tok, codes, emb, model, rec = _trained_recommender()
    pick = np.flatnonzero(codes["books"].max(1) < 20)[:4]  # codes far below K = 32
    small = codes["books"][pick]
    assert len(small) == 4 and small.max() < model.config.codebook_size - 1  # the trie must not infer K
    rec.add_catalog("few", small, unseen=True, item_embeddings=emb["books"][pick])
    for mode in ("generative", "dense", "hybrid"):
        items, scores = rec.recommend([[0], [1]], k=2, domain="few", num_beams=4, mode=mode)
        assert ((items >= 0) & (items < 4)).all() and np.isfinite(scores).all()
        assert 0 not in items[0] and 1 not in items[1]
    with pytest.raises(ValueError, match=r"catalogs\['bad'\]: codes must lie in \[0, 32\)"):
        rec.add_catalog("bad", small + 32, unseen=True)
    with pytest.raises(ValueError, match=r"catalogs\['bad'\]: expected \(N, 2\) concept IDs"):
        rec.add_catalog("bad", small[:, :1], unseen=True)


def test_a_nan_model_raises_instead_of_recommending():
    tok, codes, emb, model, rec = _trained_recommender()
    with torch.no_grad():
        model.dense_query.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="dense head gave NaN"):
        rec.recommend([[1, 2]], k=3, domain="books", mode="dense")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    for mode in ("generative", "hybrid"):
        with pytest.raises(ValueError, match="NaN"):
            rec.recommend([[1, 2]], k=3, domain="books", mode=mode, num_beams=5)
        with pytest.raises(ValueError, match="NaN"):
            rec.score([[1, 2]], [[3, 4]], domain="books", mode=mode)
