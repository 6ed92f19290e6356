"""ItemTokenizer: unique IDs, vocabulary, health report, zero-shot catalogs, persistence."""
import numpy as np
import pytest
import torch

from recbase import ConceptVocab, ItemTokenizer


def clustered(n, d, centers, seed, spread=0.05):
    """Embeddings with many near-duplicates, so raw code tuples collide."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    return (c[rng.integers(0, centers, n)] + spread * rng.normal(size=(n, d))).astype(np.float32)


def unique_rows(a):
    return len(np.unique(a, axis=0)) == len(a)


@pytest.mark.parametrize("dedup", ["extra_level", "reassign"])
def test_ids_unique_even_with_heavy_collisions(dedup):
    x = clustered(3000, 16, centers=40, seed=1, spread=0.02)
    tok = ItemTokenizer(levels=3, codebook_size=64, dedup=dedup, seed=0).fit(x, progress=False)
    rep = tok.report()
    assert rep["collision_rate"] > 0.005  # raw tuples really collide on this data
    assert unique_rows(tok.codes)
    assert rep["unique_after_dedup"]
    assert tok.codes.shape == (3000, tok.id_length)
    assert tok.codes.min() >= 0 and tok.codes.max() < 64
    if dedup == "reassign":  # only colliding items moved, only on the last level
        sem = np.asarray(tok.quantizer.encode(x))
        np.testing.assert_array_equal(tok.codes[:, :2], sem[:, :2])
        assert (tok.codes[:, 2] != sem[:, 2]).mean() <= rep["collision_rate"]


def test_reassign_fails_clearly_when_a_prefix_is_full():
    x = clustered(3000, 16, centers=20, seed=1, spread=0.001)  # ~150 items per prefix > 64 codes
    with pytest.raises(ValueError, match="last-level codes under prefix"):
        ItemTokenizer(levels=2, codebook_size=64, dedup="reassign").fit(x, progress=False)


def test_extra_level_numbers_members_of_a_group_by_distance():
    x = clustered(2000, 8, centers=10, seed=2, spread=0.01)
    tok = ItemTokenizer(levels=2, codebook_size=32, seed=0).fit(x, progress=False)
    sem = np.asarray(tok.quantizer.encode(x))
    np.testing.assert_array_equal(tok.codes[:, :2], sem)  # semantic levels untouched
    dist = ((x.astype(np.float64) - tok.quantizer.decode(sem)) ** 2).sum(1)
    # brute force: inside every group, extra codes are 0..n-1 in order of distance
    for key in np.unique(sem, axis=0)[:50]:
        members = np.flatnonzero((sem == key).all(1))
        order = members[np.lexsort((members, dist[members]))]
        np.testing.assert_array_equal(tok.codes[order, 2], np.arange(len(members)))


def test_zero_shot_catalog_gets_fresh_codes():
    x = clustered(2000, 16, centers=30, seed=3)
    tok = ItemTokenizer(levels=2, codebook_size=32, seed=0).fit(x, progress=False)
    new = clustered(1500, 16, centers=30, seed=3)  # same centres: collides with the fitted catalog
    ids = tok.encode(new)
    assert unique_rows(ids)
    assert unique_rows(np.concatenate([tok.codes, ids]))  # never reuses a fitted item's ID
    own = tok.encode(new, avoid_fitted=False)
    assert unique_rows(own)


def test_report_matches_brute_force():
    x = clustered(1500, 12, centers=25, seed=4)
    tok = ItemTokenizer(levels=2, codebook_size=32, seed=0).fit(x, progress=False)
    rep = tok.report()
    sem = np.asarray(tok.quantizer.encode(x))
    tuples = [tuple(r) for r in sem]
    counts = {t: tuples.count(t) for t in set(tuples)}
    assert rep["collision_rate"] == pytest.approx(np.mean([counts[t] > 1 for t in tuples]))
    for lvl in range(2):
        c = np.bincount(sem[:, lvl], minlength=32)
        p = c[c > 0] / c.sum()
        assert rep["per_level"][lvl]["usage"] == pytest.approx((c > 0).mean())
        assert rep["per_level"][lvl]["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    x_hat = tok.quantizer.decode(sem).astype(np.float64)
    rel = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert rep["relative_reconstruction_error"] == pytest.approx(rel, rel=1e-5)


def test_vocab_round_trip_and_offsets():
    v = ConceptVocab(levels=4, codebook_size=256)
    assert v.size == 4 + 4 * 256
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, size=(100, 4))
    tokens = v.to_tokens(codes)
    np.testing.assert_array_equal(tokens, 4 + np.arange(4) * 256 + codes)
    np.testing.assert_array_equal(v.to_codes(tokens), codes)
    np.testing.assert_array_equal(v.level_of(tokens), np.broadcast_to(np.arange(4), (100, 4)))
    t = torch.as_tensor(codes)
    assert torch.equal(v.to_tokens(t), torch.as_tensor(tokens))
    with pytest.raises(ValueError, match="codes"):
        v.to_tokens(codes + 256)
    with pytest.raises(ValueError, match="tokens"):
        v.to_codes(tokens[:, ::-1].copy())


def test_save_load_round_trip(tmp_path):
    x = clustered(1200, 16, centers=20, seed=6)
    tok = ItemTokenizer(levels=2, codebook_size=32, seed=0).fit(x, progress=False)
    tok.save(tmp_path / "tok")
    tok.save(tmp_path / "tok")  # overwriting is atomic too
    back = ItemTokenizer.load(tmp_path / "tok")
    np.testing.assert_array_equal(back.codes, tok.codes)
    np.testing.assert_array_equal(back.quantizer.codebooks, tok.quantizer.codebooks)
    new = clustered(300, 16, centers=20, seed=7)
    np.testing.assert_array_equal(back.encode(new), tok.encode(new))
    assert back.report() == tok.report()
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no temp leftovers


def test_save_never_deletes_what_recbase_did_not_write(tmp_path):
    tok = ItemTokenizer(levels=2, codebook_size=32, seed=0).fit(clustered(600, 8, centers=10, seed=3), progress=False)
    user = tmp_path / "project"
    user.mkdir()
    (user / "items.csv").write_text("item_id\n1\n")
    (user / "notes").mkdir()
    with pytest.raises(FileExistsError, match="not a recbase artifact"):
        tok.save(user)  # a folder of the user's own files: refused, nothing touched
    assert sorted(p.name for p in user.iterdir()) == ["items.csv", "notes"]
    assert (user / "items.csv").read_text() == "item_id\n1\n"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        tok.save(tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "x"
    # re-saving a tokenizer folder keeps the files recbase's tokenizer does not write
    tok.save(tmp_path / "tok")
    (tmp_path / "tok" / "README.txt").write_text("mine")
    tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "README.txt").read_text() == "mine"
    np.testing.assert_array_equal(ItemTokenizer.load(tmp_path / "tok").codes, tok.codes)
    tok.save(tmp_path / "empty") if not (tmp_path / "empty").mkdir() else None  # an empty folder is fine
    assert (tmp_path / "empty" / "tokenizer.json").is_file()


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="dedup"):
        ItemTokenizer(dedup="maybe")
    tok = ItemTokenizer(levels=2, codebook_size=32)
    with pytest.raises(RuntimeError, match="not fitted"):
        tok.encode(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="fewer items"):
        tok.fit(np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="NaN"):
        tok.fit(np.full((100, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="2-d"):
        tok.fit(np.ones(100, np.float32))
    with pytest.raises(ValueError, match="empty"):
        tok.fit(np.ones((0, 4), np.float32))
    with pytest.raises(FileNotFoundError):
        ItemTokenizer.load(tmp_path / "missing")
    x = clustered(500, 8, centers=10, seed=8)
    tok.fit(x, progress=False)
    tok.save(tmp_path / "t")
    (tmp_path / "t" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        ItemTokenizer.load(tmp_path / "t")


def test_saved_files_take_their_permissions_from_the_umask(tmp_path):
    import os
    import stat

    tok = ItemTokenizer(levels=2, codebook_size=32, seed=0).fit(clustered(600, 8, centers=10, seed=3), progress=False)
    old = os.umask(0o022)
    try:
        tok.save(tmp_path / "tok")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "tok").stat().st_mode) == 0o755  # not mkdtemp's 0700
    for f in (tmp_path / "tok").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f  # not mkstemp's 0600
