"""recbase.data.corpus: the corpus file's checks (every one before any work), and the mixing of
domains' sequences against a direct computation."""
import numpy as np
import pandas as pd
import pytest

from recbase.data.corpus import Corpus, CorpusDomain, CorpusError, load_corpus, mix_sequences, mixing_counts


@pytest.fixture
def files(tmp_path):
    pd.DataFrame({"item_id": ["a", "b"], "title": ["A", "B"], "brand": ["x", "y"]}).to_csv(tmp_path / "items.csv", index=False)
    pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "b"]}).to_csv(tmp_path / "inter.csv", index=False)
    return tmp_path


def _write(tmp_path, text):
    p = tmp_path / "corpus.toml"
    p.write_text(text)
    return p


OWN = '''
[[domain]]
name = "shop"
items = "items.csv"
interactions = "inter.csv"
template = { noun = "product", fields = { Title = "title", Brand = "brand" } }
'''


def test_a_good_corpus_reads_with_paths_relative_to_the_file(files):
    c = load_corpus(_write(files, OWN + '\n[[domain]]\nname = "movies"\ndataset = "ml-100k"\nweight = 0.5\n'
                           '\n[mixing]\nalpha = 0.3\nseed = 4\n'))
    assert c.names() == ["shop", "movies"] and c.alpha == 0.3 and c.seed == 4
    assert c.domain("shop").items == str((files / "items.csv").resolve())
    assert c.domain("movies").weight == 0.5 and c.domain("movies").is_ordered
    assert not CorpusDomain("b", dataset="book-crossing").is_ordered  # its order is a permutation
    assert c.domain("shop").item_template().render({"title": "T", "brand": "B"}) == \
        'Describe a product: {"Title": "T", "Brand": "B"}'


@pytest.mark.parametrize("text, message", [
    ('[[domain]]\nname = "m"\ndataset = "ml-20m"\n', "unknown dataset 'ml-20m'"),
    ('[[domain]]\nname = "m"\nitems = "nope.csv"\ninteractions = "inter.csv"\n', "items file .*nope.csv.* does not exist"),
    ('[[domain]]\nname = "m"\nitems = "items.csv"\n', "interactions is missing"),
    (OWN + OWN, "duplicate domain name 'shop'"),
    (OWN + "weight = 0\n", r"weight must be a number > 0, got 0"),
    (OWN + "weight = -1.5\n", r"weight must be a number > 0, got -1.5"),
    (OWN.replace('Brand = "brand"', 'Brand = "maker"'), r"template field\(s\) \['maker'\] are not columns"),
    ('[[domain]]\nname = "m"\ndataset = "ml-1m"\nkcore = "5"\n', "kcore must be an int"),
    ('[[domain]]\nname = "m"\ndataset = "ml-1m"\ncolour = "red"\n', r"unknown key\(s\) \['colour'\]"),
    ('[[domain]]\nname = "m"\ndataset = "ml-1m"\n\n[mixing]\nalpha = 2\n', r"alpha must be a number in \[0, 1\]"),
    ('[[domain]]\nname = "m"\ndataset = "ml-1m"\nitems = "items.csv"\ninteractions = "inter.csv"\n', "either dataset"),
    ('[[domain]]\nname = "gadgets"\nitems = "items.csv"\ninteractions = "inter.csv"\n', "no built-in template"),
    ('[mixing]\nalpha = 0.5\n', "no \\[\\[domain\\]\\]"),
    ('[[domain]]\nname = "m"\ndataset = "ml-1m"\n\n[[domain]\nname = "x"\n', r"not valid TOML: .*line 5"),
    ('[[domain]]\nname = "m"\ndataset = ml-1m\n', r"not valid TOML: .*line 3"),
])
def test_bad_corpus_files_get_a_clear_error(files, text, message):
    with pytest.raises(CorpusError, match=message):
        load_corpus(_write(files, text))


def test_missing_corpus_file_and_python_objects(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "none.toml")
    with pytest.raises(CorpusError, match="duplicate domain name"):
        Corpus([CorpusDomain("m", dataset="ml-1m"), CorpusDomain("m", dataset="ml-100k")])
    with pytest.raises(CorpusError, match="weight must be"):
        Corpus([CorpusDomain("m", dataset="ml-1m", weight=float("nan"))])


@pytest.mark.parametrize("seed", range(4))
def test_mixing_matches_the_temperature_rule(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 200, size=rng.integers(1, 5))
    weights = rng.uniform(0.2, 3.0, size=len(sizes))
    alpha = float(rng.uniform(0, 1))
    q = (weights * sizes) ** alpha / ((weights * sizes) ** alpha).sum()
    counts = mixing_counts(sizes, weights, alpha)
    np.testing.assert_array_equal(counts, np.rint(q * sizes.sum()))
    per_domain = [[(i, j) for j in range(n)] for i, n in enumerate(sizes)]
    mixed, owner = mix_sequences(per_domain, weights, alpha, seed)
    assert len(mixed) == counts.sum() and np.bincount(owner, minlength=len(sizes)).tolist() == counts.tolist()
    for i, (n, c) in enumerate(zip(sizes, counts)):
        mine = [s for s in mixed if s[0] == i]
        used = {s[1] for s in mine}
        assert len(used) == min(n, c)  # without replacement below the size; every one (then repeats) above
    assert mix_sequences(per_domain, weights, alpha, seed)[0] == mixed  # seeded
    # alpha = 1: by size x weight; alpha = 0: every domain the same share
    np.testing.assert_array_equal(mixing_counts([10, 30], [1, 1], 1.0), [10, 30])
    np.testing.assert_array_equal(mixing_counts([10, 30], [1, 1], 0.0), [20, 20])
