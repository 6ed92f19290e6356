"""The stages of recbase on a corpus, as functions the CLI and users' scripts call.

    corpus (recbase.data.corpus) -> prepare_domains   load, split, item text, embeddings
                                 -> tokenize_domains  one tokenizer on every domain's item text
                                 -> pretrain_domains  one model on the trained domains' sequences
                                 -> evaluate_domain   recbase next to popularity, text-kNN and
                                                      TextSASRec (fit_text_sasrec); ranking + AUC
    save_run / load_run: one folder holding the tokenizer, the model and what each domain was.

A domain left out of ``train_on`` is held out: its items are tokenized from their text (no
interaction is read), the model never trains on its sequences, and ``evaluate_domain`` reads it
zero-shot (by concept content alone, plus the dense channel when the model has one).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from recbase._atomic import atomic_file

__all__ = ["DomainData", "PretrainSettings", "Pretrained", "prepare_domains", "tokenize_domains", "pretrain_domains",
           "fit_text_sasrec", "ctr_auc", "direct_metrics", "evaluate_domain", "rating_scale", "rating_windows",
           "evaluate_ratings", "rating_baselines", "leave_one_domain_out", "sample_users", "save_run",
           "load_run"]

_RUN_FORMAT = 1


@dataclass
class DomainData:
    """One domain ready to train or evaluate on: its leave-one-out split, the (centred) text
    embeddings of its catalog (row = item index), whether its histories are ordered, its
    sampling weight, and its concept IDs once tokenized."""

    name: str
    split: object
    embeddings: np.ndarray
    ordered: bool = True
    weight: float = 1.0
    codes: np.ndarray | None = None


@dataclass
class PretrainSettings:
    """What ``pretrain_domains`` trains; the defaults are the demo's (docs/results.md)."""

    preset: str = "small"
    hidden_size: int | None = None  # None: the preset's (the demo: 128)
    num_layers: int | None = None  # None: the preset's (the demo: 2)
    max_items: int = 15
    train_items_per_user: int | None = 60
    epochs: int = 5
    tokens_per_batch: int = 2048
    lr: float = 2e-3
    content_rotation_rate: float = 0.5
    shuffle_rate: float = 0.0  # share of training windows read in a random item order
    recent_pass_epochs: int = 1
    recent_pass_lr: float = 5e-4
    dense: bool = True
    dense_loss_weight: float = 1.0
    time_budget_s: float | None = None  # cap on pretraining seconds (None: the epochs run in full)
    valid_users: int = 1000  # per trained domain, seeded; their validation items drive early stopping
    fusion_beams: int = 60  # beams of the candidate pool the fusion weights are chosen on
    alpha: float = 0.5  # corpus mixing exponent (recbase.data.corpus)
    # the task mixture (recbase.train.TrainConfig.tasks): with a "rating" share the model also
    # learns each trained domain's explicit ratings (rating_windows; RecBaseConfig.rating_task)
    tasks: dict = field(default_factory=lambda: {"sequential": 1.0})
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@dataclass
class Pretrained:
    """What ``pretrain_domains`` returns: the model, the loss histories, and the validation users
    of each trained domain (their validation items drove early stopping and the fusion weights)."""

    model: object
    history: list
    recent_pass_history: list
    valid_users: dict


def prepare_domains(corpus, encoder=None, device: str = "cpu") -> dict[str, DomainData]:
    """Load every domain of ``corpus``, split it leave-one-out and embed its items' text with one
    encoder (default: the packaged local one), each domain centred on its own mean."""
    from recbase.data import TextEncoder
    from recbase.data.splits import leave_one_out
    from recbase.tokenizer import centre_embeddings

    encoder = encoder or TextEncoder(device=device)
    out = {}
    for d in corpus.domains:
        ds = d.load()
        split = leave_one_out(ds)
        catalog = ds.items.set_index("item_id").loc[split.item_index.decode(np.arange(split.num_items))]
        texts = d.item_template().render_frame(catalog.reset_index())
        out[d.name] = DomainData(d.name, split, centre_embeddings(encoder.encode(texts)), d.is_ordered, d.weight)
    return out


def tokenize_domains(domains: dict[str, DomainData], levels: int = 3, codebook_size: int = 256,
                     dedup: str = "reassign", seed: int = 0, fit_on: Sequence[str] | None = None):
    """One ItemTokenizer fitted on the item text of every domain (held-out ones included: text
    only), or of the ``fit_on`` domains with the others encoded on its codebooks
    (``for_catalog``: never an ID in use); sets each domain's ``codes`` (unique across all
    domains). Returns the tokenizer (its ``codes``: the fitted domains' rows, in order)."""
    from recbase.tokenizer import ItemTokenizer

    names = list(domains) if fit_on is None else list(fit_on)
    unknown = sorted(set(names) - set(domains))
    if unknown or not names:
        raise ValueError(f"fit_on: expected domain names among {sorted(domains)}, got {fit_on!r}")
    tok = ItemTokenizer(levels=levels, codebook_size=codebook_size, dedup=dedup, seed=seed)
    tok.fit(np.concatenate([domains[n].embeddings for n in names]))
    start = 0
    for n in names:
        domains[n].codes = tok.codes[start:start + len(domains[n].embeddings)]
        start += len(domains[n].embeddings)
    for n in domains:
        if n not in names:
            domains[n].codes = tok.for_catalog(domains[n].embeddings).codes
    return tok


def pretrain_domains(domains: dict[str, DomainData], tok, train_on: Sequence[str], settings: PretrainSettings,
                     output_dir: str | Path | None = None) -> Pretrained:
    """Pretrain one RecBase model on the sequences of the ``train_on`` domains, mixed by the
    corpus rule (``recbase.data.corpus.mix_sequences``), validation loss on up to
    ``settings.valid_users`` users per domain; with ``settings.dense`` the dense item channel, and
    the hybrid fusion weights chosen on the first trained domain's validation users (read as seen
    and as unseen). Returns a :class:`Pretrained`."""
    from recbase.data.corpus import mix_sequences
    from recbase.model import RecBaseConfig, RecBaseForCausalLM
    from recbase.recommend import Recommender, choose_fusion
    from recbase.train import ItemVectors, Trainer, TrainConfig, pretraining_sequences, recent_pass

    s = settings
    unknown = sorted(set(train_on) - set(domains))
    if not train_on or unknown:
        raise ValueError(f"train_on: expected domain names among {sorted(domains)}, got {list(train_on)}")
    if any(domains[n].codes is None for n in domains):
        raise ValueError("domains: tokenize them first (tokenize_domains)")
    bos = tok.vocab.BOS
    rating = TrainConfig(tasks=s.tasks).rating_share() > 0
    train, valid, users, groups, scales = [], [], {}, {}, {}
    for i, name in enumerate(train_on):
        d = domains[name]
        n = d.split.num_users
        users[name] = sample_users(n, s.valid_users, s.seed + 1 + i)
        t, v = pretraining_sequences(d.split, tok.tokens(d.codes), bos, s.max_items, s.train_items_per_user,
                                     users[name])
        if rating:  # each window with its items' ratings (NaN for a domain without explicit ratings)
            scale = rating_scale(d.split)
            if scale is not None:
                scales[name] = scale
            r = (rating_windows(d.split, s.max_items, s.train_items_per_user, scale) if scale is not None
                 else [np.full((len(x) - 1) // tok.id_length, np.nan) for x in t])
            t = list(zip(t, r))
        train.append(t)
        groups[name] = np.arange(len(valid), len(valid) + len(v))  # per-domain validation loss in the log
        valid.extend(v)
    if rating and not scales:
        raise ValueError(f"tasks {s.tasks}: none of the trained domains {list(train_on)} has explicit ratings")
    mixed, _ = mix_sequences(train, [domains[n].weight for n in train_on], s.alpha, s.seed)
    mixed_ratings = None
    if rating:
        mixed, mixed_ratings = [x for x, _ in mixed], [r for _, r in mixed]
    content = s.content_rotation_rate > 0
    dim = domains[train_on[0]].embeddings.shape[1]
    size = {} if s.hidden_size is None else {"hidden_size": s.hidden_size, "intermediate_size": 3 * s.hidden_size}
    if s.num_layers is not None:
        size["num_hidden_layers"] = s.num_layers
    cfg = RecBaseConfig.from_preset(
        s.preset, levels=tok.id_length, codebook_size=tok.codebook_size, max_items=s.max_items, **size,
        concept_vector_dim=tok.quantizer.codebooks.shape[2] if content else 0,
        item_vector_dim=dim if s.dense else 0, dense_loss_weight=s.dense_loss_weight,
        rating_task=rating, rating_scales=scales)
    model = RecBaseForCausalLM(cfg)
    if content:
        model.set_concept_vectors(tok.quantizer.codebooks)
    vectors = None
    if s.dense:
        vectors = ItemVectors(np.concatenate([tok.tokens(domains[n].codes) for n in train_on]),
                              np.concatenate([domains[n].embeddings for n in train_on]), tok.codebook_size)
    out = Path(output_dir) if output_dir is not None else None
    tcfg = TrainConfig(epochs=s.epochs, tokens_per_batch=s.tokens_per_batch, lr=s.lr, warmup_steps=50, seed=s.seed,
                       device=s.device, content_rotation_rate=s.content_rotation_rate, progress=s.progress,
                       shuffle_rate=s.shuffle_rate, time_budget_s=s.time_budget_s, tasks=dict(s.tasks))
    groups = groups if len(train_on) > 1 else None
    state = Trainer(model, mixed, valid, tcfg, output_dir=None if out is None else out / "pretrain",
                    item_vectors=vectors, valid_groups=groups, ratings=mixed_ratings).fit()
    recent = {"history": []}
    if s.recent_pass_epochs:
        recent = recent_pass(model, [domains[n].split for n in train_on], [tok.tokens(domains[n].codes) for n in train_on],
                    bos, s.max_items, valid, epochs=s.recent_pass_epochs, lr=s.recent_pass_lr, seed=s.seed + 1,
                    tokens_per_batch=s.tokens_per_batch, device=s.device, progress=s.progress,
                    output_dir=None if out is None else out / "recent-pass", item_vectors=vectors,
                    valid_groups=groups)
    if s.dense:
        # fusion weights on the trained domains' validation users only (the first domain's, the
        # largest share of users usually; every held-out domain gets the "unseen" weight)
        first = train_on[0]
        d = domains[first]
        rec = Recommender(model, tok.vocab, {first: d.codes}, max_items=s.max_items, device=s.device,
                          item_embeddings={first: d.embeddings})
        for reading in ("seen", "unseen") if content else ("seen",):
            choose_fusion(rec, first, [d.split.valid_histories[u] for u in users[first]],
                          d.split.valid_targets[users[first]], reading=reading, num_beams=s.fusion_beams)
    return Pretrained(model, state["history"], recent["history"], users)


def rating_scale(split) -> tuple[float, float] | None:
    """(lowest, highest) training rating of a split, or None when it has no explicit ratings
    (no rating column, or one value everywhere: implicit feedback)."""
    if split.ratings is None:
        return None
    flat = np.concatenate([np.asarray(r, dtype=np.float64) for r in split.train_ratings] or [np.empty(0)])
    flat = flat[np.isfinite(flat)]
    if flat.size == 0 or flat.min() == flat.max():
        return None
    return float(flat.min()), float(flat.max())


def rating_windows(split, max_items: int, recent: int | None, scale) -> list[np.ndarray]:
    """The normalised ratings (``recbase.recommend.normalise_ratings``) of every training window of
    :func:`recbase.train.pretraining_sequences` (same split, ``max_items`` and ``recent``), item
    by item: what ``Trainer(ratings=...)`` reads next to those windows."""
    from recbase.recommend import normalise_ratings
    from recbase.train import item_windows

    return [normalise_ratings(w, scale) for r in split.train_ratings
            for w in item_windows(np.asarray(r)[-recent:] if recent else np.asarray(r), max_items)]


def evaluate_ratings(split, users, predictors: dict, *, on_valid: bool = False) -> list[dict]:
    """Rating prediction on one domain: each user's held-out rating (of the test item -- the last
    rated one -- or of the validation item with ``on_valid``) predicted after the history before it.
    ``predictors``: name -> ``fn(users, histories, history_ratings, items)`` returning one rating
    per user. Returns one row per predictor: RMSE, MAE and their standard errors over the users
    (RMSE's by the delta method), the same users for every predictor."""
    users = np.asarray(users, dtype=np.int64)
    if on_valid:
        hist_all, (hr_all, truth_all), targets = split.valid_histories, split.valid_ratings, split.valid_targets
    else:
        hist_all, (hr_all, truth_all), targets = split.test_histories, split.test_ratings, split.test_targets
    hist, hr = [hist_all[u] for u in users], [hr_all[u] for u in users]
    items, truth = targets[users], truth_all[users]
    rows = []
    for name, fn in predictors.items():
        pred = np.asarray(fn(users, hist, hr, items), dtype=np.float64).reshape(-1)
        if pred.shape != truth.shape or not np.isfinite(pred).all():
            raise ValueError(f"predictor {name!r}: expected {len(truth)} finite ratings, got {pred.shape}")
        sq, ab = (pred - truth) ** 2, np.abs(pred - truth)
        n = len(sq)
        rmse = float(np.sqrt(sq.mean()))
        rows.append({"model": name, "users": n, "rmse": rmse, "mae": float(ab.mean()),
                     "se_rmse": float(sq.std(ddof=1) / np.sqrt(n) / (2 * rmse)) if n > 1 and rmse > 0 else float("nan"),
                     "se_mae": float(ab.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")})
    return rows


BIAS_GRID = ((5.0, 5.0), (15.0, 10.0), (25.0, 25.0))  # (reg_u, reg_i)
MF_GRID = (0.02, 0.05, 0.1, 0.2)  # reg, 32 factors


def rating_baselines(split, tune: bool = True) -> dict:
    """The rating baselines fitted on a split's training ratings (users by their index in the split):
    global mean, user + item biases, biased matrix factorisation (ALS), as :func:`evaluate_ratings`
    predictors. With ``tune`` the biases' and MF's regularisation are chosen on the validation
    ratings (``BIAS_GRID``, ``MF_GRID``; the validation items are never in the training ratings)."""
    from recbase.baselines import BiasBaseline, GlobalMean, MatrixFactorization

    seqs, rates = split.train_sequences, split.train_ratings
    u = np.concatenate([np.full(len(s), j, dtype=np.int64) for j, s in enumerate(seqs)])
    i, r = np.concatenate(seqs), np.concatenate(rates)
    vu = np.arange(split.num_users)
    vi, vr = split.valid_targets, split.valid_ratings[1]

    def best(candidates):
        fitted = [m.fit(u, i, r) for m in candidates]
        if not tune or len(fitted) == 1:
            return fitted[0]
        return min(fitted, key=lambda m: float(((m.predict(vu, vi) - vr) ** 2).mean()))

    models = {"global mean": GlobalMean().fit(u, i, r),
              "user + item bias": best([BiasBaseline(a, b) for a, b in (BIAS_GRID if tune else BIAS_GRID[1:2])]),
              "matrix factorization (ALS)": best([MatrixFactorization(reg=g) for g in (MF_GRID if tune else (0.05,))])}
    return {name: (lambda users, h, hr, items, m=m: m.predict(users, items)) for name, m in models.items()}


def sample_users(n: int, limit: int | None, seed: int) -> np.ndarray:
    """A sorted, seeded sample of ``limit`` of ``n`` users (all if ``limit`` is None or >= n): the
    validation and evaluation users of the demo and of every pipeline stage."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def fit_text_sasrec(domains: dict[str, DomainData], train_on: Sequence[str], *, epochs: int = 1, seed: int = 0,
                    device: str = "cpu"):
    """The zero-shot text-sequence peer (UniSRec-style :class:`recbase.baselines.TextSASRec`)
    trained on the ``train_on`` domains: one catalog of all their items (their text embeddings
    stacked, each domain's item indices shifted past the previous ones'), early-stopped on their
    validation items. Apply it to any domain with ``with_catalog(embeddings)``."""
    from recbase.baselines import TextSASRec

    if not isinstance(epochs, (int, np.integer)) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"fit_text_sasrec: epochs must be an int >= 1, got {epochs!r}")
    missing = [n for n in train_on if n not in domains]
    if not train_on or missing:
        raise ValueError(f"fit_text_sasrec: train_on must name domains of the corpus {sorted(domains)}, got {list(train_on)}")
    seqs, hists, targets, offset = [], [], [], 0
    for name in train_on:
        sp = domains[name].split
        seqs += [np.asarray(x, dtype=np.int64) + offset for x in sp.train_sequences]
        hists += [np.asarray(x, dtype=np.int64) + offset for x in sp.valid_histories]
        targets.append(np.asarray(sp.valid_targets, dtype=np.int64) + offset)
        offset += sp.num_items
    emb = np.concatenate([domains[n].embeddings for n in train_on])
    model = TextSASRec(emb, max_len=50, seed=seed, device=device, max_epochs=epochs)
    return model.fit(seqs, num_items=offset, valid_histories=hists, valid_targets=np.concatenate(targets))


def _flatten_scores(per_user, pairs) -> np.ndarray:
    """Per-user score arrays (candidate order of ``pairs.candidates``) -> one score per pair."""
    flat = np.empty(len(pairs))
    cursor = np.zeros(len(per_user), dtype=np.int64)
    for m, u in enumerate(pairs.user.tolist()):
        flat[m] = per_user[u][cursor[u]]
        cursor[u] += 1
    return flat


def ctr_auc(split, users, scorers: dict, *, on_valid: bool = False, seed: int = 0) -> dict[str, float]:
    """The CTR protocol (docs/results.md) on one domain: per user, the last up-to-10 items of the
    sequence (at most half of it) are the positives and the rest the history, with 10 random items
    the user never interacted with as negatives (seeded); on validation the training sequence, so
    no validation or test item is scored. ``scorers``: name -> ``fn(histories, candidates)``
    returning per-user score arrays. Returns name -> mean per-user AUC, the same pairs for all."""
    from recbase.evaluate import build_ctr_pairs, evaluate_ctr

    source = split.train_sequences if on_valid else split.sequences
    users = [u for u in users if len(source[u]) >= 2]  # one history item and one positive at least
    seqs = [np.asarray(source[u]) for u in users]
    n_pos = [min(10, len(x) // 2) for x in seqs]
    hist = [x[:-n] for x, n in zip(seqs, n_pos)]
    pos = [x[-n:] for x, n in zip(seqs, n_pos)]
    pairs = build_ctr_pairs(pos, split.num_items, exclude=[split.sequences[u] for u in users], seed=seed)
    cands = pairs.candidates(len(users))
    return {name: evaluate_ctr(_flatten_scores(fn(hist, cands), pairs), pairs)["auc"] for name, fn in scorers.items()}


def direct_metrics(split, users, scorers: dict, *, on_valid: bool = False, num_negatives: int = 99,
                   seed: int = 0, ks=(1, 5, 10), ranks: dict | None = None) -> dict[str, dict]:
    """P5's direct recommendation on one domain: per user the held-out item (the test item, or
    the validation item with ``on_valid``) among ``num_negatives`` items the user never
    interacted with (seeded; :func:`recbase.evaluate.sample_candidate_sets`), after the history
    before it. ``scorers``: name -> ``fn(histories, candidates)`` returning per-user score arrays
    (``Recommender.score``, a baseline's ``score``). Returns name -> HR@K / NDCG@K with standard
    errors (:func:`recbase.evaluate.evaluate_candidates`), every scorer on the same candidates.
    ``ranks``: a dict that receives name -> each user's rank of the positive (for paired differences)."""
    from recbase.evaluate import candidate_ranks, evaluate_candidates, sample_candidate_sets

    users = np.asarray(users, dtype=np.int64)
    hist = split.valid_histories if on_valid else split.test_histories
    targets = (split.valid_targets if on_valid else split.test_targets)[users]
    sets = sample_candidate_sets(targets, split.num_items, exclude=[split.sequences[u] for u in users],
                                 num_negatives=num_negatives, seed=seed)
    histories = [hist[u] for u in users]
    out = {}
    for name, fn in scorers.items():
        scores = np.stack([np.asarray(x, dtype=np.float64) for x in fn(histories, list(sets.items))])
        out[name] = evaluate_candidates(scores, sets, ks)
        if ranks is not None:
            ranks[name] = candidate_ranks(scores, sets)
    return out


def evaluate_domain(model, tok, domains: dict[str, DomainData], domain: str, *, zero_shot: bool,
                    split: str = "test", max_users: int | None = 2000, num_beams: int = 60, ks=(5, 10, 20),
                    seed: int = 0, device: str = "cpu", text_sasrec=None, auc: bool = True,
                    direct: bool = False, direct_negatives: int = 99) -> list[dict]:
    """Leave-one-out metrics on one domain: popularity (counts the domain's own interactions:
    context, not zero-shot), text-kNN, ``text_sasrec`` (a :func:`fit_text_sasrec` model, applied
    to this catalog with ``with_catalog``; None: no row) and recbase (every mode the model has), the
    same users; with ``auc``, each row's mean per-user AUC of the CTR protocol (:func:`ctr_auc`);
    with ``direct``, each row's direct recommendation among 1 + ``direct_negatives`` candidates (:func:`direct_metrics`,
    keys ``direct_hr@K``, ``direct_ndcg@K``, ``direct_se_...``).
    ``zero_shot``: read the domain as unseen (the model must not have trained on it)."""
    from recbase.baselines import Popularity, TextKNN
    from recbase.evaluate import _per_user, evaluate_rankings
    from recbase.recommend import Recommender

    if domain not in domains:
        raise ValueError(f"domain: {domain!r} is not in the corpus {sorted(domains)}")
    if split not in ("test", "valid"):
        raise ValueError(f"split: expected 'test' or 'valid', got {split!r}")
    d = domains[domain]
    sp = d.split
    users = sample_users(sp.num_users, max_users, seed)
    hist = sp.test_histories if split == "test" else sp.valid_histories
    targets = (sp.test_targets if split == "test" else sp.valid_targets)[users]
    histories = [hist[u] for u in users]
    kmax = max(ks)
    dense = bool(getattr(model.config, "item_vector_dim", 0))
    rec = Recommender(model, tok.vocab, {domain: d.codes}, device=device,
                      unseen_domains=[domain] if zero_shot else [],
                      unordered_domains=[] if d.ordered else [domain],
                      item_embeddings={domain: d.embeddings} if dense else None)
    label = "zero-shot" if zero_shot else "in-domain"
    baselines = {"popularity": Popularity().fit(sp.train_sequences, num_items=sp.num_items),
                 "text-kNN": TextKNN(d.embeddings, max_history=20).fit()}
    if text_sasrec is not None:
        baselines[f"TextSASRec ({label})"] = text_sasrec.with_catalog(d.embeddings)
    runs = [(name, m.recommend, m.score) for name, m in baselines.items()]
    for mode in ("generative", "dense", "hybrid") if dense else ("generative",):
        runs.append((f"recbase {mode} ({label})",
                     lambda h, k, m=mode: rec.recommend(h, k=k, domain=domain, num_beams=max(num_beams, k), mode=m)[0],
                     lambda h, c, m=mode: rec.score(h, c, domain=domain, mode=m)))
    rows = []
    for name, recommend, _ in runs:
        items = recommend(histories, kmax)
        row = {"domain": domain, "model": name, "users": len(users), **evaluate_rankings(items, targets, ks)}
        for metric in ("recall", "ndcg"):
            per = _per_user(items, targets, 10, metric)
            row[f"se_{metric}@10"] = float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else float("nan")
        rows.append(row)
    if auc:
        aucs = ctr_auc(sp, users, {name: score for name, _, score in runs}, on_valid=split == "valid", seed=seed)
        for row in rows:
            row["auc"] = aucs[row["model"]]
    if direct:
        res = direct_metrics(sp, users, {name: score for name, _, score in runs}, on_valid=split == "valid",
                             num_negatives=direct_negatives, seed=seed)
        for row in rows:
            row.update({f"direct_{k}": v for k, v in res[row["model"]].items() if k != "users"})
    return rows


def leave_one_domain_out(domains: dict[str, DomainData], tok, settings: PretrainSettings, *,
                         held_out: Sequence[str] | None = None, split: str = "test",
                         max_users: int | None = 2000, output_dir: str | Path | None = None,
                         text_sasrec_epochs: int = 1) -> list[dict]:
    """For each domain (or each of ``held_out``): pretrain on all the others, evaluate it zero-shot
    next to popularity, text-kNN and a TextSASRec trained on the same other domains for
    ``text_sasrec_epochs`` (0: none), with AUC. Returns the rows, each with ``held_out``,
    ``trained_on`` and ``pretrain_interactions`` (training items of the domains pretrained on)."""
    rows = []
    names = list(domains) if held_out is None else list(held_out)
    if len(domains) < 2:
        raise ValueError(f"leave_one_domain_out: needs at least two domains, got {sorted(domains)}")
    for name in names:
        train_on = [n for n in domains if n != name]
        out = None if output_dir is None else Path(output_dir) / f"without-{name}"
        model = pretrain_domains(domains, tok, train_on, settings, output_dir=out).model
        peer = (fit_text_sasrec(domains, train_on, epochs=text_sasrec_epochs, seed=settings.seed,
                                device=settings.device) if text_sasrec_epochs else None)
        size = int(sum(len(s_) for n in train_on for s_ in domains[n].split.train_sequences))
        for r in evaluate_domain(model, tok, domains, name, zero_shot=True, split=split, max_users=max_users,
                                 seed=settings.seed, device=settings.device, text_sasrec=peer):
            rows.append({**r, "held_out": name, "trained_on": "+".join(train_on), "pretrain_interactions": size})
    return rows


def plot_zero_shot(rows: list[dict], path: str | Path, metric: str = "ndcg@10") -> None:
    """Zero-shot quality against the pretraining data: one point per held-out domain and model
    (recbase's hybrid or generative row, text-kNN, popularity), x = training interactions read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, match in (("recbase (zero-shot)", "recbase"), ("text-kNN", "text-kNN"), ("popularity", "popularity")):
        pts = {}
        for r in rows:
            if r["model"].startswith(match):  # the last recbase mode listed is the fused one
                pts[r["held_out"]] = (r["pretrain_interactions"], r[metric], r.get(f"se_{metric}", 0.0))
        if pts:
            xs, ys, es = zip(*pts.values())
            ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, label=label)
            for name, (x, y, _) in pts.items():
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    sizes = [r["pretrain_interactions"] for r in rows]
    if sizes and min(sizes) > 0 and max(sizes) / min(sizes) > 10:  # log only where it spans decades
        ax.set_xscale("log")
    ax.set_xlabel("pretraining interactions (the other domains)")
    ax.set_ylabel(f"{metric} on the held-out domain")
    ax.set_title("leave-one-domain-out zero-shot")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def save_run(path: str | Path, domains: dict[str, DomainData], tok, model, train_on: Sequence[str],
             corpus_source: str = "") -> None:
    """One folder: ``tokenizer/``, ``model/``, ``catalogs/<domain>/{item_ids.json, embeddings.npy}``
    and ``run.json`` (the domains, which were trained on, the corpus file)."""
    path = Path(path)
    own = {"run", "tokenizer", "model", "catalogs", "run.json"}  # what a run folder holds (training first)
    if path.is_dir() and not (path / "run.json").is_file() and {p.name for p in path.iterdir()} - own:
        raise FileExistsError(f"--output: {path} is a non-empty folder that is not a recbase run (no run.json); "
                              "refusing to write into it. Use a new or empty folder.")
    tok.save(path / "tokenizer")
    model.save_pretrained(path / "model")
    offsets, start = {}, 0
    for name, d in domains.items():
        folder = path / "catalogs" / name
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(folder / "item_ids.json") as tmp:
            tmp.write_text(json.dumps(d.split.item_index.decode(np.arange(d.split.num_items)).tolist()))
        with atomic_file(folder / "embeddings.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, d.embeddings)
        offsets[name] = [start, start + len(d.embeddings)]
        start += len(d.embeddings)
    meta = {"format_version": _RUN_FORMAT, "corpus": corpus_source, "trained_on": list(train_on),
            "domains": {n: {"rows": offsets[n], "ordered": d.ordered} for n, d in domains.items()}}
    with atomic_file(path / "run.json") as tmp:  # last: a run.json never points at missing files
        tmp.write_text(json.dumps(meta, indent=2))


def load_run(path: str | Path):
    """(tokenizer, model, run.json dict) of a folder written by :func:`save_run`."""
    from recbase.model import RecBaseForCausalLM
    from recbase.tokenizer import ItemTokenizer

    path = Path(path)
    meta_file = path / "run.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"--model: {path} has no run.json (written by `recbase pretrain --corpus`)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != _RUN_FORMAT:
        raise ValueError(f"--model: {meta_file} has format {meta.get('format_version')!r}; this recbase reads {_RUN_FORMAT}")
    return ItemTokenizer.load(path / "tokenizer"), RecBaseForCausalLM.from_pretrained(path / "model"), meta
