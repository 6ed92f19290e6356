"""ConceptTrie against brute force (Python sets/dicts of code tuples) on seeded random catalogs."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recbase import ConceptTrie
from recbase._native import C
from recbase.ops.beam import constrained_beam_step, constrained_beam_step_reference


def random_codes(rng: np.random.Generator, n: int, L: int, K: int) -> np.ndarray:
    """n unique rows, random order (n <= K**L)."""
    flat = rng.choice(K ** L, size=n, replace=False)
    return np.stack([(flat // K ** (L - 1 - l)) % K for l in range(L)], 1).astype(np.int64)


def brute_children(codes: np.ndarray, prefix: tuple) -> list[int]:
    d = len(prefix)
    return sorted({int(r[d]) for r in codes if tuple(int(x) for x in r[:d]) == prefix})


@pytest.mark.parametrize("n,L,K", [(1, 1, 1), (50, 3, 5), (300, 4, 6), (200, 2, 40)])
def test_structure_and_lookup_match_brute_force(n, L, K):
    rng = np.random.default_rng(n + L * 7 + K)
    codes = random_codes(rng, n, L, K)
    trie = ConceptTrie(codes, codebook_size=K)
    assert (trie.num_items, trie.depth, trie.codebook_size) == (n, L, K)
    prefixes = {tuple(r[:d]) for r in codes.tolist() for d in range(L + 1)}
    assert trie.num_nodes == len(prefixes)
    # Walk every node via children() and compare with the brute-force children of its prefix.
    stack = [(0, ())]
    seen = 0
    while stack:
        node, prefix = stack.pop()
        seen += 1
        assert trie.node_depth(node) == len(prefix)
        cc, ids = trie.children(node)
        assert cc.tolist() == (brute_children(codes, prefix) if len(prefix) < L else [])
        stack.extend((int(i), prefix + (int(c),)) for c, i in zip(cc, ids))
    assert seen == trie.num_nodes
    # Root table = root's children by code.
    rt = trie.root_table
    c0, i0 = trie.children(0)
    expect = np.full(K, -1)
    expect[c0] = i0
    np.testing.assert_array_equal(rt, expect)
    # Lookup of members returns their indices; of random non-members -1.
    np.testing.assert_array_equal(trie.lookup(codes), np.arange(n))
    member = {tuple(r) for r in codes.tolist()}
    q = rng.integers(0, K + 1, size=(500, L))  # includes out-of-range code K
    expect = np.array([-1 if tuple(r) not in member else codes.tolist().index(list(r)) for r in q.tolist()])
    np.testing.assert_array_equal(trie.lookup(q), expect)
    out = trie.lookup(torch.from_numpy(codes))
    assert isinstance(out, torch.Tensor) and out.tolist() == list(range(n))
    items, leaf_codes = trie.item_codes()
    np.testing.assert_array_equal(codes[items], leaf_codes)
    assert trie.memory_bytes >= 8 * (2 * trie.num_nodes + 1 + n)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="empty catalog"):
        ConceptTrie(np.zeros((0, 3), dtype=np.int64), codebook_size=4)
    with pytest.raises(ValueError, match=r"items 1 and 3 have the same concept ID"):
        ConceptTrie(np.array([[0, 1], [2, 2], [1, 1], [2, 2]]), codebook_size=4)
    with pytest.raises(ValueError, match=r"value 4 at item 1, level 0 is outside \[0, codebook_size=4\)"):
        ConceptTrie(np.array([[0, 1], [4, 2]]), codebook_size=4)
    with pytest.raises(ValueError, match="value -1"):
        ConceptTrie(np.array([[0, -1]]), codebook_size=4)
    with pytest.raises(TypeError, match="integer"):
        ConceptTrie(np.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="2-d"):
        ConceptTrie(np.array([0, 1, 2]))
    # The C++ entry point itself: dtype, rank and contiguity.
    with pytest.raises(ValueError, match="dtype int64"):
        C.ConceptTrie.build(np.array([[0, 1]], dtype=np.int32), 4)
    with pytest.raises(ValueError, match="C-contiguous"):
        C.ConceptTrie.build(np.zeros((4, 4), dtype=np.int64)[:, ::2], 4)
    trie = ConceptTrie(np.array([[0, 1], [2, 2]]), codebook_size=4)
    with pytest.raises(ValueError, match=r"expected shape \(M, 2\)"):
        trie.lookup(np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="outside"):
        trie.children(99)


def test_subset_keeps_original_numbering():
    rng = np.random.default_rng(3)
    codes = random_codes(rng, 400, 3, 9)
    trie = ConceptTrie(codes, codebook_size=9)
    keep = rng.choice(400, size=57, replace=False)
    sub = trie.subset(torch.from_numpy(keep))
    assert sub.num_items == 57 and sub.item_space == 400
    expect = np.full(400, -1)
    expect[keep] = keep
    np.testing.assert_array_equal(sub.lookup(codes), expect)
    # Same structure as a trie built from the subset's rows.
    direct = ConceptTrie(codes[np.sort(keep)], codebook_size=9)
    np.testing.assert_array_equal(sub.offsets, direct.offsets)
    np.testing.assert_array_equal(sub.codes, direct.codes)
    np.testing.assert_array_equal(sub.leaf_items, np.sort(keep)[direct.leaf_items])
    # Subset of a subset, still in original numbering.
    sub2 = sub.subset(keep[:5])
    assert sorted(sub2.lookup(codes[keep[:5]]).tolist()) == sorted(keep[:5].tolist())
    with pytest.raises(ValueError, match="is not in this trie"):
        sub.subset([int(np.setdiff1d(np.arange(400), keep)[0])])
    with pytest.raises(ValueError, match="repeated"):
        trie.subset([1, 1])
    with pytest.raises(ValueError, match="empty subset"):
        trie.subset([])


def test_serialisation_roundtrip(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(5)
    codes = random_codes(rng, 300, 4, 7)
    trie = ConceptTrie(codes, codebook_size=7).subset(np.arange(0, 300, 2))
    save_file(trie.to_dict(), str(tmp_path / "trie.safetensors"))
    back = ConceptTrie.from_dict(load_file(str(tmp_path / "trie.safetensors")))
    assert back.trie_id == trie.trie_id
    assert (back.num_items, back.item_space, back.num_nodes) == (150, 300, trie.num_nodes)
    np.testing.assert_array_equal(back.lookup(codes), trie.lookup(codes))
    assert pickle.loads(pickle.dumps(trie)).trie_id == trie.trie_id
    assert ConceptTrie(codes[:10], 7).trie_id != ConceptTrie(codes[:11], 7).trie_id
    # Corrupted arrays are rejected, not trusted.
    bad = trie.to_dict()
    bad["trie.codes"] = bad["trie.codes"].copy()
    c0, ids = trie.children(0)
    bad["trie.codes"][ids[0]], bad["trie.codes"][ids[1]] = c0[1], c0[0]
    with pytest.raises(ValueError, match="strictly increasing"):
        ConceptTrie.from_dict(bad)
    bad = trie.to_dict()
    bad["trie.offsets"] = bad["trie.offsets"][:-1]
    with pytest.raises(ValueError, match="offsets"):
        ConceptTrie.from_dict(bad)
    with pytest.raises(KeyError, match="trie.meta"):
        ConceptTrie.from_dict({k: v for k, v in trie.to_dict().items() if k != "trie.meta"})


def test_tensors_are_cached_and_consistent():
    trie = ConceptTrie(np.array([[0, 1], [0, 2], [3, 0]]), codebook_size=4)
    t = trie.tensors("cpu")
    assert t is trie.tensors(torch.device("cpu"))
    assert t.offsets.dtype == torch.long and t.offsets.tolist() == trie.offsets.tolist()
    leaf = torch.tensor([[t.leaf_start, t.leaf_start + 2, -1]])
    assert trie.items_of(leaf).tolist() == [[int(trie.leaf_items[0]), int(trie.leaf_items[2]), -1]]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 80), st.integers(0, 2**31 - 1))
def test_property_random_tries(L, K, n, seed):
    n = min(n, K ** L)
    rng = np.random.default_rng(seed)
    codes = random_codes(rng, n, L, K)
    trie = ConceptTrie(codes, codebook_size=K)
    np.testing.assert_array_equal(trie.lookup(codes), np.arange(n))
    member = {tuple(r) for r in codes.tolist()}
    q = rng.integers(0, K, size=(20, L))
    nonmember = np.array([r for r in q.tolist() if tuple(r) not in member], dtype=np.int64).reshape(-1, L)
    assert (trie.lookup(nonmember) == -1).all()
    # C++ step == torch reference step at a random level, with live, dead and tied beams.
    t = trie.tensors()
    level = int(rng.integers(0, L))
    lo, hi = int(t.level_start[level]), int(t.level_start[level + 1])
    B, W = int(rng.integers(1, 4)), int(rng.integers(1, 5))
    states = torch.from_numpy(rng.integers(lo, hi, size=(B, W)))
    states[torch.from_numpy(rng.random((B, W)) < 0.2)] = -1
    log_probs = torch.from_numpy(rng.integers(-3, 1, size=(B * W, K)).astype(np.float32))  # ties
    scores = torch.from_numpy(rng.integers(-2, 1, size=(B, W)).astype(np.float32))
    nb = int(rng.integers(1, 3 * K + 2))
    got = constrained_beam_step(log_probs, scores, states, t.offsets, t.codes, nb)
    ref = constrained_beam_step_reference(log_probs, scores, states, t.offsets, t.codes, nb)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.parametrize("num_beams", [1, 3, 20, 100, 250])
def test_step_with_many_candidates_equals_reference(num_beams):
    # Wide beams over a dense trie: thousands of candidates per user, so the engine's bounded
    # pool is trimmed many times; integer scores make many exact ties (broken by key).
    rng = np.random.default_rng(num_beams)
    K, L = 32, 3
    codes = random_codes(rng, 4000, L, K)
    t = ConceptTrie(codes, codebook_size=K).tensors()
    lo, hi = int(t.level_start[1]), int(t.level_start[2])
    B, W = 3, 120
    states = torch.from_numpy(rng.integers(lo, hi, size=(B, W)))
    states[torch.from_numpy(rng.random((B, W)) < 0.1)] = -1
    for log_probs in (torch.from_numpy(rng.integers(-6, 1, size=(B * W, K)).astype(np.float32)),
                      torch.log_softmax(torch.from_numpy(rng.normal(size=(B * W, K))).float(), -1)):
        scores = torch.from_numpy(rng.integers(-3, 1, size=(B, W)).astype(np.float32))
        got = constrained_beam_step(log_probs, scores, states, t.offsets, t.codes, num_beams)
        ref = constrained_beam_step_reference(log_probs, scores, states, t.offsets, t.codes, num_beams)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_step_when_a_strided_sample_sees_only_the_best():
    # The engine estimates its entry threshold from a strided sample of the candidates. Put the
    # high scores exactly on a stride so that estimate is too strict: the step must still be
    # exact (it then falls back to every candidate).
    K, W = 256, 8
    codes = np.stack(np.meshgrid(np.arange(W), np.arange(K), indexing="ij"), -1).reshape(-1, 2)
    t = ConceptTrie(codes, codebook_size=K).tensors()
    states = torch.arange(int(t.level_start[1]), int(t.level_start[2])).view(1, W)
    g = torch.Generator().manual_seed(5)
    for stride in (2, 4, 8, 16):
        log_probs = torch.rand(W, K, generator=g) - 20.0
        log_probs[:, ::stride] += 20.0 + torch.rand(W, K // stride, generator=g)
        scores = torch.zeros(1, W)
        for nb in (5, 20, 60):
            got = constrained_beam_step(log_probs, scores, states, t.offsets, t.codes, nb)
            ref = constrained_beam_step_reference(log_probs, scores, states, t.offsets, t.codes, nb)
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert (got[2] % stride == 0).all()  # only the boosted codes win


def test_crafted_arrays_are_refused_before_any_read_through_them():
    """An offset past the arrays (which the old loader followed into `codes` before checking:
    a heap read out of bounds) and a leaf item outside the item space are refused."""
    rng = np.random.default_rng(6)
    trie = ConceptTrie(random_codes(rng, 40, 3, 5), codebook_size=5)
    for bump in (10**6, 10**12):
        bad = trie.to_dict()
        bad["trie.offsets"] = bad["trie.offsets"].copy()
        bad["trie.offsets"][1] = bump  # huge, then the later offsets fall back: not monotone
        with pytest.raises(ValueError, match=r"offsets: not non-decreasing within \[1, num_nodes\]"):
            ConceptTrie.from_dict(bad)
    bad = trie.to_dict()
    bad["trie.leaf_items"] = bad["trie.leaf_items"].copy()
    bad["trie.leaf_items"][0] = 10**9
    with pytest.raises(ValueError, match=r"leaf_items: item 1000000000 out of \[0, item_space"):
        ConceptTrie.from_dict(bad)


def test_sizes_from_a_file_never_size_an_allocation():
    """A crafted item_space (2**40) or codebook_size used to size a table of that many entries
    (terabytes); now the item table is the catalog's size and the codebook is bounded."""
    rng = np.random.default_rng(8)
    codes = random_codes(rng, 30, 3, 4)
    trie = ConceptTrie(codes, codebook_size=4)
    d = trie.to_dict()
    d["trie.meta"] = d["trie.meta"].copy()
    d["trie.meta"][2] = 2**40  # item_space: items may lie anywhere in [0, 2**40)
    big = ConceptTrie.from_dict(d)
    assert big.item_space == 2**40 and big.memory_bytes < trie.memory_bytes + 1024
    # subset by item index still finds every item (binary search over the sorted items)
    keep = rng.choice(30, size=7, replace=False)
    sub = big.subset(keep)
    np.testing.assert_array_equal(np.sort(sub.lookup(codes[keep])), np.sort(keep))
    with pytest.raises(ValueError, match="is not in this trie"):
        big.subset([2**40 - 1])
    d["trie.meta"][1] = 2**40  # codebook_size: the root's code table would have 2**40 entries
    with pytest.raises(ValueError, match="codebook_size must be at most"):
        ConceptTrie.from_dict(d)
    with pytest.raises(ValueError, match="codebook_size: expected 1.."):
        ConceptTrie(codes, codebook_size=2**40)
