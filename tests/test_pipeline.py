"""Pipeline stages shared by the demo, the CLI and users' scripts: the CTR protocol on a domain
(``ctr_auc``) and the zero-shot text-sequence peer trained on several domains (``fit_text_sasrec``)."""
import numpy as np
import pandas as pd
import pytest
import torch

from recbase.data.splits import leave_one_out
from recbase.pipeline import DomainData, ctr_auc, fit_text_sasrec

torch.set_num_threads(1)


def _split(seed, users=30, items=25, length=(3, 16)):
    rng = np.random.default_rng(seed)
    rows = [(f"u{u}", f"i{i}", t) for u in range(users)
            for t, i in enumerate(rng.choice(items, size=rng.integers(*length), replace=False))]
    return leave_one_out(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]))


def _auc_reference(hist, cands, positives, score):
    """Mean over users of P(score(pos) > score(neg)) + 0.5 P(tie), by brute force over pairs."""
    out = []
    for h, c, p in zip(hist, cands, positives):
        s = score(h, c)
        lab = np.isin(c, p)
        pos, neg = s[lab], s[~lab]
        out.append(np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg]))
    return float(np.mean(out))


@pytest.mark.parametrize("on_valid", [False, True])
def test_ctr_auc_pairs_the_tail_of_each_sequence_against_unseen_items(on_valid):
    split = _split(0)
    users = np.arange(split.num_users)
    seen = {}

    def record(h, c):  # the scorer sees the histories and candidates ctr_auc built
        seen["h"], seen["c"] = h, c
        return [np.zeros(len(x)) for x in c]

    def oracle(h, c):  # knows each user's sequence: scores the held-out tail items above the rest
        return [np.isin(x, tail[u]).astype(float) for u, x in enumerate(c)]

    rng = np.random.default_rng(1)

    source = split.train_sequences if on_valid else split.sequences
    kept = [u for u in users if len(source[u]) >= 2]
    tail = [np.asarray(source[u])[-min(10, len(source[u]) // 2):] for u in kept]
    aucs = ctr_auc(split, users, {"record": record, "oracle": oracle}, on_valid=on_valid, seed=3)
    assert aucs["record"] == pytest.approx(0.5) and aucs["oracle"] == pytest.approx(1.0)
    for u, h, c, t in zip(kept, seen["h"], seen["c"], tail):
        np.testing.assert_array_equal(np.r_[h, t], source[u])  # history + positives = the sequence
        assert set(t) <= set(c.tolist())
        negatives = set(c.tolist()) - set(t.tolist())
        assert len(negatives) == 10 and not negatives & set(np.asarray(split.sequences[u]).tolist())
    # any scorer: the mean per-user AUC of brute force over that user's pairs
    scores = {}

    def fixed(h, c):
        scores["s"] = [rng.normal(size=len(x)) for x in c]
        return scores["s"]

    got = ctr_auc(split, users, {"noisy": fixed}, on_valid=on_valid, seed=3)["noisy"]
    lookup = iter(scores["s"])
    ref = _auc_reference(seen["h"], seen["c"], tail, lambda h, c: next(lookup))
    assert got == pytest.approx(ref, abs=1e-12)


def test_fit_text_sasrec_reads_several_domains_as_one_catalog():
    a, b = _split(2, users=20, items=15), _split(3, users=25, items=18)
    rng = np.random.default_rng(0)
    domains = {"a": DomainData("a", a, rng.normal(size=(a.num_items, 8)).astype(np.float32)),
               "b": DomainData("b", b, rng.normal(size=(b.num_items, 8)).astype(np.float32)),
               "c": DomainData("c", _split(4), rng.normal(size=(25, 8)).astype(np.float32))}
    peer = fit_text_sasrec(domains, ["a", "b"], epochs=1, seed=0)
    assert peer.num_items == a.num_items + b.num_items
    # b's items follow a's in the joint catalog: scoring b's histories there (shifted) equals the
    # network's scores on b's catalog alone, restricted to b's rows
    hist = [np.asarray(h[-5:]) for h in b.test_histories[:6]]
    joint = peer.scores([h + a.num_items for h in hist])[:, a.num_items:]
    alone = peer.with_catalog(domains["b"].embeddings).scores(hist)
    np.testing.assert_allclose(joint, alone, rtol=1e-5, atol=1e-5)
    assert peer.with_catalog(domains["c"].embeddings).num_items == 25
    with pytest.raises(ValueError, match="train_on must name domains"):
        fit_text_sasrec(domains, ["a", "nope"])
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        fit_text_sasrec(domains, ["a"], epochs=0)


# ---------------------------------------------------------------------------------------------
# rating prediction stages
# ---------------------------------------------------------------------------------------------
def _rated_split(seed, users=40, items=20):
    rng = np.random.default_rng(seed)
    quality = rng.choice([1.0, 2.0, 4.0, 5.0], size=items)
    rows = [(f"u{u}", f"i{i}", t, quality[i]) for u in range(users)
            for t, i in enumerate(rng.choice(items, size=rng.integers(3, 12), replace=False))]
    return leave_one_out(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"]))


def test_split_ratings_follow_the_sequences_and_windows_follow_pretraining_sequences():
    from recbase.pipeline import rating_scale, rating_windows
    from recbase.recommend import normalise_ratings
    from recbase.train import pretraining_sequences

    sp = _rated_split(0)
    (hr, truth), items = sp.test_ratings, sp.test_targets
    quality = {}
    for s, r in zip(sp.sequences, sp.ratings):
        assert len(s) == len(r)
        quality.update(zip(s.tolist(), r.tolist()))
    assert all(quality[int(i)] == t for i, t in zip(items, truth))  # each target's own rating
    assert [len(x) for x in hr] == [len(h) for h in sp.test_histories]
    assert rating_scale(sp) == (1.0, 5.0)
    tokens = np.arange(4, 4 + 2 * sp.num_items).reshape(sp.num_items, 2)
    for recent in (None, 5):
        windows, _ = pretraining_sequences(sp, tokens, 1, 4, recent)
        rates = rating_windows(sp, 4, recent, (1.0, 5.0))
        assert len(windows) == len(rates)
        for w, r in zip(windows, rates):
            items_w = (w[1::2] - 4) // 2
            np.testing.assert_allclose(r, normalise_ratings([quality[int(i)] for i in items_w], (1, 5)))
    implicit = leave_one_out(pd.DataFrame({"user_id": ["u"] * 3, "item_id": list("abc"), "rating": 1.0}))
    assert rating_scale(implicit) is None


def test_evaluate_ratings_by_hand_and_the_baselines():
    from recbase.pipeline import evaluate_ratings, rating_baselines

    sp = _rated_split(1)
    users = np.arange(sp.num_users)
    truth = sp.test_ratings[1]
    const = evaluate_ratings(sp, users, {"three": lambda u, h, hr, i: np.full(len(u), 3.0)})[0]
    assert const["rmse"] == pytest.approx(np.sqrt(((truth - 3) ** 2).mean()))
    assert const["mae"] == pytest.approx(np.abs(truth - 3).mean())
    assert const["se_mae"] == pytest.approx(np.abs(truth - 3).std(ddof=1) / np.sqrt(len(truth)))
    rows = {r["model"]: r for r in evaluate_ratings(sp, users, rating_baselines(sp))}
    # ratings are an item property here: the item biases get far below the global mean
    assert rows["user + item bias"]["rmse"] < 0.7 * rows["global mean"]["rmse"]
    with pytest.raises(ValueError, match="expected 40 finite ratings"):
        evaluate_ratings(sp, users, {"bad": lambda u, h, hr, i: np.full(len(u), np.nan)})


def test_pretrain_domains_with_a_rating_share_trains_the_rating_task():
    from recbase.pipeline import PretrainSettings, pretrain_domains
    from recbase.tokenizer import ItemTokenizer

    sp = _rated_split(2)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(sp.num_items, 8)).astype(np.float32)
    tok = ItemTokenizer(levels=2, codebook_size=8, seed=0).fit(emb, progress=False)
    d = DomainData("toy", sp, emb, codes=tok.codes)
    s = PretrainSettings(preset="tiny", max_items=6, epochs=1, tokens_per_batch=256, content_rotation_rate=0.0,
                         recent_pass_epochs=0, dense=False, valid_users=10, progress=False,
                         tasks={"sequential": 1, "rating": 1})
    model = pretrain_domains({"toy": d}, tok, ["toy"], s).model
    assert model.config.rating_task and model.config.rating_scales == {"toy": [1.0, 5.0]}
    implicit = DomainData("imp", leave_one_out(pd.DataFrame({"user_id": ["u"] * 4, "item_id": list("abcd"),
                                                             "timestamp": range(4), "rating": 1.0})),
                          emb[:4], codes=tok.codes[:4])
    with pytest.raises(ValueError, match="has explicit ratings"):
        pretrain_domains({"imp": implicit}, tok, ["imp"], s)
