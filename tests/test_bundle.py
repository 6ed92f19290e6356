"""A living catalog (add_items / remove_items) and the recommender bundle (save / load).

References are brute force: exhaustive likelihood / dense scores of every live item (a beam as wide
as the catalog is an exhaustive search), and a Recommender rebuilt from scratch on the same arrays.
"""
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recbase
from recbase.recommend import Recommender

DIM, K, LEVELS = 16, 8, 2


def _setup(seed=0, n=40, dense=True, unseen=False):
    """A tokenizer fitted on one catalog (centred embeddings), an untrained model reading it."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n, DIM)).astype(np.float32) + 0.5
    mean = raw.mean(0)
    x = recbase.centre_embeddings(raw)
    tok = recbase.ItemTokenizer(levels=LEVELS, codebook_size=K, seed=seed).fit(x, progress=False)
    cfg = recbase.RecBaseConfig.from_preset("tiny", levels=tok.id_length, codebook_size=K, max_items=6,
                                            concept_vector_dim=DIM if unseen else 0,
                                            item_vector_dim=DIM if dense else 0)
    torch.manual_seed(seed)
    model = recbase.RecBaseForCausalLM(cfg).eval()
    if unseen:
        model.set_concept_vectors(tok.quantizer.codebooks)
    rec = Recommender(model, tok.vocab, {"shop": tok.codes}, item_ids={"shop": [f"sku{i}" for i in range(n)]},
                      item_embeddings={"shop": x} if dense else None, tokenizer=tok,
                      embedding_means={"shop": mean}, unseen_domains=["shop"] if unseen else ())
    return rec, raw, rng


def _histories(rng, rec, users=5):
    n = len(rec.codes["shop"])
    return [rng.choice(n, size=int(rng.integers(1, 5)), replace=False) for _ in range(users)]


def _exhaustive(rec, hist, mode, k):
    """Top-k live items by the mode's score over every live item not in the history."""
    live = np.flatnonzero(~rec.removed["shop"])
    out = []
    for h in hist:
        cands = np.setdiff1d(live, h)
        s = rec.score([h], [cands], mode=mode)[0]
        order = np.lexsort((cands, -s))[:k]
        out.append((cands[order], s[order]))
    return out


def _check_against_brute_force(rec, rng, k=4):
    hist = _histories(rng, rec)
    live = set(np.flatnonzero(~rec.removed["shop"]).tolist())
    beams = len(rec.codes["shop"])  # as wide as the catalog: exhaustive
    for mode in ("generative", "dense", "hybrid"):
        items, scores = rec.recommend(hist, k=k, num_beams=beams, mode=mode)
        assert set(items[items >= 0].tolist()) <= live, mode  # a removed item is never returned
        if mode == "hybrid":
            continue  # its pool is the union of the two exact ones; checked through them
        for (ref_items, ref_scores), got_i, got_s in zip(_exhaustive(rec, hist, mode, k), items, scores):
            np.testing.assert_allclose(got_s[:len(ref_scores)], ref_scores, rtol=1e-4, atol=1e-4)
            assert got_i[:len(ref_items)].tolist() == ref_items.tolist(), mode


def _fresh_copy(rec):
    """The same catalog state built from scratch (no incremental trie / embedding updates)."""
    copy = Recommender(rec.model, rec.vocab, {"shop": rec.codes["shop"].copy()},
                       item_ids={"shop": list(rec.item_ids["shop"])},
                       item_embeddings={"shop": rec.embeddings["shop"].numpy().copy()}, tokenizer=rec.tokenizer,
                       embedding_means={"shop": rec.means["shop"]})
    if rec.removed["shop"].any():
        copy.remove_items("shop", [rec.item_ids["shop"][i] for i in np.flatnonzero(rec.removed["shop"])])
    return copy


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "remove"]), st.integers(1, 4)), min_size=1, max_size=5),
       seed=st.integers(0, 2 ** 16))
def test_random_add_remove_sequences_match_a_brute_force_recompute(ops, seed):
    rec, raw, rng = _setup(seed=seed % 3)
    rng = np.random.default_rng(seed)
    added = 0
    for op, n in ops:
        if op == "add":
            ids = [f"new{added + j}" for j in range(n)]
            rows = rec.add_items("shop", ids, rng.normal(size=(n, DIM)).astype(np.float32) + 0.5)
            added += n
            assert rec.ids_of("shop", rows) == ids
            # new IDs are unique against every item, removed ones included
            assert len(np.unique(rec.codes["shop"], axis=0)) == len(rec.codes["shop"])
            s = rec.score([[0]], [rows], mode="generative")[0]  # the new items can be scored
            assert np.isfinite(s).all()
        else:
            live = np.flatnonzero(~rec.removed["shop"])
            if len(live) <= n:
                continue
            gone = rng.choice(live, size=n, replace=False)
            rec.remove_items("shop", rec.ids_of("shop", gone))
            with pytest.raises(ValueError, match="was removed"):
                rec.score([[0]], [gone[:1]])
        _check_against_brute_force(rec, rng)
        fresh = _fresh_copy(rec)
        hist = _histories(rng, rec)
        for mode in ("generative", "dense", "hybrid"):
            a, sa = rec.recommend(hist, k=4, num_beams=16, mode=mode)
            b, sb = fresh.recommend(hist, k=4, num_beams=16, mode=mode)
            assert a.tolist() == b.tolist(), mode
            np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-6)


def test_new_items_are_centred_like_the_catalog_and_can_be_recommended():
    rec, raw, rng = _setup()
    tok = rec.tokenizer
    # an item whose raw embedding equals an existing one's is encoded like it (same centring),
    # one level apart at most (the disambiguation level keeps the two IDs apart)
    row = rec.add_items("shop", ["twin"], raw[3:4])[0]
    assert rec.codes["shop"][row][:LEVELS].tolist() == tok.codes[3][:LEVELS].tolist()
    assert rec.codes["shop"][row].tolist() != tok.codes[3].tolist()
    np.testing.assert_allclose(rec.embeddings["shop"][row].numpy(), rec.embeddings["shop"][3].numpy(), atol=1e-6)
    # dense: a history of the twin's original ranks the twin first
    items, _ = rec.recommend([[3]], k=1, num_beams=len(rec.codes["shop"]), mode="dense")
    assert rec.ids_of("shop", items[0]) == ["twin"]


def test_saved_bundle_loads_to_identical_recommendations(tmp_path):
    for unseen in (False, True):
        rec, raw, rng = _setup(seed=1, unseen=unseen)
        rec.add_items("shop", ["a", "b", "c"], rng.normal(size=(3, DIM)).astype(np.float32))
        rec.remove_items("shop", ["sku2", "b"])
        (tmp_path / "b").mkdir(exist_ok=True)
        rec.save(tmp_path / "b")
        got = Recommender.load(tmp_path / "b")
        assert got.item_ids == rec.item_ids and got.unseen_domains == rec.unseen_domains
        assert got.removed["shop"].tolist() == rec.removed["shop"].tolist()
        hist = _histories(rng, rec, users=6)
        for mode in ("generative", "dense", "hybrid"):
            a, sa = rec.recommend(hist, k=5, num_beams=12, mode=mode)
            b, sb = got.recommend(hist, k=5, num_beams=12, mode=mode)
            assert a.tolist() == b.tolist() and np.array_equal(sa, sb), mode
        # the loaded bundle keeps living: an add after load avoids every ID, removed ones too
        got.add_items("shop", ["d"], rng.normal(size=(1, DIM)).astype(np.float32))
        assert len(np.unique(got.codes["shop"], axis=0)) == len(got.codes["shop"])


def test_a_save_interrupted_midway_leaves_the_previous_bundle(tmp_path, monkeypatch):
    rec, raw, rng = _setup(seed=2)
    rec.save(tmp_path / "b")
    (tmp_path / "b" / "notes.txt").write_text("mine")
    before = Recommender.load(tmp_path / "b")
    rec.add_items("shop", ["late"], rng.normal(size=(1, DIM)).astype(np.float32))

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(type(rec.tokenizer), "save", boom)
    with pytest.raises(OSError, match="disk full"):
        rec.save(tmp_path / "b")
    monkeypatch.undo()
    again = Recommender.load(tmp_path / "b")
    assert again.item_ids == before.item_ids and "late" not in again.item_ids["shop"]
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    rec.save(tmp_path / "b")  # a later save succeeds, and keeps the user's file
    assert "late" in Recommender.load(tmp_path / "b").item_ids["shop"]
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


def test_bad_input_is_refused_and_changes_nothing(tmp_path):
    rec, raw, rng = _setup(seed=3)
    state = (rec.codes["shop"].copy(), list(rec.item_ids["shop"]), rec.removed["shop"].copy())

    def unchanged():
        assert np.array_equal(rec.codes["shop"], state[0]) and rec.item_ids["shop"] == state[1]
        assert np.array_equal(rec.removed["shop"], state[2])
    e1 = rng.normal(size=(1, DIM)).astype(np.float32)
    with pytest.raises(ValueError, match=r"item_ids\[0\]: 'sku1' is already an item of the 'shop' catalog"):
        rec.add_items("shop", ["sku1"], e1)
    with pytest.raises(ValueError, match=r"'x' is given twice"):
        rec.add_items("shop", ["x", "x"], np.concatenate([e1, e1]))
    with pytest.raises(ValueError, match=rf"embeddings: expected a float array of shape \(1, {DIM}\)"):
        rec.add_items("shop", ["x"], rng.normal(size=(1, DIM + 1)))
    with pytest.raises(ValueError, match="NaN"):
        rec.add_items("shop", ["x"], np.full((1, DIM), np.nan))
    with pytest.raises(TypeError, match="single string"):
        rec.add_items("shop", "x", e1)
    with pytest.raises(KeyError, match=r"item_ids\[1\]: 'nope' is not an item of the 'shop' catalog"):
        rec.remove_items("shop", ["sku1", "nope"])
    with pytest.raises(ValueError, match="domain: unknown 'books'"):
        rec.remove_items("books", ["sku1"])
    with pytest.raises(ValueError, match="empty"):
        rec.remove_items("shop", list(rec.item_ids["shop"]))
    unchanged()
    rec.remove_items("shop", ["sku1"])
    with pytest.raises(ValueError, match="removed already"):
        rec.remove_items("shop", ["sku1"])
    with pytest.raises(ValueError, match="removed; ids are never reused"):
        rec.add_items("shop", ["sku1"], e1)
    no_tok = Recommender(rec.model, rec.vocab, {"shop": rec.codes["shop"]}, item_embeddings={"shop": rec.embeddings["shop"].numpy()})
    with pytest.raises(ValueError, match="add_items needs the tokenizer"):
        no_tok.add_items("shop", ["x"], e1)

    # bundles: not a bundle, another format version, a missing file, a foreign non-empty folder
    with pytest.raises(FileNotFoundError, match="not a recbase bundle"):
        Recommender.load(tmp_path)
    rec.save(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    (tmp_path / "b" / "bundle.json").write_text(json.dumps({**meta, "format_version": 99, "recbase_version": "9.0"}))
    with pytest.raises(ValueError, match=r"bundle format 99 \(written by recbase 9.0\)"):
        Recommender.load(tmp_path / "b")
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(meta))
    (tmp_path / "b" / "catalogs" / "0.ids.json").unlink()
    with pytest.raises(FileNotFoundError, match="item ids of domain 'shop'"):
        Recommender.load(tmp_path / "b")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match="not a recbase artifact"):
        rec.save(mine)
    assert [p.name for p in mine.iterdir()] == ["data.csv"]
