"""Rating prediction: the baselines against exact float64 solutions, the model's rating task
(leak-free reading, its loss against a reference, training that learns), the task mixture and
Recommender.predict_rating, with bad input."""
import numpy as np
import pytest
import torch

from recbase.baselines import BiasBaseline, GlobalMean, MatrixFactorization
from recbase.model import RecBaseConfig, RecBaseForCausalLM
from recbase.recommend import Recommender, denormalise_ratings, normalise_ratings
from recbase.tokenizer import ConceptVocab
from recbase.train import Trainer, TrainConfig

L, K = 2, 6


def _synthetic(seed=0, users=120, items=50, rank=3, noise=0.3, per_user=15):
    rng = np.random.default_rng(seed)
    pu, qi = rng.normal(size=(users, rank)), rng.normal(size=(items, rank))
    bu, bi = rng.normal(0, 0.5, users), rng.normal(0, 0.5, items)
    u = np.repeat(np.arange(users), per_user)
    i = np.concatenate([rng.choice(items, per_user, replace=False) for _ in range(users)])
    clean = 3.0 + bu[u] + bi[i] + (pu[u] * qi[i]).sum(1)
    return u, i, clean + rng.normal(0, noise, len(u)), clean


# ---------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------
def test_bias_baseline_reaches_the_exact_regularised_least_squares_solution():
    u, i, r, _ = _synthetic(users=30, items=12, per_user=6)
    m = BiasBaseline(reg_u=3.0, reg_i=2.0, iterations=400).fit(u, i, r)
    nu, ni = u.max() + 1, i.max() + 1
    x = np.zeros((len(r), nu + ni))
    x[np.arange(len(r)), u] = 1.0
    x[np.arange(len(r)), nu + i] = 1.0
    reg = np.r_[np.full(nu, 3.0), np.full(ni, 2.0)]
    ref = np.linalg.solve(x.T @ x + np.diag(reg), x.T @ (r - r.mean()))
    np.testing.assert_allclose(m.bu, ref[:nu], atol=1e-8)
    np.testing.assert_allclose(m.bi, ref[nu:], atol=1e-8)
    np.testing.assert_allclose(m.predict(u[:5], i[:5]), r.mean() + ref[u[:5]] + ref[nu + i[:5]], atol=1e-8)
    # an unknown user or item gets bias 0
    assert m.predict([nu + 3], [0])[0] == pytest.approx(r.mean() + ref[nu])


def test_matrix_factorization_solves_each_half_step_exactly_and_never_increases_its_loss():
    u, i, r, _ = _synthetic(users=40, items=20, per_user=8)
    m = MatrixFactorization(factors=4, reg=0.1, iterations=6, seed=1).fit(u, i, r)
    assert all(b <= a + 1e-9 for a, b in zip(m.history, m.history[1:]))
    # the last half-step solved the items exactly: the loss's gradient in every [q_i, b_i] is 0
    err = r - m.predict(u, i)
    ni = np.bincount(i, minlength=len(m.bi))
    grad_q = -2 * np.stack([np.bincount(i, err * m.p[u][:, f], minlength=len(m.bi)) for f in range(4)], 1) \
        + 2 * m.reg * ni[:, None] * m.q
    grad_b = -2 * np.bincount(i, err, minlength=len(m.bi)) + 2 * m.reg * ni * m.bi
    assert np.abs(grad_q).max() < 1e-8 and np.abs(grad_b).max() < 1e-8


def test_matrix_factorization_recovers_low_rank_ratings_better_than_the_biases():
    u, i, r, clean = _synthetic(seed=2, users=200, items=60, rank=3, noise=0.2, per_user=30)
    held = np.random.default_rng(0).random(len(r)) < 0.1
    mf = MatrixFactorization(factors=3, reg=0.02, iterations=20).fit(u[~held], i[~held], r[~held])
    bias = BiasBaseline().fit(u[~held], i[~held], r[~held])
    mean = GlobalMean().fit(u[~held], i[~held], r[~held])

    def rmse(m):
        return float(np.sqrt(((m.predict(u[held], i[held]) - r[held]) ** 2).mean()))
    assert rmse(mf) < 0.6 * rmse(bias) and rmse(bias) < rmse(mean)
    with pytest.raises(ValueError, match="one entry per rating"):
        MatrixFactorization().fit([0, 1], [0], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        BiasBaseline().fit([0], [0], [np.nan])


# ---------------------------------------------------------------------------------------------
# the model's rating task
# ---------------------------------------------------------------------------------------------
def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = RecBaseConfig.from_preset("tiny", levels=L, codebook_size=K, max_items=8, rating_task=True, **kw)
    return RecBaseForCausalLM(cfg).eval()


def _rate_batch(rng, n_items=5):
    vocab = ConceptVocab(L, K)
    codes = rng.integers(0, K, size=(n_items, L))
    ids = torch.as_tensor(np.r_[vocab.BOS, vocab.to_tokens(codes).reshape(-1)])[None]
    r = rng.uniform(-1, 1, n_items)
    per_token = torch.as_tensor(np.r_[np.nan, np.repeat(r, L)], dtype=torch.float32)[None]
    return ids, per_token, r


def test_an_items_rating_is_read_only_by_later_items():
    model = _model()
    rng = np.random.default_rng(0)
    ids, ratings, _ = _rate_batch(rng)
    task = torch.tensor([1])
    base = model(ids, task_ids=task, ratings=ratings, output_logits=False).rating_predictions[0]
    ends = torch.arange(L, ids.shape[1], L)
    assert torch.isnan(base[~torch.isin(torch.arange(ids.shape[1]), ends)]).all()
    for t in range(5):  # change item t's rating: predictions of items <= t stay, later ones move
        changed = ratings.clone()
        changed[0, 1 + L * t:1 + L * (t + 1)] = -changed[0, 1 + L * t] if changed[0, 1 + L * t] != 0 else 0.5
        got = model(ids, task_ids=task, ratings=changed, output_logits=False).rating_predictions[0]
        assert torch.equal(got[ends[:t + 1]], base[ends[:t + 1]])
        if t < 4:
            assert not torch.allclose(got[ends[t + 1]], base[ends[t + 1]])
    # the same sequence as a next-item sequence (task 0) reads no rating and predicts none
    plain = model(ids, task_ids=torch.tensor([0]), output_logits=False)
    assert torch.isnan(plain.rating_predictions).all()


def test_rating_loss_equals_a_float64_reference_and_joins_the_total():
    model = _model(rating_loss_weight=0.5)
    rng = np.random.default_rng(1)
    ids, ratings, r = _rate_batch(rng)
    ratings[0, 1 + L * 2:1 + L * 3] = float("nan")  # an unrated item: no target
    out = model(ids, task_ids=torch.tensor([1]), ratings=ratings, return_loss=True)
    pred = out.rating_predictions[0, torch.arange(L, ids.shape[1], L)].double().detach().numpy()
    keep = np.arange(5) != 2
    ref = ((pred[keep] - r[keep]) ** 2).mean()
    assert float(out.rating_loss) == pytest.approx(ref, rel=1e-5)
    # total = the next-concept CE (from the logits, float64) + 0.5 x the rating MSE
    full = model(ids, task_ids=torch.tensor([1]), ratings=ratings, return_loss=True, output_logits=True)
    lp = torch.log_softmax(full.logits[0].double(), -1)
    nl = full.next_levels[0]
    codes = ids[0, 1:] - 4 - nl[:-1] * K
    ce = -lp[torch.arange(ids.shape[1] - 1), codes].mean()
    assert float(out.loss) == pytest.approx(float(ce) + 0.5 * ref, rel=1e-5)
    out.loss.backward()
    assert model.rating_head.weight.grad is not None and model.model.rating_start.grad.abs().sum() > 0


def test_rating_inputs_are_checked():
    model = _model()
    rng = np.random.default_rng(2)
    ids, ratings, _ = _rate_batch(rng)
    with pytest.raises(ValueError, match="rating_task=True"):
        RecBaseForCausalLM(RecBaseConfig.from_preset("tiny", levels=L, codebook_size=K))(ids, task_ids=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model(ids, task_ids=torch.tensor([1]), ratings=ratings * 3)
    with pytest.raises(ValueError, match="next-item sequence"):
        model(ids, task_ids=torch.tensor([0]), ratings=ratings)
    with pytest.raises(ValueError, match="one task per sequence"):
        model(ids, task_ids=torch.tensor([1, 0]), ratings=ratings)
    with pytest.raises(ValueError, match="0 \\(next item\\) or 1"):
        model(ids, task_ids=torch.tensor([2]))
    with pytest.raises(ValueError, match="start with BOS"):
        model(ids[:, 1:], task_ids=torch.tensor([1]))
    with pytest.raises(ValueError, match="shaped like input_ids"):
        model(ids, task_ids=torch.tensor([1]), ratings=ratings[:, 1:])
    with pytest.raises(ValueError, match="rating_loss_weight"):
        RecBaseConfig(levels=L, codebook_size=K, rating_task=True, rating_loss_weight=-1)
    with pytest.raises(ValueError, match="rating_scales"):
        RecBaseConfig(levels=L, codebook_size=K, rating_scales={"movies": [5, 1]})


# ---------------------------------------------------------------------------------------------
# training with a task mixture, then Recommender.predict_rating
# ---------------------------------------------------------------------------------------------
N_ITEMS = 30


@pytest.fixture(scope="module")
def rated_world():
    """Items with an intrinsic quality and users with a leniency: rating = clip(3 + q_i + l_u);
    histories are walks (so the next-item task has something to learn too)."""
    rng = np.random.default_rng(0)
    rows = rng.choice(K ** L, size=N_ITEMS, replace=False)
    codes = np.stack([(rows // K ** (L - 1 - l)) % K for l in range(L)], 1).astype(np.int64)
    quality = rng.choice([-1.5, -0.5, 0.5, 1.5], size=N_ITEMS)
    nxt = rng.permutation(N_ITEMS)

    def users(n, seed):
        r = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            seq = [int(r.integers(N_ITEMS))]
            for _ in range(int(r.integers(3, 7))):
                seq.append(int(nxt[seq[-1]]))
            lenient = r.choice([-0.5, 0.5])
            out.append((np.array(seq), np.clip(np.round(3 + quality[seq] + lenient), 1, 5)))
        return out
    return codes, users


def test_task_draws_are_a_seeded_pure_function_with_the_configured_share(rated_world):
    codes, users = rated_world
    vocab = ConceptVocab(L, K)
    data = users(200, 1)
    seqs = [np.r_[vocab.BOS, vocab.to_tokens(codes[s]).reshape(-1)] for s, _ in data]
    rates = [normalise_ratings(r, (1, 5)) for _, r in data]
    cfg = TrainConfig(epochs=1, progress=False, tasks={"sequential": 3, "rating": 1})
    a, b = (Trainer(_model(), seqs, seqs[:5], cfg, ratings=rates) for _ in range(2))
    draws = [[a.is_rating_example(i, step) for i in range(200)] for step in range(10)]
    assert draws == [[b.is_rating_example(i, step) for i in range(200)] for step in range(10)]
    assert 0.2 < np.mean(draws) < 0.3 and draws[0] != draws[1]
    with pytest.raises(ValueError, match="tasks"):
        Trainer(_model(), seqs, seqs[:5], TrainConfig(tasks={"rating": 1, "explain": 1}), ratings=rates)
    with pytest.raises(ValueError, match="needs Trainer\\(ratings"):
        Trainer(_model(), seqs, seqs[:5], cfg)
    with pytest.raises(ValueError, match=r"ratings\[0\]: expected one rating per item"):
        Trainer(_model(), seqs, seqs[:5], cfg, ratings=[r[:-1] for r in rates])
    with pytest.raises(ValueError, match="rating_task=True"):
        Trainer(RecBaseForCausalLM(RecBaseConfig.from_preset("tiny", levels=L, codebook_size=K, max_items=8)),
                seqs, seqs[:5], cfg, ratings=rates)


def test_a_multi_task_model_learns_ratings_and_predict_rating_reads_them(rated_world, tmp_path):
    codes, users = rated_world
    vocab = ConceptVocab(L, K)
    train = users(400, 1)
    seqs = [np.r_[vocab.BOS, vocab.to_tokens(codes[s]).reshape(-1)] for s, _ in train]
    rates = [normalise_ratings(r, (1, 5)) for _, r in train]
    model = _model(seed=3)
    model.config.rating_scales = {"toy": [1.0, 5.0]}
    Trainer(model, seqs, seqs[:40], TrainConfig(epochs=10, tokens_per_batch=1024, lr=5e-3, warmup_steps=5,
                                                progress=False, patience=20,
                                                tasks={"sequential": 1, "rating": 1}), ratings=rates).fit()
    model.eval()
    rec = Recommender(model, vocab, {"toy": codes})
    test = users(150, 2)
    hist = [s[:-1] for s, _ in test]
    hist_r = [r[:-1] for _, r in test]
    target = np.array([s[-1] for s, _ in test])
    truth = np.array([r[-1] for _, r in test])
    pred = rec.predict_rating(hist, hist_r, target)
    assert ((pred >= 1) & (pred <= 5)).all()
    train_mean = np.concatenate([r for _, r in train]).mean()
    rmse = np.sqrt(((pred - truth) ** 2).mean())
    assert rmse < 0.6 * np.sqrt(((train_mean - truth) ** 2).mean())  # item quality and user leniency learned

    # predict_rating equals one forward of the RATE sequence it describes (float64 reference)
    b = 0
    seq = np.r_[hist[b], target[b]]
    ids = torch.as_tensor(np.r_[vocab.BOS, vocab.to_tokens(codes[seq]).reshape(-1)])[None]
    per_token = torch.as_tensor(np.r_[np.nan, np.repeat(normalise_ratings(hist_r[b], (1, 5)), L), [np.nan] * L],
                                dtype=torch.float32)[None]
    with torch.no_grad():
        raw = model(ids, task_ids=torch.tensor([1]), ratings=per_token, output_logits=False).rating_predictions[0, -1]
    assert pred[b] == pytest.approx(float(np.clip(denormalise_ratings(float(raw), (1, 5)), 1, 5)), abs=1e-5)

    # saved and loaded with its rating scale and rating modules
    model.save_pretrained(tmp_path / "m")
    again = RecBaseForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.config.rating_scales == {"toy": [1.0, 5.0]}
    np.testing.assert_allclose(Recommender(again, vocab, {"toy": codes}).predict_rating(hist, hist_r, target), pred,
                               atol=1e-5)

    # bad input: clear errors naming the argument
    with pytest.raises(ValueError, match=r"history_ratings\[0\]: rating 7 is outside the domain's scale \[1, 5\]"):
        rec.predict_rating([hist[0]], [np.r_[hist_r[0][:-1], 7.0]], target[:1])
    with pytest.raises(ValueError, match=r"history_ratings\[0\]: expected one rating per history item"):
        rec.predict_rating([hist[0]], [hist_r[0][:-1]], target[:1])
    with pytest.raises(ValueError, match="out of range"):
        rec.predict_rating([hist[0]], [hist_r[0]], [N_ITEMS])
    with pytest.raises(ValueError, match="one integer item index per history"):
        rec.predict_rating([hist[0], hist[1]], [hist_r[0], hist_r[1]], target[:1])
    with pytest.raises(ValueError, match="no rating scale for domain 'other'"):
        Recommender(model, vocab, {"other": codes}).predict_rating([hist[0]], [hist_r[0]], target[:1])
    # an unrated history item (NaN) is fine; another scale can be given
    assert np.isfinite(rec.predict_rating([hist[0]], [np.full(len(hist[0]), np.nan)], target[:1])).all()
    # another scale: ratings on [2, 10] read the same normalised values, predictions scale with them
    np.testing.assert_allclose(rec.predict_rating(hist[:5], [r * 2 for r in hist_r[:5]], target[:5], scale=(2, 10)),
                               2 * pred[:5], atol=1e-5)
    plain = Recommender(RecBaseForCausalLM(RecBaseConfig.from_preset("tiny", levels=L, codebook_size=K)), vocab,
                        {"toy": codes})
    with pytest.raises(ValueError, match="rating task"):
        plain.predict_rating([hist[0]], [hist_r[0]], target[:1])
