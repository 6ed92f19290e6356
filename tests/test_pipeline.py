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
