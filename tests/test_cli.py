"""`recbase tokenize | pretrain | evaluate | recommend` on a user's own CSV files."""
import json

import numpy as np
import pandas as pd
import torch

from recbase.cli import main
from recbase.train import pack_batches

GENRES = ["Drama", "Comedy", "Action", "Horror", "Romance"]


def movie_items() -> pd.DataFrame:
    return pd.DataFrame({"item_id": [f"m{i}" for i in range(40)],
                         "title": [f"Film number {i}" for i in range(40)],
                         "genres": [GENRES[i % 5] for i in range(40)]})


def walks(rng, prefix: str, n: int, users: int) -> pd.DataFrame:
    """Interactions: each user walks the catalog in steps of 1 from a random start, 6 items."""
    rows = []
    for u in range(users):
        start = int(rng.integers(n))
        rows += [(f"u{u}", f"{prefix}{(start + t) % n}", t) for t in range(6)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


def user_files(tmp_path, seed: int):
    """Movie items + random-walk interactions written as CSV; (items, --items/--domain args)."""
    items = movie_items()
    items.to_csv(tmp_path / "items.csv", index=False)
    walks(np.random.default_rng(seed), "m", 40, 30).to_csv(tmp_path / "inter.csv", index=False)
    return items, ["--items", str(tmp_path / "items.csv"), "--domain", "movies"]


def nearest_codewords(emb: np.ndarray, codebooks) -> np.ndarray:
    """Residual quantization by brute force in float64: the nearest codeword per level."""
    cb = np.asarray(codebooks, dtype=np.float64)
    residual, codes = emb.astype(np.float64).copy(), []
    for level in range(cb.shape[0]):
        k = ((residual[:, None, :] - cb[level][None]) ** 2).sum(-1).argmin(1)
        codes.append(k)
        residual -= cb[level][k]
    return np.stack(codes, 1)


def test_cli_round_trip_on_user_files(tmp_path, capsys):
    items, common = user_files(tmp_path, 0)
    tok, model = tmp_path / "tok", tmp_path / "model"
    assert main(["tokenize", *common, "--fields", "Title=title,Genres=genres", "--levels", "2",
                 "--codebook-size", "8", "--output", str(tok)]) == 0
    assert json.loads((tok / "item_ids.json").read_text())[:2] == ["m0", "m1"]
    pretrain = ["pretrain", *common, "--interactions", str(tmp_path / "inter.csv"),
                "--tokenizer", str(tok), "--preset", "tiny", "--max-items", "8", "--epochs", "2"]
    assert main([*pretrain, "--tokens-per-batch", "64", "--output", str(model)]) == 0
    run = torch.load(model / "run" / "checkpoint.pt", weights_only=False)
    assert run["config"]["tokens_per_batch"] == 64
    # every user: 6 items -> 4 training items -> one sequence of BOS + 4 IDs; 2 epochs of <= 64 tokens
    id_length = json.loads((model / "config.json").read_text())["levels"]
    assert run["state"]["global_step"] == 2 * len(pack_batches([1 + 4 * id_length] * 30, 64, 0, 0))
    capsys.readouterr()
    # a batch smaller than one sequence: a clear error naming the option, exit 2
    assert main([*pretrain, "--tokens-per-batch", "8", "--output", str(tmp_path / "small")]) == 2
    assert "tokens_per_batch=8" in capsys.readouterr().err
    assert main(["evaluate", *common, "--interactions", str(tmp_path / "inter.csv"),
                 "--tokenizer", str(tok), "--model", str(model)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["recall@10"] <= 1.0
    assert main(["recommend", *common, "--tokenizer", str(tok), "--model", str(model),
                 "--history", "m3", "m4", "-k", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all(line.split()[-1] in set(items["item_id"]) for line in lines)
    # unknown item in a history: a clear error, exit code 2, no traceback
    assert main(["recommend", *common, "--tokenizer", str(tok), "--model", str(model),
                 "--history", "nope"]) == 2

    # the model is tied to its tokenizer: a re-fitted tokenizer of the same shape, or the same one
    # with its item ids permuted or cut, is refused before any recommendation (exit 2, named)
    import shutil

    refit, permuted, cut = tmp_path / "refit", tmp_path / "permuted", tmp_path / "cut"
    assert main(["tokenize", *common, "--fields", "Title=title,Genres=genres", "--levels", "2",
                 "--codebook-size", "8", "--seed", "5", "--output", str(refit)]) == 0
    ids = json.loads((tok / "item_ids.json").read_text())
    for folder, new_ids in ((permuted, ids[1:2] + ids[:1] + ids[2:]), (cut, ids[:-1])):
        shutil.copytree(tok, folder)
        (folder / "item_ids.json").write_text(json.dumps(new_ids))
    capsys.readouterr()
    for folder, msg in ((refit, "codebooks and catalog differ"), (permuted, "catalog differ"),
                        (cut, "must list one item id per concept ID")):
        assert main(["recommend", *common, "--tokenizer", str(folder), "--model", str(model),
                     "--history", "m3", "-k", "5"]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
    assert main(["evaluate", *common, "--interactions", str(tmp_path / "inter.csv"),
                 "--tokenizer", str(refit), "--model", str(model)]) == 2
    assert "is not the tokenizer" in capsys.readouterr().err


def test_cli_zero_shot_in_a_new_domain(tmp_path, capsys):
    """pretrain with content -> tokenize a new catalog on the same codebooks -> read it unseen."""
    rng = np.random.default_rng(1)
    books = pd.DataFrame({"item_id": [f"b{i}" for i in range(30)],
                          "title": [f"Novel {i} of the {GENRES[i % 5].lower()} shelf" for i in range(30)],
                          "author": [f"Author {i % 7}" for i in range(30)]})
    movie_items().to_csv(tmp_path / "movies.csv", index=False)
    books.to_csv(tmp_path / "books.csv", index=False)
    walks(rng, "m", 40, 30).to_csv(tmp_path / "movie_inter.csv", index=False)
    walks(rng, "b", 30, 20).to_csv(tmp_path / "book_inter.csv", index=False)
    mtok, btok, model, plain = (tmp_path / n for n in ("mtok", "btok", "model", "plain"))
    m_args = ["--items", str(tmp_path / "movies.csv"), "--domain", "movies"]
    b_args = ["--items", str(tmp_path / "books.csv"), "--domain", "books"]
    assert main(["tokenize", *m_args, "--fields", "Title=title,Genres=genres", "--levels", "2",
                 "--codebook-size", "8", "--output", str(mtok)]) == 0
    assert main(["tokenize", *b_args, "--fields", "Title=title,Author=author", "--codebooks", str(mtok),
                 "--output", str(btok)]) == 0

    # the books are IDs on the movies' codebooks: nearest codeword per level (float64, brute force)
    from recbase.tokenizer import ItemTokenizer
    mt, bt = ItemTokenizer.load(mtok), ItemTokenizer.load(btok)
    np.testing.assert_array_equal(np.asarray(bt.quantizer.codebooks), np.asarray(mt.quantizer.codebooks))
    emb = np.load(btok / "embeddings.npy")
    np.testing.assert_allclose(emb.mean(0), 0, atol=0.05)  # centred on the books' own mean
    np.testing.assert_array_equal(bt.codes[:, :mt.levels], nearest_codewords(emb, mt.quantizer.codebooks))
    assert len({tuple(c) for c in bt.codes}) == len(bt.codes)
    assert not {tuple(c) for c in bt.codes} & {tuple(c) for c in mt.codes}  # never a movie's ID
    assert bt.report()["num_items"] == 30

    pre = ["pretrain", *m_args, "--interactions", str(tmp_path / "movie_inter.csv"), "--tokenizer", str(mtok),
           "--preset", "tiny", "--max-items", "8", "--epochs", "2"]
    assert main([*pre, "--recent-pass-epochs", "-1", "--output", str(tmp_path / "bad")]) == 2
    assert "--recent-pass-epochs must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before any training
    assert main([*pre, "--content-rotation-rate", "0.5", "--recent-pass-epochs", "1", "--output", str(model)]) == 0
    assert (model / "recent-pass" / "checkpoint.pt").exists()
    capsys.readouterr()
    on_books = [*b_args, "--tokenizer", str(btok), "--model", str(model), "--unseen"]
    assert main(["evaluate", *on_books, "--interactions", str(tmp_path / "book_inter.csv")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["ndcg@10"] <= metrics["recall@10"] <= 1.0
    assert main(["recommend", *on_books, "--history", "b3", "b4", "-k", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all(line.split()[-1] in set(books["item_id"]) for line in lines)

    # --unseen reads another catalog on the same codebooks; one on other codebooks is refused
    other = tmp_path / "other"
    assert main(["tokenize", *b_args, "--fields", "Title=title,Author=author", "--levels", "2",
                 "--codebook-size", "8", "--output", str(other)]) == 0
    capsys.readouterr()
    assert main(["recommend", *b_args, "--tokenizer", str(other), "--model", str(model), "--unseen",
                 "--history", "b3"]) == 2
    assert "its codebooks differ" in capsys.readouterr().err

    # a model pretrained without content cannot read an unseen domain: a clear error, exit 2
    assert main([*pre, "--output", str(plain)]) == 0
    capsys.readouterr()
    assert main(["recommend", *b_args, "--tokenizer", str(btok), "--model", str(plain), "--unseen",
                 "--history", "b3"]) == 2
    assert "concept vectors" in capsys.readouterr().err


def test_cli_tokenize_reassign_gives_ids_of_levels_tokens(tmp_path, capsys):
    """--dedup reassign: IDs of `levels` tokens, unique; an item whose tuple no other item shares
    keeps its nearest codewords (float64 brute force); the pipeline runs on such IDs."""
    from recbase.tokenizer import ItemTokenizer
    items, common = user_files(tmp_path, 2)
    tok_dir, model = tmp_path / "tok", tmp_path / "model"
    assert main(["tokenize", *common, "--fields", "Title=title,Genres=genres", "--levels", "2",
                 "--codebook-size", "8", "--dedup", "reassign", "--output", str(tok_dir)]) == 0
    tok = ItemTokenizer.load(tok_dir)
    assert tok.dedup == "reassign" and tok.id_length == 2 and tok.codes.shape == (40, 2)
    assert len({tuple(c) for c in tok.codes}) == 40
    semantic = nearest_codewords(np.load(tok_dir / "embeddings.npy"), tok.quantizer.codebooks)
    _, inverse, counts = np.unique(semantic, axis=0, return_inverse=True, return_counts=True)
    alone = counts[inverse.reshape(-1)] == 1
    assert alone.any() and (~alone).any()  # both kinds occur with 40 items on 8 x 8 codes
    np.testing.assert_array_equal(tok.codes[alone], semantic[alone])
    np.testing.assert_array_equal(tok.codes[:, 0], semantic[:, 0])  # only the last level moves
    assert main(["pretrain", *common, "--interactions", str(tmp_path / "inter.csv"), "--tokenizer", str(tok_dir),
                 "--preset", "tiny", "--max-items", "8", "--epochs", "1", "--tokens-per-batch", "64",
                 "--output", str(model)]) == 0
    capsys.readouterr()
    assert main(["recommend", *common, "--tokenizer", str(tok_dir), "--model", str(model),
                 "--history", "m0", "m1", "m2", "-k", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all(line.split()[-1] in set(items["item_id"]) for line in lines)


def test_cli_tokenize_takes_your_own_embeddings_or_encoder(tmp_path, capsys):
    """--embeddings: the user's vectors, row i = item i, centred and unit-length, quantized (levels checked
    against float64 brute force); --encoder: any local HuggingFace folder; bad input: exit 2."""
    from recbase.data.encoder import default_model_dir
    from recbase.tokenizer import ItemTokenizer, centre_embeddings
    items, common = user_files(tmp_path, 3)
    emb = np.random.default_rng(3).normal(size=(40, 12)).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    tok_args = ["--levels", "2", "--codebook-size", "8"]
    assert main(["tokenize", *common, "--embeddings", str(tmp_path / "emb.npy"), *tok_args,
                 "--output", str(tmp_path / "tok")]) == 0
    tok = ItemTokenizer.load(tmp_path / "tok")
    centred = emb.astype(np.float64) - emb.mean(0, dtype=np.float64)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)  # centred on the catalog's mean, unit rows
    np.testing.assert_allclose(np.load(tmp_path / "tok" / "embeddings.npy"), centred, atol=1e-6)
    np.testing.assert_array_equal(tok.codes[:, :2], nearest_codewords(centre_embeddings(emb), tok.quantizer.codebooks))
    assert len({tuple(c) for c in tok.codes}) == 40

    # the packaged encoder named by its folder gives the default's vectors
    assert main(["tokenize", *common, *tok_args, "--output", str(tmp_path / "default")]) == 0
    assert main(["tokenize", *common, *tok_args, "--encoder", str(default_model_dir()),
                 "--output", str(tmp_path / "named")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "named" / "embeddings.npy"),
                               np.load(tmp_path / "default" / "embeddings.npy"), atol=1e-6)
    capsys.readouterr()

    bad = {"rows.npy": emb[:39], "nan.npy": np.where(np.eye(40, 12) > 0, np.nan, emb), "ints.npy": np.ones((40, 3), int)}
    for name, arr in bad.items():
        np.save(tmp_path / name, arr)
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    for name, msg in (("rows.npy", "shape (40 items"), ("nan.npy", "NaN"), ("ints.npy", "float array"),
                      ("junk.npy", "cannot read")):
        assert main(["tokenize", *common, "--embeddings", str(tmp_path / name), *tok_args,
                     "--output", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert "--embeddings" in err and msg in err, err
    assert main(["tokenize", *common, "--embeddings", str(tmp_path / "emb.npy"), "--fields", "Title=title",
                 "--output", str(tmp_path / "bad")]) == 2
    assert main(["tokenize", *common, "--encoder", str(tmp_path), "--output", str(tmp_path / "bad")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing written on bad input


def test_cli_dense_channel_pretrain_evaluate_recommend(tmp_path, capsys):
    """pretrain --dense stores fusion weights chosen on validation; evaluate/recommend --mode."""
    rng = np.random.default_rng(2)
    movie_items().to_csv(tmp_path / "movies.csv", index=False)
    walks(rng, "m", 40, 30).to_csv(tmp_path / "inter.csv", index=False)
    m_args = ["--items", str(tmp_path / "movies.csv"), "--domain", "movies"]
    tok, model = tmp_path / "tok", tmp_path / "model"
    assert main(["tokenize", *m_args, "--fields", "Title=title,Genres=genres", "--levels", "2",
                 "--codebook-size", "8", "--dedup", "reassign", "--output", str(tok)]) == 0
    pre = ["pretrain", *m_args, "--interactions", str(tmp_path / "inter.csv"), "--tokenizer", str(tok),
           "--preset", "tiny", "--max-items", "8", "--epochs", "1", "--tokens-per-batch", "128"]
    assert main([*pre, "--dense", "--content-rotation-rate", "0.5", "--output", str(model)]) == 0
    out = capsys.readouterr().out
    assert "fusion weight (seen)" in out and "fusion weight (unseen)" in out
    saved = json.loads((model / "config.json").read_text())
    assert saved["item_vector_dim"] == np.load(tok / "embeddings.npy").shape[1]
    assert set(saved["fusion_weights"]) == {"seen", "unseen"}
    for mode in ("generative", "dense", "hybrid"):
        assert main(["evaluate", *m_args, "--interactions", str(tmp_path / "inter.csv"), "--tokenizer", str(tok),
                     "--model", str(model), "--mode", mode]) == 0
        metrics = json.loads(capsys.readouterr().out)
        assert 0.0 <= metrics["ndcg@10"] <= metrics["recall@10"] <= 1.0
    assert main(["recommend", *m_args, "--tokenizer", str(tok), "--model", str(model), "--unseen",
                 "--history", "m3", "m4", "-k", "5", "--mode", "hybrid"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all(line.split()[-1].startswith("m") for line in lines)
    # a model without the dense channel: --mode dense is refused with a clear error, exit 2
    assert main([*pre, "--output", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main(["recommend", *m_args, "--tokenizer", str(tok), "--model", str(tmp_path / "plain"),
                 "--history", "m3", "--mode", "dense"]) == 2
    assert "no dense item channel" in capsys.readouterr().err


def _corpus_files(tmp_path):
    rng = np.random.default_rng(4)
    books = pd.DataFrame({"item_id": [f"b{i}" for i in range(30)],
                          "title": [f"Novel {i} of the {GENRES[i % 5].lower()} shelf" for i in range(30)],
                          "author": [f"Author {i % 7}" for i in range(30)]})
    (tmp_path / "data").mkdir()
    movie_items().to_csv(tmp_path / "data" / "movies.csv", index=False)
    books.to_parquet(tmp_path / "data" / "books.parquet", index=False)
    walks(rng, "m", 40, 30).to_csv(tmp_path / "data" / "movie_inter.csv", index=False)
    walks(rng, "b", 30, 25).drop(columns="timestamp").to_csv(tmp_path / "data" / "book_inter.csv", index=False)
    corpus = tmp_path / "corpus.toml"
    corpus.write_text('''
[mixing]
alpha = 0.5

[[domain]]
name = "movies"
items = "data/movies.csv"
interactions = "data/movie_inter.csv"
template = { noun = "movie", fields = { Title = "title", Genres = "genres" } }
kcore = 0

[[domain]]
name = "books"
items = "data/books.parquet"
interactions = "data/book_inter.csv"
ordered = false
weight = 2.0
kcore = 0
''')
    return corpus


def test_cli_corpus_pretrain_and_zero_shot_evaluate(tmp_path, capsys):
    """A corpus of two user-file domains: pretrain on one, evaluate the held-out one zero-shot with
    the baselines in the same run."""
    corpus = _corpus_files(tmp_path)
    run = tmp_path / "run"
    pre = ["pretrain", "--corpus", str(corpus), "--preset", "tiny", "--max-items", "6", "--epochs", "1",
           "--levels", "2", "--codebook-size", "16", "--content-rotation-rate", "0.5", "--dense",
           "--tokens-per-batch", "256"]
    assert main([*pre, "--hold-out", "games", "--output", str(run)]) == 2
    assert "--hold-out: ['games'] not among the corpus domains ['movies', 'books']" in capsys.readouterr().err
    assert main([*pre, "--hold-out", "movies", "books", "--output", str(run)]) == 2
    assert "nothing is left" in capsys.readouterr().err and not run.exists()
    assert main([*pre, "--hold-out", "books", "--output", str(run)]) == 0
    meta = json.loads((run / "run.json").read_text())
    assert meta["trained_on"] == ["movies"] and meta["domains"]["books"] == {"rows": [40, 70], "ordered": False}
    assert json.loads((run / "catalogs" / "books" / "item_ids.json").read_text())[:2] == ["b0", "b1"]
    from recbase.tokenizer import ItemTokenizer
    tok = ItemTokenizer.load(run / "tokenizer")
    assert len({tuple(c) for c in tok.codes}) == 70  # one tokenizer, IDs unique across both domains
    capsys.readouterr()
    assert main(["evaluate", "--corpus", str(corpus), "--model", str(run), "--domain", "books", "--zero-shot",
                 "--text-sasrec-epochs", "1"]) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| books |")]
    models = [line.split("|")[2].strip() for line in lines]
    assert models == ["popularity", "text-kNN", "TextSASRec (zero-shot)", "recbase generative (zero-shot)",
                      "recbase dense (zero-shot)", "recbase hybrid (zero-shot)"]
    for line in lines:
        recall, se, ndcg, _, _, auc = (float(x) for x in line.split("|")[3:9])
        assert 0.0 <= ndcg <= recall <= 1.0 and se >= 0.0 and 0.0 <= auc <= 1.0
    # in-domain, the peer is trained on what the model trained on (movies), so it is in-domain too
    assert main(["evaluate", "--corpus", str(corpus), "--model", str(run), "--domain", "movies",
                 "--text-sasrec-epochs", "1", "--max-users", "20"]) == 0
    assert "| movies | TextSASRec (in-domain) |" in capsys.readouterr().out
    assert main(["evaluate", "--corpus", str(corpus), "--model", str(run), "--domain", "books", "--zero-shot",
                 "--task", "direct"]) == 2  # 30 books: not 99 unseen ones per user
    assert "ask for fewer negatives" in capsys.readouterr().err
    assert main(["evaluate", "--corpus", str(corpus), "--model", str(run), "--domain", "books", "--zero-shot",
                 "--task", "direct", "--num-negatives", "9"]) == 0
    table = capsys.readouterr().out
    assert "direct_hr@10" in table.splitlines()[0]
    for line in (x for x in table.splitlines() if x.startswith("| books |")):
        hr1, hr5, hr10 = (float(x) for x in line.split("|")[3:6])
        assert 0.0 <= hr1 <= hr5 <= hr10 <= 1.0
    assert main(["evaluate", "--corpus", str(corpus), "--model", str(run), "--domain", "books", "--zero-shot",
                 "--text-sasrec-epochs", "-1"]) == 2
    assert "--text-sasrec-epochs must be >= 0, got -1" in capsys.readouterr().err
    # a domain the model trained on is not zero-shot; an unknown domain is named
    assert main(["evaluate", "--corpus", str(corpus), "--model", str(run), "--domain", "movies", "--zero-shot"]) == 2
    assert "trained on 'movies'" in capsys.readouterr().err
    assert main(["evaluate", "--corpus", str(corpus), "--model", str(run), "--domain", "games"]) == 2
    assert "no domain 'games'" in capsys.readouterr().err
    # a run folder is never written over a folder of the user's own files
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main([*pre, "--hold-out", "books", "--output", str(tmp_path / "mine")]) == 2
    assert "not a recbase run" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_cli_tokenize_keeps_ids_as_written_and_refuses_bad_ids(tmp_path, capsys):
    emb = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    items = pd.DataFrame({"item_id": [f"{i:03d}" for i in range(40)], "title": [f"t{i}" for i in range(40)]})
    items.to_csv(tmp_path / "items.csv", index=False)
    args = ["--domain", "movies", "--embeddings", str(tmp_path / "emb.npy"), "--levels", "2", "--codebook-size", "8"]
    assert main(["tokenize", "--items", str(tmp_path / "items.csv"), *args, "--output", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "item_ids.json").read_text())[:3] == ["000", "001", "002"]  # zeros kept
    for name, bad, msg in (("dup.csv", items.assign(item_id=["007"] * 2 + items["item_id"].tolist()[2:]), "duplicate"),
                           ("missing.csv", items.assign(item_id=[""] + items["item_id"].tolist()[1:]), "without an item_id")):
        bad.to_csv(tmp_path / name, index=False)
        capsys.readouterr()
        assert main(["tokenize", "--items", str(tmp_path / name), *args, "--output", str(tmp_path / name[:-4])]) == 2
        err = capsys.readouterr().err
        assert "--items" in err and msg in err, err
        assert not (tmp_path / name[:-4]).exists()


def test_cli_refuses_settings_that_do_nothing_before_any_work(tmp_path, capsys):
    _, common = user_files(tmp_path, 0)
    pre = ["pretrain", *common, "--interactions", str(tmp_path / "inter.csv"), "--tokenizer", str(tmp_path / "none")]
    for flag, value, msg in (("--epochs", "0", "--epochs must be >= 1"), ("--max-items", "1", "--max-items must be >= 2"),
                             ("--content-rotation-rate", "1.5", "--content-rotation-rate must be in [0, 1]")):
        assert main([*pre, flag, value, "--output", str(tmp_path / "m")]) == 2
        assert msg in capsys.readouterr().err
    assert main(["recommend", *common, "--tokenizer", str(tmp_path / "none"), "--model", str(tmp_path / "none"),
                 "--history", "m1", "-k", "0"]) == 2
    assert "-k must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_cli_zeroshot_leave_one_domain_out_table_and_plot(tmp_path, capsys):
    corpus = _corpus_files(tmp_path)
    out = tmp_path / "lodo"
    args = ["zeroshot", "--corpus", str(corpus), "--preset", "tiny", "--hidden-size", "32", "--layers", "1",
            "--max-items", "6", "--epochs", "1", "--levels", "2", "--codebook-size", "16",
            "--tokens-per-batch", "256", "--recent-pass-epochs", "0", "--output", str(out)]
    assert main(args) == 0
    rows = json.loads((out / "zeroshot.json").read_text())
    assert [(r["held_out"], r["trained_on"]) for r in rows if r["model"] == "text-kNN"] == \
        [("movies", "books"), ("books", "movies")]
    # pretraining data of each row: the training items of the other domain (leave-one-out: all but 2 per user)
    assert {r["held_out"]: r["pretrain_interactions"] for r in rows} == {"movies": 25 * 4, "books": 30 * 4}
    assert (out / "zeroshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "zeroshot.md").read_text()
    assert table.count("recbase hybrid (zero-shot)") == 2 and "| books | movies (120) |" in table
    # the text-sequence peer trained on the same other domain, and every row's AUC (CTR protocol)
    assert [r["held_out"] for r in rows if r["model"] == "TextSASRec (zero-shot)"] == ["movies", "books"]
    assert all(0.0 <= r["auc"] <= 1.0 for r in rows)
    for flag, value in (("--text-sasrec-epochs", "-1"), ("--shuffle-rate", "1.5")):
        assert main([*args[:-2], flag, value, "--output", str(tmp_path / "y")]) == 2
        assert f"{flag} must be" in capsys.readouterr().err and not (tmp_path / "y").exists()
    capsys.readouterr()
    bad = tmp_path / "one.toml"
    bad.write_text('[[domain]]\nname = "m"\ndataset = "ml-1m"\n')
    assert main(["zeroshot", "--corpus", str(bad), "--output", str(tmp_path / "x")]) == 2
    assert "at least two domains" in capsys.readouterr().err


def test_cli_fails_like_a_tool(tmp_path, capsys):
    """One line naming the command and the file/option, exit 2, no traceback (unless --debug)."""
    import pytest

    _, common = user_files(tmp_path, 0)
    (tmp_path / "tok").mkdir()
    for argv, msg in ((["recommend", *common, "--tokenizer", str(tmp_path / "tok"), "--model", str(tmp_path / "nope"),
                        "--history", "m1"], "no tokenizer.json"),
                      (["evaluate", *common, "--interactions", str(tmp_path / "inter.csv"), "--tokenizer",
                        str(tmp_path / "none"), "--model", str(tmp_path / "nope")], "tokenizer")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"recbase {argv[0]}: error: ") and len(err.strip().splitlines()) == 1, err
        assert msg in err and "Traceback" not in err
    # a model folder that does not exist is named (no download attempt, no hub message)
    assert main(["tokenize", *common, "--fields", "Title=title", "--levels", "2", "--codebook-size", "8",
                 "--output", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    assert main(["recommend", *common, "--tokenizer", str(tmp_path / "t"), "--model", str(tmp_path / "nope"),
                 "--history", "m1"]) == 2
    err = capsys.readouterr().err
    assert "--model:" in err and "not a model folder" in err and "huggingface" not in err.lower()
    with pytest.raises(ValueError):  # --debug: the exception itself
        main(["--debug", "recommend", *common, "--tokenizer", str(tmp_path / "t"), "--model", str(tmp_path / "nope"),
              "--history", "m1"])


def test_cli_bundle_serves_batch_recommendations_and_evaluates(tmp_path, capsys):
    """tokenize + pretrain --dense -> `recbase bundle` -> recommend --histories (a file of users,
    one batch) equal to one-by-one --history, evaluate --bundle equal to evaluate on the folders."""
    rng = np.random.default_rng(5)
    items = movie_items()
    items.to_csv(tmp_path / "movies.csv", index=False)
    inter = walks(rng, "m", 40, 30)
    inter.to_csv(tmp_path / "inter.csv", index=False)
    m_args = ["--items", str(tmp_path / "movies.csv"), "--domain", "movies"]
    tok, model, bundle = tmp_path / "tok", tmp_path / "model", tmp_path / "bundle"
    assert main(["tokenize", *m_args, "--fields", "Title=title,Genres=genres", "--levels", "2",
                 "--codebook-size", "8", "--output", str(tok)]) == 0
    assert np.load(tok / "embedding_mean.npy").shape == np.load(tok / "embeddings.npy").shape[1:]
    assert main(["pretrain", *m_args, "--interactions", str(tmp_path / "inter.csv"), "--tokenizer", str(tok),
                 "--preset", "tiny", "--max-items", "8", "--epochs", "1", "--tokens-per-batch", "128", "--dense",
                 "--output", str(model)]) == 0
    assert main(["bundle", "--tokenizer", str(tok), "--model", str(model), "--domain", "movies",
                 "--output", str(bundle)]) == 0
    assert (bundle / "bundle.json").is_file()
    capsys.readouterr()
    # a file of histories -> a Parquet of (user_id, rank, item_id, score), the same as one at a time
    some = inter[inter.user_id.isin(["u0", "u1", "u2"])].sample(frac=1.0, random_state=0)  # rows out of order
    some.to_csv(tmp_path / "hist.csv", index=False)
    assert main(["recommend", "--bundle", str(bundle), "--histories", str(tmp_path / "hist.csv"), "-k", "4",
                 "--output", str(tmp_path / "recs.parquet")]) == 0
    recs = pd.read_parquet(tmp_path / "recs.parquet")
    assert list(recs.columns) == ["user_id", "rank", "item_id", "score"]
    for user, got in recs.groupby("user_id"):
        history = some[some.user_id == user].sort_values("timestamp").item_id.tolist()
        capsys.readouterr()
        assert main(["recommend", "--bundle", str(bundle), "--history", *history, "-k", "4"]) == 0
        lines = [line.split() for line in capsys.readouterr().out.strip().splitlines()]
        assert got["rank"].tolist() == [1, 2, 3, 4]
        assert got.item_id.tolist() == [line[1] for line in lines]
        np.testing.assert_allclose(got.score.to_numpy(), [float(line[0]) for line in lines], atol=1e-4)
        assert not set(got.item_id) & set(history)
    # evaluate through the bundle == evaluate through the folders
    assert main(["evaluate", "--bundle", str(bundle), "--interactions", str(tmp_path / "inter.csv")]) == 0
    via_bundle = json.loads(capsys.readouterr().out)
    assert main(["evaluate", *m_args, "--interactions", str(tmp_path / "inter.csv"), "--tokenizer", str(tok),
                 "--model", str(model)]) == 0
    assert json.loads(capsys.readouterr().out) == via_bundle
    # direct recommendation (1 + 99 candidates): the same through the bundle and the folders
    direct = []
    for argv in (["--bundle", str(bundle)], [*m_args, "--tokenizer", str(tok), "--model", str(model)]):
        assert main(["evaluate", *argv, "--interactions", str(tmp_path / "inter.csv"), "--task", "direct",
                     "--num-negatives", "9"]) == 0
        direct.append(json.loads(capsys.readouterr().out))
    assert direct[0] == direct[1] and {"recbase", "popularity"} <= set(direct[0])
    for m in direct[0].values():
        assert 0.0 <= m["hr@1"] <= m["hr@5"] <= m["hr@10"] <= 1.0 and m["ndcg@10"] <= m["hr@10"]
    # bad input: clear one-line errors, exit 2, nothing written
    pd.DataFrame({"user_id": ["u0"], "item_id": ["nope"]}).to_csv(tmp_path / "bad.csv", index=False)
    for argv, msg in (
            (["recommend", "--bundle", str(bundle), "--histories", str(tmp_path / "bad.csv"), "--output",
              str(tmp_path / "bad.parquet")], "not in the 'movies' catalog, e.g. 'nope'"),
            (["recommend", "--bundle", str(bundle), "--history", "m1", "--model", str(model)], "drop --model"),
            (["recommend", "--bundle", str(bundle), "--histories", str(tmp_path / "hist.csv")],
             "--histories and --output go together"),
            (["recommend", "--bundle", str(tmp_path), "--history", "m1"], "not a recbase bundle")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
    assert not (tmp_path / "bad.parquet").exists()

    # a living catalog from the command line: new items from their text alone, an item taken out
    new = pd.DataFrame({"item_id": ["n0", "n1"], "title": ["Brand new film", "Another new film"],
                        "genres": ["Drama", "Comedy"]})
    new.to_csv(tmp_path / "new.csv", index=False)
    assert main(["catalog", "--bundle", str(bundle), "--add", str(tmp_path / "new.csv"), "--remove", "m3"]) == 0
    assert "42 items (41 live)" in capsys.readouterr().out
    from recbase.recommend import Recommender
    from recbase.data import TextEncoder
    from recbase.data.text import render_items
    from recbase.tokenizer import centre_embeddings

    rec = Recommender.load(bundle)
    assert rec.item_ids["movies"][-2:] == ["n0", "n1"] and rec.removed["movies"].sum() == 1
    # the new items were read like the catalog's: their text, the same template and encoder, the
    # catalog's centring (on the old items' mean), then unit length
    old_raw = TextEncoder().encode(render_items(items, _template_for_test()))
    new_raw = TextEncoder().encode(render_items(new, _template_for_test()))
    np.testing.assert_allclose(rec.embeddings["movies"][:40].numpy(), centre_embeddings(old_raw), atol=1e-5)
    want = (new_raw - old_raw.mean(0)) / np.linalg.norm(new_raw - old_raw.mean(0), axis=1, keepdims=True)
    np.testing.assert_allclose(rec.embeddings["movies"][-2:].numpy(), want, atol=1e-5)
    assert main(["recommend", "--bundle", str(bundle), "--histories", str(tmp_path / "hist.csv"), "-k", "40",
                 "--output", str(tmp_path / "all.csv")]) == 0
    recs = pd.read_csv(tmp_path / "all.csv", dtype={"item_id": str})
    assert "m3" not in set(recs.item_id)  # removed: never returned
    for argv, msg in ((["catalog", "--bundle", str(bundle), "--add", str(tmp_path / "new.csv")],
                       "'n0' is already an item"),
                      (["catalog", "--bundle", str(bundle), "--remove", "nope"], "'nope' is not an item"),
                      (["catalog", "--bundle", str(bundle)], "give --add")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
    assert len(Recommender.load(bundle).item_ids["movies"]) == 42  # refused calls wrote nothing


def _template_for_test():
    from recbase.data.text import ItemTemplate

    return ItemTemplate("movie", {"Title": "title", "Genres": "genres"})


def test_cli_rating_task_pretrain_and_evaluate(tmp_path, capsys):
    """pretrain --tasks sequential=1,rating=1 on interactions with ratings, then evaluate --task
    rating (recbase next to the rating baselines) and --task direct; bad --tasks are refused."""
    items, common = user_files(tmp_path, 3)
    inter = pd.read_csv(tmp_path / "inter.csv")
    quality = {f"m{i}": 1 + i % 5 for i in range(40)}
    inter.assign(rating=inter.item_id.map(quality)).to_csv(tmp_path / "rated.csv", index=False)
    tok, model = tmp_path / "tok", tmp_path / "model"
    assert main(["tokenize", *common, "--fields", "Title=title,Genres=genres", "--levels", "2",
                 "--codebook-size", "8", "--output", str(tok)]) == 0
    pretrain = ["pretrain", *common, "--tokenizer", str(tok), "--preset", "tiny", "--max-items", "6", "--epochs", "2",
                "--tokens-per-batch", "256"]
    capsys.readouterr()
    for bad, msg in ((["--tasks", "sequential=1,explain=1"], "tasks"), (["--tasks", "rating=x"], "task=weight"),
                     (["--tasks", "rating=1", "--interactions", str(tmp_path / "inter.csv")], "no explicit ratings")):
        argv = [*pretrain, *bad, "--output", str(tmp_path / "bad")]
        if "--interactions" not in argv:
            argv += ["--interactions", str(tmp_path / "rated.csv")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
    assert main([*pretrain, "--interactions", str(tmp_path / "rated.csv"), "--tasks", "sequential=1,rating=1",
                 "--output", str(model)]) == 0
    saved = json.loads((model / "config.json").read_text())
    assert saved["rating_task"] and saved["rating_scales"] == {"movies": [1.0, 5.0]}
    capsys.readouterr()
    evaluate = ["evaluate", *common, "--interactions", str(tmp_path / "rated.csv"), "--tokenizer", str(tok),
                "--model", str(model)]
    assert main([*evaluate, "--task", "rating"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows) == {"recbase", "global mean", "user + item bias", "matrix factorization (ALS)"}
    for r in rows.values():
        assert 0.0 <= r["mae"] <= r["rmse"] <= 4.0 and r["users"] == 30
    # interactions without ratings: a clear error
    assert main(["evaluate", *common, "--interactions", str(tmp_path / "inter.csv"), "--tokenizer", str(tok),
                 "--model", str(model), "--task", "rating"]) == 2
    assert "no explicit ratings" in capsys.readouterr().err
