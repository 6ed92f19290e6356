"""RQ ops (recbase.ops.rq + recbase._C) against float64 brute force references."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recbase._native import C
from recbase.ops.rq import MAX_KMEANS_ITERS
from recbase.ops import (kmeans, kmeans_reference, rq_decode, rq_decode_reference, rq_encode,
                         rq_encode_reference)


def _data(seed, n, d, L, K, scale=0.5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    cb = (rng.standard_normal((L, K, d)) * scale).astype(np.float32)
    return x, cb


def _greedy_regret(x, cb, codes):
    """Per level, float64 distance of the chosen codeword minus the best one, walking the residual
    of the chosen codes. Zero up to rounding iff codes are a greedy argmin."""
    r = x.astype(np.float64)
    out = []
    for lvl in range(cb.shape[0]):
        e = cb[lvl].astype(np.float64)
        dist = ((r[:, None, :] - e[None]) ** 2).sum(-1)
        chosen = dist[np.arange(len(r)), codes[:, lvl]]
        scale = (r ** 2).sum(1) + (e ** 2).sum(1).max() + 1e-30
        out.append((chosen - dist.min(1)) / scale)
        r = r - e[codes[:, lvl]]
    return np.stack(out, 1) if out else np.zeros((len(x), 0))


def _exact_codes(x, cb):
    r = x.astype(np.float64)
    codes = []
    for lvl in range(cb.shape[0]):
        e = cb[lvl].astype(np.float64)
        c = ((r[:, None, :] - e[None]) ** 2).sum(-1).argmin(1)
        codes.append(c)
        r = r - e[c]
    return np.stack(codes, 1)


# ---------------------------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), d=st.integers(1, 40), L=st.integers(1, 4), K=st.integers(1, 70),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**31))
def test_encode_is_greedy_argmin_float64(n, d, L, K, threads, seed):
    x, cb = _data(seed, n, d, L, K)
    codes = rq_encode(x, cb, threads=threads)
    assert codes.shape == (n, L) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < K
    assert _greedy_regret(x, cb, codes).max() <= 1e-5


@pytest.mark.parametrize("n,d,L,K", [(517, 100, 3, 300), (1030, 64, 3, 256), (77, 768, 4, 256),
                                     (300, 13, 5, 33)])
def test_encode_block_boundaries_match_exact_codes(n, d, L, K):
    # shapes straddling row blocks, micro-tiles and codeword panels
    x, cb = _data(n + d, n, d, L, K)
    codes = rq_encode(x, cb, threads=2)
    assert _greedy_regret(x, cb, codes).max() <= 1e-5
    assert (codes == _exact_codes(x, cb)).all(1).mean() > 0.98  # rest: float32 near-ties


def test_encode_equals_torch_reference_and_is_thread_independent():
    x, cb = _data(3, 2000, 48, 3, 128)
    a = rq_encode(x, cb, threads=1)
    b = rq_encode(x, cb, threads=2)
    np.testing.assert_array_equal(a, b)
    ref = rq_encode_reference(torch.from_numpy(x).double(), torch.from_numpy(cb).double()).numpy()
    assert (a == ref).all(1).mean() > 0.99


def test_encode_exact_codeword_inputs_recover_codes():
    # x built from codewords with a dominant first level: greedy must recover the path exactly
    rng = np.random.default_rng(5)
    L, K, d = 3, 40, 24
    cb = rng.standard_normal((L, K, d)).astype(np.float32) * np.array([8.0, 1.0, 0.1])[:, None, None].astype(np.float32)
    truth = rng.integers(0, K, size=(500, L))
    x = sum(cb[lvl][truth[:, lvl]] for lvl in range(L)).astype(np.float32)
    codes = rq_encode(x, cb)
    assert (codes[:, 0] == truth[:, 0]).mean() > 0.99
    assert _greedy_regret(x, cb, codes).max() <= 1e-5


def test_residual_identity():
    # ||x - decode(encode(x))||^2 == ||r_L||^2 with r_L accumulated level by level in float64
    x, cb = _data(11, 1500, 40, 4, 64)
    codes = rq_encode(x, cb)
    r = x.astype(np.float64)
    for lvl in range(cb.shape[0]):
        r = r - cb[lvl].astype(np.float64)[codes[:, lvl]]
    x_hat = rq_decode(codes, cb)
    err = ((x.astype(np.float64) - x_hat) ** 2).sum(1)
    np.testing.assert_allclose(err, (r ** 2).sum(1), rtol=1e-4, atol=1e-4)
    # and each level lowers the residual versus stopping one level earlier
    assert (r ** 2).sum() < ((x - rq_decode(codes[:, :3], cb[:3])) ** 2).sum()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 50), d=st.integers(1, 30), L=st.integers(1, 4), K=st.integers(1, 20),
       seed=st.integers(0, 2**31))
def test_decode_equals_float64_sum(n, d, L, K, seed):
    x, cb = _data(seed, max(n, 1), d, L, K)
    codes = np.random.default_rng(seed).integers(0, K, size=(n, L))
    out = rq_decode(codes, cb)
    ref = sum(cb[lvl].astype(np.float64)[codes[:, lvl]] for lvl in range(L)) if n else np.zeros((0, d))
    assert out.shape == (n, d) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_decode_reference_matches_native():
    x, cb = _data(2, 300, 20, 3, 16)
    codes = torch.from_numpy(rq_encode(x, cb))
    ref = rq_decode_reference(codes, torch.from_numpy(cb).double())
    torch.testing.assert_close(rq_decode(codes, torch.from_numpy(cb)).double(), ref)


# ---------------------------------------------------------------------------------------------
# beam
# ---------------------------------------------------------------------------------------------
def _err(x, cb, codes):
    return ((x.astype(np.float64) - rq_decode(codes, cb).astype(np.float64)) ** 2).sum(1)


def test_beam_one_equals_greedy_and_beam_lowers_error():
    x, cb = _data(7, 3000, 32, 4, 64, scale=0.3)
    greedy = rq_encode(x, cb)
    np.testing.assert_array_equal(rq_encode(x, cb, beam_size=1), greedy)
    e1 = _err(x, cb, greedy).sum()
    prev = e1
    for beam in (2, 4, 8):
        eb = _err(x, cb, rq_encode(x, cb, beam_size=beam)).sum()
        assert eb <= prev * (1 + 1e-6)
        prev = eb
    assert prev < e1 * 0.99  # a real improvement, not just ties


@pytest.mark.parametrize("L,K", [(2, 5), (3, 4)])
def test_full_beam_is_exhaustive_optimum(L, K):
    # beam >= K^(L-1) keeps every path: the result must be the brute-force best of all K^L codes
    x, cb = _data(L * 10 + K, 200, 6, L, K, scale=1.0)
    codes = rq_encode(x, cb, beam_size=K ** (L - 1))
    allc = np.array(list(itertools.product(range(K), repeat=L)))
    recon = sum(cb[lvl].astype(np.float64)[allc[:, lvl]] for lvl in range(L))
    best = ((x.astype(np.float64)[:, None, :] - recon[None]) ** 2).sum(-1).min(1)
    np.testing.assert_allclose(_err(x, cb, codes), best, rtol=1e-5, atol=1e-5)


def test_beam_matches_torch_reference():
    x, cb = _data(8, 400, 16, 3, 32)
    for beam in (3, 5):
        ours = _err(x, cb, rq_encode(x, cb, beam_size=beam))
        ref_codes = rq_encode_reference(torch.from_numpy(x).double(), torch.from_numpy(cb).double(),
                                        beam).numpy()
        np.testing.assert_allclose(ours, _err(x, cb, ref_codes), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------
def _objective64(x, cent):
    x64, c64 = x.astype(np.float64), cent.astype(np.float64)
    return (((x64[:, None, :] - c64[None]) ** 2).sum(-1)).min(1).sum()


@settings(max_examples=15, deadline=None)
@given(n=st.integers(20, 400), d=st.integers(1, 24), k=st.integers(1, 20), seed=st.integers(0, 10**6))
def test_kmeans_objective_never_increases(n, d, k, seed):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(k // 2, 1), d)) * 3
    x = (centers[rng.integers(0, len(centers), n)] + rng.standard_normal((n, d))).astype(np.float32)
    cent, obj = kmeans(x, k, niter=8, seed=seed)
    assert cent.shape == (k, d) and cent.dtype == np.float32 and obj.shape == (9,)
    assert np.isfinite(cent).all()
    assert (np.diff(obj) <= 1e-6 * obj[:-1] + 1e-9).all(), obj
    np.testing.assert_allclose(obj[-1], _objective64(x, cent), rtol=1e-6)


def test_kmeans_is_deterministic_and_thread_independent():
    x, _ = _data(4, 6000, 32, 1, 1)  # large enough for the threaded paths (> 8M multiply-adds)
    a = kmeans(x, 64, niter=4, seed=3, threads=1)
    b = kmeans(x, 64, niter=4, seed=3, threads=2)
    c = kmeans(x, 64, niter=4, seed=4, threads=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((10, 8)) * 20
    x = (np.repeat(centers, 100, 0) + rng.standard_normal((1000, 8)) * 0.1).astype(np.float32)
    cent, obj = kmeans(x, 10, niter=10, seed=1)
    # each true center has a centroid within noise distance
    dmin = np.sqrt(((centers[:, None] - cent[None]) ** 2).sum(-1)).min(1)
    assert dmin.max() < 0.1
    assert obj[-1] < 1000 * 8 * 0.01 * 1.2


def test_kmeans_repairs_empty_clusters():
    # 4 distinct points repeated: seeds collide, so clusters go empty and must be repaired
    rng = np.random.default_rng(1)
    pts = rng.standard_normal((4, 5)).astype(np.float32)
    x = np.repeat(pts, [50, 3, 2, 1], axis=0)
    cent, obj = kmeans(x, 6, niter=5, seed=0)
    assert np.isfinite(cent).all()
    assert obj[-1] <= 1e-9  # every distinct point ends up as a centroid
    assert (np.diff(obj) <= 1e-9).all()
    # the centroids cover the distinct points
    assert np.sqrt(((pts[:, None] - cent[None]) ** 2).sum(-1)).min(1).max() < 1e-6


def test_kmeans_zero_iterations_and_k_equals_n():
    x, _ = _data(5, 12, 3, 1, 1)
    cent, obj = kmeans(x, 12, niter=0)
    assert obj.shape == (1,)
    assert obj[0] == pytest.approx(0.0, abs=1e-9)  # k-means++ picks every point once
    np.testing.assert_allclose(np.sort(cent, 0), np.sort(x, 0))


def test_kmeans_reference_is_monotone_and_close_to_native():
    x, _ = _data(6, 2000, 12, 1, 1)
    cent_r, obj_r = kmeans_reference(torch.from_numpy(x), 16, niter=8, seed=0)
    assert (torch.diff(obj_r) <= 1e-6 * obj_r[:-1]).all()
    _, obj = kmeans(x, 16, niter=8, seed=0)
    assert abs(obj[-1] - float(obj_r[-1])) / obj[-1] < 0.1  # different seeds, same quality


# ---------------------------------------------------------------------------------------------
# kinds, devices, compile
# ---------------------------------------------------------------------------------------------
def test_numpy_in_numpy_out_torch_in_torch_out():
    x, cb = _data(9, 50, 8, 2, 10)
    assert isinstance(rq_encode(x, cb), np.ndarray)
    codes = rq_encode(torch.from_numpy(x), torch.from_numpy(cb))
    assert isinstance(codes, torch.Tensor) and codes.dtype == torch.int64
    assert isinstance(rq_decode(codes, torch.from_numpy(cb)), torch.Tensor)
    assert isinstance(rq_decode(codes.numpy(), cb), np.ndarray)
    cent, obj = kmeans(torch.from_numpy(x), 4, niter=2)
    assert isinstance(cent, torch.Tensor) and obj.dtype == torch.float64
    # float64 / non-contiguous inputs are accepted by the public ops (cast to float32)
    xt = torch.from_numpy(x).double().T.contiguous().T
    np.testing.assert_array_equal(rq_encode(xt, torch.from_numpy(cb)).numpy(), rq_encode(x, cb))


def test_empty_input():
    _, cb = _data(1, 1, 8, 3, 10)
    assert rq_encode(np.zeros((0, 8), np.float32), cb).shape == (0, 3)
    assert rq_encode(np.zeros((0, 8), np.float32), cb, beam_size=3).shape == (0, 3)
    assert rq_decode(np.zeros((0, 3), np.int64), cb).shape == (0, 8)
    with pytest.raises(ValueError, match="fewer vectors than codewords"):
        kmeans(np.zeros((0, 8), np.float32), 2)


def test_torch_compile_fullgraph():
    x, cb = _data(10, 64, 8, 2, 16)
    xt, cbt = torch.from_numpy(x), torch.from_numpy(cb)

    def f(x, cb):
        codes = rq_encode(x, cb)
        return codes, x - rq_decode(codes, cb)

    codes, res = torch.compile(f, fullgraph=True, backend="eager")(xt, cbt)
    # aot_eager runs the fake (meta) implementations through AOTAutograd, as inductor would
    codes2, res2 = torch.compile(f, fullgraph=True, backend="aot_eager")(xt, cbt)
    ref_codes, ref_res = f(xt, cbt)
    torch.testing.assert_close(codes, ref_codes)
    torch.testing.assert_close(codes2, ref_codes)
    torch.testing.assert_close(res2, ref_res)
    torch.library.opcheck(torch.ops.recbase.rq_encode.default, (xt, cbt, 1, 0))
    torch.library.opcheck(torch.ops.recbase.rq_decode.default, (ref_codes, cbt, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("d,L,K", [(64, 3, 256), (200, 2, 100), (768, 4, 256), (7, 3, 5)])
def test_cuda_encode_matches_cpu(d, L, K):
    x, cb = _data(d + K, 3001, d, L, K)
    xc, cbc = torch.from_numpy(x).cuda(), torch.from_numpy(cb).cuda()
    codes = rq_encode(xc, cbc)
    assert codes.is_cuda
    assert _greedy_regret(x, cb, codes.cpu().numpy()).max() <= 1e-5
    assert (codes.cpu().numpy() == rq_encode(x, cb)).all(1).mean() > 0.99
    np.testing.assert_allclose(rq_decode(codes, cbc).cpu().numpy(), rq_decode(codes.cpu().numpy(), cb),
                               rtol=1e-5, atol=1e-5)
    beam = rq_encode(xc, cbc, beam_size=3)
    assert beam.is_cuda and beam.shape == (3001, L)
    cent, obj = kmeans(xc, 16, niter=3)
    assert cent.is_cuda and (torch.diff(obj) <= 1e-6 * obj[:-1]).all()


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    x, cb = _data(12, 20, 8, 2, 10)
    cases = [
        (lambda: rq_encode(x.astype(np.int32), cb), TypeError, "x: expected a floating"),
        (lambda: rq_encode([[1.0]], cb), TypeError, "x: expected a torch.Tensor or numpy"),
        (lambda: rq_encode(x[0], cb), ValueError, "x: expected a 2-d"),
        (lambda: rq_encode(x, cb[0]), ValueError, "codebooks: expected a 3-d"),
        (lambda: rq_encode(x[:, :5], cb), ValueError, "x: expected dimension d=8"),
        (lambda: rq_encode(x, cb[:, :0]), ValueError, "codebooks: expected shape"),
        (lambda: rq_encode(x, cb[:0]), ValueError, "codebooks: expected shape"),
        (lambda: rq_encode(x, cb, beam_size=0), ValueError, "beam_size: expected >= 1"),
        (lambda: rq_encode(x, cb, beam_size=1.5), TypeError, "beam_size: expected an int"),
        (lambda: rq_encode(x, cb, threads=-1), ValueError, "threads: expected >= 0"),
        (lambda: rq_decode(np.array([[0, 10]]), cb), ValueError, r"codes: expected values in \[0, 10\)"),
        (lambda: rq_decode(np.array([[-1, 0]]), cb), ValueError, "codes: expected values"),
        (lambda: rq_decode(np.array([[0.0, 1.0]]), cb), TypeError, "codes: expected an integer"),
        (lambda: rq_decode(np.array([[0, 1, 2]]), cb), ValueError, "codes: expected 2 levels"),
        (lambda: rq_decode(np.array([0, 1]), cb), ValueError, "codes: expected a 2-d"),
        (lambda: kmeans(x, 21), ValueError, "fewer vectors than codewords"),
        (lambda: kmeans(x, 0), ValueError, "k: expected >= 1"),
        (lambda: kmeans(x, 2, niter=-1), ValueError, "niter: expected >= 0"),
        (lambda: kmeans(x[:, :0], 2), ValueError, "x: expected dimension d >= 1"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_rejected(bad):
    x, cb = _data(13, 20, 8, 2, 10)
    xb = x.copy()
    xb[3, 4] = bad
    cbb = cb.copy()
    cbb[1, 2, 3] = bad
    with pytest.raises(ValueError, match="x: contains 1 NaN or Inf"):
        rq_encode(xb, cb)
    with pytest.raises(ValueError, match="codebooks: contains 1 NaN or Inf"):
        rq_encode(x, cbb)
    with pytest.raises(ValueError, match="x: contains 1 NaN or Inf"):
        kmeans(xb, 3)


def test_native_entry_points_validate_before_touching_memory():
    x, cb = _data(14, 20, 8, 2, 10)
    with pytest.raises(ValueError, match="x: expected dtype float32"):
        C.rq_encode(x.astype(np.float64), cb)
    with pytest.raises(ValueError, match="x: expected a C-contiguous"):
        C.rq_encode(np.asfortranarray(x), cb)
    with pytest.raises(ValueError, match="codebooks: expected a 3-d"):
        C.rq_encode(x, cb[0])
    with pytest.raises(ValueError, match="codes: expected dtype int64"):
        C.rq_decode(np.zeros((2, 2), np.int32), cb)
    with pytest.raises(ValueError, match="x: expected a numpy array"):
        C.kmeans(torch.from_numpy(x), 2)
    with pytest.raises(ValueError, match="codebooks: expected at least 1 codeword"):
        C.rq_decode(np.zeros((2, 2), np.int64), np.zeros((2, 0, 8), np.float32))


def test_thread_counts_beyond_the_limit_are_refused_not_fatal():
    # libgomp exits the process when it cannot create the threads asked for: refused up front,
    # by the wrappers and by the native core alike.
    from recbase.ops.rq import MAX_THREADS
    from recbase.quantize import ResidualQuantizer

    x, cb = _data(15, 20, 8, 2, 10)
    for fn in (lambda t: rq_encode(x, cb, threads=t), lambda t: rq_decode(np.zeros((2, 2), np.int64), cb, threads=t),
               lambda t: kmeans(x, 2, threads=t), lambda t: C.rq_encode(x, cb, 1, t),
               lambda t: C.rq_decode(np.zeros((2, 2), np.int64), cb, t), lambda t: C.kmeans(x, 2, 1, 0, t)):
        with pytest.raises(ValueError, match=f"threads: expected at most {MAX_THREADS}"):
            fn(MAX_THREADS + 1)
    with pytest.raises(ValueError, match="threads: expected at most"):
        ResidualQuantizer(levels=2, codebook_size=4, threads=10**6)
    np.testing.assert_array_equal(rq_encode(x, cb, threads=MAX_THREADS), rq_encode(x, cb, threads=1))


@pytest.mark.parametrize("d", [1, 8, 300])
def test_values_that_overflow_squared_distances_are_refused(d):
    # beyond sqrt(FLT_MAX / (4 d)) float32 distances become inf and every code compares equal:
    # the old core returned all-zero codes, silently. Just below the limit the codes are still the
    # exact float64 argmin.
    rng = np.random.default_rng(d)
    limit = np.sqrt(np.finfo(np.float32).max / (4.0 * d))
    cb = rng.uniform(-1, 1, (1, 6, d)).astype(np.float32) * np.float32(limit * 0.4)
    x = cb[0, rng.integers(0, 6, 9)] + rng.uniform(-1, 1, (9, d)).astype(np.float32) * np.float32(limit * 0.01)
    codes = rq_encode(x, cb)
    want = ((x.astype(np.float64)[:, None] - cb[0].astype(np.float64)[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(codes[:, 0], want)
    big = x.copy()
    big[4, 0] = np.float32(limit * 1.5)
    for fn, name in ((lambda: rq_encode(big, cb), "x"), (lambda: C.rq_encode(big, cb, 1, 0), "x"),
                     (lambda: kmeans(big, 2), "x"), (lambda: rq_encode(x, cb * 4), "codebooks"),
                     (lambda: rq_decode(np.zeros((1, 1), np.int64), cb * 4), "codebooks")):
        with pytest.raises(ValueError, match=f"{name}: expected values of magnitude <="):
            fn()
    cpu_only = torch.from_numpy(big)
    with pytest.raises(ValueError, match="x: expected values of magnitude"):
        from recbase.ops.rq import _check_values
        _check_values(cpu_only, "x")  # the rule the CUDA path applies, checked here on CPU


def test_kmeans_iterations_are_bounded():
    """niter sizes the objective array and the run time: 2**40 was a process that never ends."""
    x = torch.randn(20, 3)
    for call in (lambda: kmeans(x, 2, niter=2**40), lambda: C.kmeans(x.numpy(), 2, 2**40, 0, 0)):
        with pytest.raises(ValueError, match="niter: expected"):
            call()
    assert kmeans(x, 2, niter=MAX_KMEANS_ITERS // 1000)[1].shape == (MAX_KMEANS_ITERS // 1000 + 1,)
