"""Direct recommendation among given candidates (P5's protocol): candidate sampling, the rank
metrics against hand-computed values and a brute-force sort, and Recommender.rank_candidates
against a full-forward likelihood ranking."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recbase.evaluate import CandidateSets, candidate_ranks, evaluate_candidates, sample_candidate_sets
from recbase.model import RecBaseConfig, RecBaseForCausalLM
from recbase.recommend import Recommender
from recbase.tokenizer import ConceptVocab
from recbase.train import Trainer, TrainConfig

L, K, N_ITEMS = 2, 8, 40


def test_candidate_sets_hold_the_target_and_unseen_negatives():
    rng = np.random.default_rng(0)
    n, users = 500, 30
    targets = rng.integers(0, n, size=users)
    exclude = [rng.choice(n, size=int(rng.integers(0, 60)), replace=False) for _ in range(users)]
    sets = sample_candidate_sets(targets, n, exclude=exclude, num_negatives=99, seed=3)
    assert sets.items.shape == (users, 100)
    for u in range(users):
        row = sets.items[u]
        assert row[sets.positive[u]] == targets[u]
        neg = np.delete(row, sets.positive[u])
        assert len(set(neg.tolist())) == 99 and targets[u] not in neg
        assert not set(neg.tolist()) & set(exclude[u].tolist())
        assert ((row >= 0) & (row < n)).all()
    again = sample_candidate_sets(targets, n, exclude=exclude, num_negatives=99, seed=3)
    assert np.array_equal(sets.items, again.items) and np.array_equal(sets.positive, again.positive)
    other = sample_candidate_sets(targets, n, exclude=exclude, num_negatives=99, seed=4)
    assert not np.array_equal(sets.items, other.items)
    assert len(set(sets.positive.tolist())) > 5  # the positive's column is random, not fixed


def test_a_small_catalog_samples_exhaustively_and_too_small_a_catalog_is_refused():
    sets = sample_candidate_sets([0, 1], 6, exclude=[[2], [3]], num_negatives=4, seed=0)
    assert sorted(sets.items[0].tolist()) == [0, 1, 3, 4, 5] and sorted(sets.items[1].tolist()) == [0, 1, 2, 4, 5]
    with pytest.raises(ValueError, match="only 3 items"):
        sample_candidate_sets([0], 6, exclude=[[1, 2]], num_negatives=4)
    with pytest.raises(ValueError, match="targets"):
        sample_candidate_sets([6], 6)
    with pytest.raises(ValueError, match="num_negatives"):
        sample_candidate_sets([0], 6, num_negatives=0)
    with pytest.raises(ValueError, match="exclude"):
        sample_candidate_sets([0, 1], 6, exclude=[[2]])


def test_metrics_by_hand():
    # user 0: positive (col 1) scores best -> rank 1; user 1: two candidates above it -> rank 3;
    # user 2: tied with the candidate in an earlier column -> rank 2 (ties go to the earlier column)
    sets = CandidateSets(np.arange(12).reshape(3, 4), np.array([1, 0, 2]))
    scores = np.array([[0.1, 0.9, 0.2, 0.3], [0.5, 0.7, 0.6, 0.1], [0.1, 0.8, 0.8, 0.2]])
    assert candidate_ranks(scores, sets).tolist() == [1, 3, 2]
    m = evaluate_candidates(scores, sets, ks=(1, 2, 3))
    assert m["hr@1"] == pytest.approx(1 / 3) and m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["hr@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / np.log2(3)) / 3)
    assert m["hr@3"] == pytest.approx(1.0)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(4)) / 3)
    per = np.array([1.0, 0.0, 1.0])
    assert m["se_hr@2"] == pytest.approx(per.std(ddof=1) / np.sqrt(3))
    with pytest.raises(ValueError, match="NaN"):
        evaluate_candidates(np.where(scores > 0.85, np.nan, scores), sets)
    with pytest.raises(ValueError, match="scores must be"):
        evaluate_candidates(scores[:, :3], sets)
    with pytest.raises(ValueError, match="ks"):
        evaluate_candidates(scores, sets, ks=(5,))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(2, 9), st.integers(0, 2 ** 31 - 1))
def test_ranks_equal_a_brute_force_sort(users, width, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(users, width)).astype(np.float64)  # many ties
    sets = CandidateSets(rng.integers(0, 100, size=(users, width)), rng.integers(0, width, size=users))
    ref = []
    for u in range(users):
        order = sorted(range(width), key=lambda c: (-scores[u, c], c))  # best first, ties by column
        ref.append(order.index(int(sets.positive[u])) + 1)
    assert candidate_ranks(scores, sets).tolist() == ref


# ---------------------------------------------------------------------------------------------
# Recommender.rank_candidates on a model that learned a walk
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def walk_model():
    rng = np.random.default_rng(0)
    rows = rng.choice(K ** L, size=N_ITEMS, replace=False)
    codes = np.stack([(rows // K ** (L - 1 - l)) % K for l in range(L)], 1).astype(np.int64)
    nxt = rng.permutation(N_ITEMS)
    vocab = ConceptVocab(L, K)
    tokens = vocab.to_tokens(codes)

    def walks(n, seed):
        r = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            seq = [int(r.integers(N_ITEMS))]
            for _ in range(int(r.integers(3, 8))):
                seq.append(int(nxt[seq[-1]]))
            out.append(np.array(seq))
        return out

    seqs = [np.r_[vocab.BOS, tokens[s].reshape(-1)] for s in walks(300, 1)]
    torch.manual_seed(0)
    model = RecBaseForCausalLM(RecBaseConfig.from_preset("tiny", levels=L, codebook_size=K, max_items=10))
    Trainer(model, seqs, seqs[:30], TrainConfig(epochs=8, tokens_per_batch=2048, lr=1e-2, warmup_steps=3,
                                                progress=False, patience=10)).fit()
    return model.eval(), vocab, codes, nxt, walks


def _likelihood(model, vocab, codes, history, item) -> float:
    tokens = vocab.to_tokens(codes)
    seq = torch.as_tensor(np.r_[vocab.BOS, tokens[history].reshape(-1), tokens[item]])[None]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=seq, output_logits=True).logits[0].double(), -1)
    start = 1 + L * len(history)
    return sum(float(lp[start - 1 + l, codes[item, l]]) for l in range(L))


def test_rank_candidates_equals_the_full_forward_likelihood_ranking(walk_model):
    model, vocab, codes, nxt, walks = walk_model
    rec = Recommender(model, vocab, {"toy": codes})
    rng = np.random.default_rng(5)
    hist = [s[:-1] for s in walks(6, 7)]
    cands = [rng.choice(N_ITEMS, size=int(rng.integers(1, 12)), replace=False) for _ in hist]
    items, scores = rec.rank_candidates(hist, cands)
    top3, _ = rec.rank_candidates(hist, cands, k=3)
    for h, c, got_i, got_s, got3 in zip(hist, cands, items, scores, top3):
        ref = {int(i): _likelihood(model, vocab, codes, h, i) for i in c}
        assert sorted(got_i.tolist()) == sorted(c.tolist())
        assert np.all(np.diff(got_s) <= 0)  # best first
        # each place holds an item whose float64 likelihood is the reference's at that place
        # (items whose likelihoods tie within float tolerance may swap)
        np.testing.assert_allclose([ref[int(i)] for i in got_i], sorted(ref.values(), reverse=True), atol=1e-4)
        np.testing.assert_allclose(got_s, [ref[int(i)] for i in got_i], atol=1e-4)
        assert got3.tolist() == got_i[:3].tolist()


def test_a_model_that_learned_the_walk_ranks_the_next_item_first(walk_model):
    model, vocab, codes, nxt, walks = walk_model
    rec = Recommender(model, vocab, {"toy": codes})
    hist = [s[:-1] for s in walks(80, 11)]
    targets = np.array([nxt[h[-1]] for h in hist])
    sets = sample_candidate_sets(targets, N_ITEMS, exclude=hist, num_negatives=19, seed=0)
    m = evaluate_candidates(np.stack(rec.score(hist, list(sets.items))), sets, ks=(1, 5))
    assert m["hr@1"] > 0.4  # a random ranking: 1/20


def test_rank_candidates_refuses_bad_candidate_lists(walk_model):
    model, vocab, codes, _, _ = walk_model
    rec = Recommender(model, vocab, {"toy": codes})
    with pytest.raises(ValueError, match=r"candidates\[1\]: expected a non-empty"):
        rec.rank_candidates([[1, 2], [3]], [[4, 5], []])
    with pytest.raises(ValueError, match=r"candidates\[0\]: item index .* out of range"):
        rec.rank_candidates([[1, 2]], [[4, N_ITEMS]])
    with pytest.raises(ValueError, match=r"candidates\[0\]: item index 4 is listed twice"):
        rec.rank_candidates([[1, 2]], [[4, 5, 4]])
    with pytest.raises(ValueError, match="integer item indices"):
        rec.rank_candidates([[1, 2]], [["a", "b"]])
    with pytest.raises(ValueError, match="one list per history"):
        rec.rank_candidates([[1, 2], [3]], [[4, 5]])
    with pytest.raises(ValueError, match="k: expected"):
        rec.rank_candidates([[1, 2]], [[4, 5]], k=0)
    rec.remove_items(None, [rec.item_ids["toy"][5]])
    with pytest.raises(ValueError, match="was removed"):
        rec.rank_candidates([[1, 2]], [[4, 5]])
