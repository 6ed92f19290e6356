"""Fuzz every array-taking entry point of recbase._C with arbitrary inputs (run by test_fuzz_native.py
in a child process, so a crash is a failed test, not a dead test run).

    python tests/fuzz_native.py [examples_per_entry_point]

Every call must either return a result that passes its sanity check or raise one of the Python
errors the bindings document (ValueError, TypeError, RuntimeError, OverflowError, MemoryError,
IndexError). A signal (SIGSEGV, SIGABRT, SIGILL, SIGFPE), a hang or any other exception fails. The
address space is capped (not under ASan: RECBASE_FUZZ_NO_MEMORY_CAP=1) so an allocation the C++ would make from a crafted size fails as
MemoryError / bad_alloc instead of swapping. Before each call the entry point's name and the
example's number go to stderr, so a crash names its input. The ``*_cuda`` entry points take raw
device pointers from the torch.ops wrappers and are not fuzzed (no GPU here; and a raw pointer
cannot be validated).
"""
from __future__ import annotations

import os
import resource
import sys

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

import recbase._C as C

ALLOWED = (ValueError, TypeError, RuntimeError, OverflowError, MemoryError, IndexError)
EXAMPLES = int(sys.argv[1]) if len(sys.argv) > 1 else 60
if not os.environ.get("RECBASE_FUZZ_NO_MEMORY_CAP"):  # ASan maps terabytes of shadow memory
    _hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30 if _hard == resource.RLIM_INFINITY else min(6 << 30, _hard), _hard))

DTYPES = [np.float32, np.int64, np.float64, np.float16, np.int32, np.uint8, np.bool_]
FILL = ["normal", "zeros", "nan", "inf", "huge", "ints", "negative", "big_ints"]


@st.composite
def arrays(draw, ndim=None, max_side=6, shape=None):
    """An array of any dtype / shape / values (or, now and then, not an array at all)."""
    # hypothesis leans to small draws, so the rare branches sit at the large end of each range
    if draw(st.integers(0, 19)) == 19:
        return draw(st.sampled_from([None, "text", 3, 2.5, [[1, 2], [3]], [], {"a": 1}]))
    if shape is None:
        nd = draw(st.integers(0, 4)) if ndim is None else ndim
        shape = tuple(draw(st.integers(0, max_side)) for _ in range(nd))
    dtype = draw(st.sampled_from(DTYPES))
    fill = draw(st.sampled_from(FILL))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = {"normal": lambda: rng.normal(size=shape), "zeros": lambda: np.zeros(shape),
            "nan": lambda: np.where(rng.random(shape) < 0.3, np.nan, rng.normal(size=shape)),
            "inf": lambda: np.where(rng.random(shape) < 0.3, np.inf, rng.normal(size=shape)),
            "huge": lambda: rng.normal(size=shape) * 1e30,
            "ints": lambda: rng.integers(0, 8, size=shape),
            "negative": lambda: rng.integers(-9, 0, size=shape),
            "big_ints": lambda: rng.integers(2**31, 2**40, size=shape)}[fill]()
    with np.errstate(all="ignore"):
        out = np.asarray(base).astype(dtype)
    if draw(st.booleans()) and out.ndim >= 2 and out.shape[-1] > 1:
        out = out[..., ::2]  # non-contiguous
    return out


ints = st.one_of(st.integers(-3, 12), st.sampled_from([0, 1, 2**31, 2**40, -(2**31), 2**63 - 1]))


def _describe(a):
    if isinstance(a, np.ndarray):
        finite = a[np.isfinite(a)] if a.dtype.kind == "f" else a
        span = f" [{finite.min()}, {finite.max()}]" if finite.size and a.dtype.kind in "fiub" else ""
        return f"array({a.dtype}, {a.shape}, contiguous={a.flags.c_contiguous}{span})"
    return repr(a)[:80]


def _report(name, i, args):
    print(f"{name} example {i}: " + ", ".join(map(_describe, args)), file=sys.stderr, flush=True)


def _call(fn, *args):
    try:
        return fn(*args), None
    except ALLOWED as exc:
        return None, exc


def run(name, strategy, call, check):
    counter = iter(range(10**9))
    tally = {"ok": 0, "refused": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(args):
        _report(name, next(counter), args)
        out, exc = _call(call, *args)
        tally["refused" if exc is not None else "ok"] += 1
        if exc is None:
            check(args, out)

    prop()
    # read by test_fuzz_native.py: both kinds must occur, or the fuzz never reached the kernels
    print(f"{name}: ok={tally['ok']} refused={tally['refused']}", flush=True)


def check_encode(args, codes):
    x, cb = np.asarray(args[0]), np.asarray(args[1])
    assert codes.shape == (x.shape[0], cb.shape[0]), (codes.shape, x.shape, cb.shape)
    assert codes.size == 0 or (codes.min() >= 0 and codes.max() < cb.shape[1])


def check_decode(args, out):
    codes, cb = np.asarray(args[0]), np.asarray(args[1])
    assert out.shape == (codes.shape[0], cb.shape[2]) and np.isfinite(out).all()


def check_kmeans(args, out):
    centroids, _ = out
    x, k = np.asarray(args[0]), args[1]
    assert centroids.shape == (k, x.shape[1]) and np.isfinite(centroids).all()


def check_beam(args, out):
    scores = out[0]
    assert np.isfinite(scores[scores > -np.inf]).all()


def check_level(args, out):
    check_beam(args, out)
    scores, rows, tokens, states, bad = out
    b, w = np.asarray(args[1]).shape
    assert rows.shape == tokens.shape == (scores.size,) and bad >= 0
    assert ((rows >= 0) & (rows < max(b * w, 1))).all() and (tokens >= 0).all()


def check_trie(args, trie):
    assert trie.num_items >= 0 and trie.num_nodes >= 1


def check_none(args, out):
    pass


def mutated(draw, valid: tuple, arbitrary: list) -> tuple:
    """The valid arguments as they are (half the examples: the kernels must run and pass their
    check) or with one argument replaced by an arbitrary value (the checks must refuse it or the
    kernel must still give a sane result)."""
    if draw(st.booleans()):
        return valid
    i = draw(st.integers(0, len(valid) - 1))
    return valid[:i] + (draw(arbitrary[i]),) + valid[i + 1:]


def main():
    f32 = lambda shape, rng, scale=1.0: (rng.normal(size=shape) * scale).astype(np.float32)  # noqa: E731

    @st.composite
    def encode_args(draw):
        n, d, L, K = draw(st.integers(0, 6)), draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 5))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        valid = (f32((n, d), rng), f32((L, K, d), rng), draw(st.integers(1, K + 3)), draw(st.integers(0, 4)))
        return mutated(draw, valid, [arrays(), arrays(), ints, ints])

    @st.composite
    def decode_args(draw):
        n, d, L, K = draw(st.integers(0, 6)), draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 5))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        valid = (rng.integers(0, K, size=(n, L)), f32((L, K, d), rng), draw(st.integers(0, 4)))
        return mutated(draw, valid, [arrays(), arrays(), ints])

    @st.composite
    def kmeans_args(draw):
        k, d = draw(st.integers(1, 5)), draw(st.integers(1, 4))
        n = k + draw(st.integers(0, 8))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        valid = (f32((n, d), rng), k, draw(st.integers(0, 30)), draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 4)))
        return mutated(draw, valid, [arrays(), ints, ints, st.integers(-(2**40), 2**64 - 1), ints])

    @st.composite
    def trie_parts(draw):
        L, K = draw(st.integers(1, 3)), draw(st.integers(1, 4))
        codes = np.unique(draw(st.lists(st.lists(st.integers(0, K - 1), min_size=L, max_size=L),
                                        min_size=1, max_size=8)), axis=0)
        return C.ConceptTrie.build(np.asarray(codes, dtype=np.int64), K), codes, K

    @st.composite
    def beam_args(draw):
        trie, _, K = draw(trie_parts())
        b, beams = draw(st.integers(0, 3)), draw(st.integers(1, 3))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        lp = f32((b * beams, K), rng)
        states = rng.integers(-1, trie.num_nodes, size=(b, beams))
        valid = (lp, f32((b, beams), rng), states, np.asarray(trie.offsets), np.asarray(trie.codes),
                 draw(st.integers(1, 6)))
        return mutated(draw, valid, [arrays(), arrays(), arrays(), arrays(), arrays(), ints])

    @st.composite
    def from_arrays_args(draw):
        trie, codes, K = draw(trie_parts())
        valid = (np.asarray(trie.offsets), np.asarray(trie.codes), np.asarray(trie.leaf_items),
                 int(trie.depth), K, int(trie.item_space))
        return mutated(draw, valid, [arrays(ndim=1)] * 3 + [ints] * 3)

    @st.composite
    def build_args(draw):
        _, codes, K = draw(trie_parts())
        return mutated(draw, (np.asarray(codes, dtype=np.int64), K), [arrays(), ints])

    @st.composite
    def method_args(draw):
        trie, codes, _ = draw(trie_parts())
        which = draw(st.integers(0, 2))
        valid = {0: np.asarray(codes[: draw(st.integers(0, len(codes)))], dtype=np.int64),
                 1: draw(st.integers(0, trie.num_nodes - 1)),
                 2: np.arange(draw(st.integers(0, len(codes))), dtype=np.int64)}[which]
        arg = valid if draw(st.booleans()) else draw(ints if which == 1 else arrays())
        return ((trie, which, arg),)

    def trie_method(args):
        trie, which, arg = args
        return (trie.lookup, trie.children, trie.subset)[which](arg)

    run("rq_encode", encode_args(), C.rq_encode, check_encode)
    run("rq_decode", decode_args(), C.rq_decode, check_decode)
    run("kmeans", kmeans_args(), C.kmeans, check_kmeans)
    run("constrained_beam_step", beam_args(), C.constrained_beam_step, check_beam)
    run("beam_search_level", beam_args(), C.beam_search_level, check_level)
    run("ConceptTrie.from_arrays", from_arrays_args(), C.ConceptTrie.from_arrays, check_trie)
    run("ConceptTrie.build", build_args(), C.ConceptTrie.build, check_trie)
    run("ConceptTrie methods", method_args(), trie_method, check_none)
    print("fuzzed every entry point", flush=True)


if __name__ == "__main__":
    main()
