"""Residual-quantization ops: one dispatch point per op.

    r_0 = x;  c_l = argmin_k ||r_l - e_{l,k}||^2;  r_{l+1} = r_l - e_{l,c_l};  x_hat = sum_l e_{l,c_l}

Each public op validates its arguments (clear ``ValueError``/``TypeError`` naming the argument),
then calls one implementation function per op, registered as a ``torch.library.custom_op``
(``recbase::rq_encode``, ``recbase::rq_decode``, ``recbase::kmeans``; eager calls skip the
dispatcher), which picks the backend by device:

============  ==================================  ==========================================
op            CPU                                 CUDA
============  ==================================  ==========================================
rq_encode     C++ (blocked AVX-512/AVX2 GEMM with  fused CUDA kernel (greedy) when compiled,
              fused argmin, OpenMP)               else the PyTorch reference (and for beam>1)
rq_decode     C++                                 PyTorch gather-sum
kmeans        C++ (k-means++ seeds, Lloyd)        PyTorch reference (same algorithm)
============  ==================================  ==========================================

All ops also accept numpy arrays (returned as numpy), and have fake (meta) implementations so
they trace under ``torch.compile(fullgraph=True)``.

>>> import torch
>>> from recbase.ops import rq_encode, rq_decode
>>> x = torch.randn(100, 8)
>>> codebooks = torch.randn(2, 16, 8)
>>> codes = rq_encode(x, codebooks)
>>> codes.shape, codes.dtype
(torch.Size([100, 2]), torch.int64)
>>> rq_decode(codes, codebooks).shape
torch.Size([100, 8])
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "rq_encode",
    "rq_decode",
    "kmeans",
    "rq_encode_reference",
    "rq_decode_reference",
    "kmeans_reference",
    "rq_residual",
]


def _native():
    from recbase._native import C

    return C


def _cuda_kernel_available() -> bool:
    C = _native()
    return bool(getattr(C, "cuda_compiled", False)) and C.cuda_device_count() > 0


# ------------------------------------------------------------------------------------------------
# Argument handling shared by the public wrappers
# ------------------------------------------------------------------------------------------------
def _as_tensor(a, name: str) -> tuple[torch.Tensor, bool]:
    """(tensor, was_numpy). numpy arrays become zero-copy CPU tensors."""
    if isinstance(a, torch.Tensor):
        return a, False
    if isinstance(a, np.ndarray):
        if a.dtype == object or a.dtype.kind not in "fiub":
            raise TypeError(f"{name}: expected a numeric array, got dtype {a.dtype}")
        return torch.from_numpy(np.ascontiguousarray(a)), True
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(a).__name__}")


def _float_matrix(a: torch.Tensor, name: str, ndim: int) -> torch.Tensor:
    if not a.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {a.dtype}")
    if a.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(a.shape)}")
    return a.detach().to(torch.float32).contiguous()


def _check_codebooks(codebooks: torch.Tensor) -> None:
    L, K, d = codebooks.shape
    if L < 1 or K < 1 or d < 1:
        raise ValueError(
            "codebooks: expected shape (levels >= 1, K >= 1, d >= 1), got "
            f"{tuple(codebooks.shape)}"
        )


def _check_int(value, name: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: expected at most {maximum}, got {value}")
    return int(value)


MAX_KMEANS_ITERS = 10000  # as csrc/rq.cpp: each iteration is a full pass; 2**40 would run for days


MAX_THREADS = 1024  # libgomp exits the process when it cannot create the threads asked for


def _check_threads(value) -> int:
    threads = _check_int(value, "threads", 0)
    if threads > MAX_THREADS:
        raise ValueError(f"threads: expected at most {MAX_THREADS}, got {threads}")
    return threads


def _check_values(t: torch.Tensor, name: str) -> None:
    """NaN/Inf refused, and magnitudes beyond sqrt(FLT_MAX / (4 d)), where float32 squared
    distances overflow to inf and every code would compare equal (the C++ core's rule too)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or Inf values")
    if t.numel():
        d = t.shape[-1]
        limit = math.sqrt(float(np.finfo(np.float32).max) / (4.0 * d))
        peak = float(t.abs().max())
        if peak > limit:
            raise ValueError(
                f"{name}: expected values of magnitude <= {limit:.6g} (float32 squared distances "
                f"overflow beyond it for d={d}), got {peak:.6g}"
            )


# ------------------------------------------------------------------------------------------------
# PyTorch references (float32 by default; pass float64 tensors for an exact-ish reference)
# ------------------------------------------------------------------------------------------------
def rq_encode_reference(x: torch.Tensor, codebooks: torch.Tensor, beam_size: int = 1) -> torch.Tensor:
    """Pure-PyTorch RQ encoding in the dtype of ``x`` (any device); beam search when beam_size > 1.

    >>> x, cb = torch.randn(50, 4), torch.randn(3, 8, 4)
    >>> rq_encode_reference(x, cb).shape
    torch.Size([50, 3])
    """
    cb = codebooks.to(x.dtype)
    L, K, d = cb.shape
    N = x.shape[0]
    norms = (cb * cb).sum(-1)  # (L, K)
    if beam_size == 1:
        r = x.clone()
        codes = []
        for lvl in range(L):
            dist = norms[lvl][None, :] - 2.0 * (r @ cb[lvl].T)
            c = dist.argmin(1)
            codes.append(c)
            r = r - cb[lvl][c]
        return torch.stack(codes, 1) if codes else x.new_zeros((N, 0), dtype=torch.long)
    # Beam: keep the `beam_size` paths with the smallest ||r||^2 (exact, recomputed per level).
    res = x[:, None, :]  # (N, P, d)
    err = (x * x).sum(-1, keepdim=True)  # (N, P)
    paths = torch.zeros((N, 1, 0), dtype=torch.long, device=x.device)
    for lvl in range(L):
        dist = norms[lvl] - 2.0 * (res @ cb[lvl].T)  # (N, P, K)
        total = (err[..., None] + dist).reshape(N, -1)
        keep = min(beam_size, total.shape[1])
        _, idx = total.topk(keep, dim=1, largest=False, sorted=True)
        parent, code = idx // K, idx % K
        res = torch.gather(res, 1, parent[..., None].expand(-1, -1, d)) - cb[lvl][code]
        err = (res * res).sum(-1)
        paths = torch.cat(
            [torch.gather(paths, 1, parent[..., None].expand(-1, -1, lvl)), code[..., None]], 2
        )
    best = err.argmin(1)
    return paths[torch.arange(N, device=x.device), best]


def rq_decode_reference(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """x_hat = sum_l codebooks[l, codes[:, l]] in PyTorch (any device)."""
    out = torch.zeros((codes.shape[0], codebooks.shape[2]), dtype=codebooks.dtype,
                      device=codebooks.device)
    for lvl in range(codebooks.shape[0]):
        out += codebooks[lvl][codes[:, lvl]]
    return out


def kmeans_reference(x: torch.Tensor, k: int, niter: int = 25, seed: int = 0):
    """Lloyd k-means in PyTorch (any device), same algorithm as the C++ engine: k-means++ seeds,
    empty clusters repaired by splitting the largest one. Returns (centroids, objective[niter+1]).
    Seeds come from a torch Generator, so results differ from the C++ engine's (both are valid).
    """
    N, d = x.shape
    xf = x.to(torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    m = min(N, max(16 * k, 4096))
    sub = xf[torch.randperm(N, generator=gen)[:m].sort().values.to(x.device)] if m < N else xf
    cent = torch.empty((k, d), dtype=torch.float32, device=x.device)
    first = int(torch.randint(m, (1,), generator=gen))
    cent[0] = sub[first]
    d2 = ((sub - cent[0]) ** 2).sum(-1).double()
    for c in range(1, k):
        total = float(d2.sum())
        if total > 0:
            pick = int(torch.multinomial(d2.cpu(), 1, generator=gen))
        else:
            pick = int(torch.randint(m, (1,), generator=gen))
        cent[c] = sub[pick]
        d2 = torch.minimum(d2, ((sub - cent[c]) ** 2).sum(-1).double())

    def assign(C):
        norms = (C * C).sum(-1)
        a = (norms[None, :] - 2.0 * (xf @ C.T)).argmin(1)
        J = float(((xf.double() - C[a].double()) ** 2).sum())
        return a, J

    a, J = assign(cent)
    objective = [J]
    for _ in range(niter):
        counts = torch.bincount(a, minlength=k)
        sums = torch.zeros((k, d), dtype=torch.float64, device=x.device).index_add_(0, a, xf.double())
        for c in torch.nonzero(counts == 0).flatten().tolist():
            big = int(counts.argmax())
            members = torch.nonzero(a == big).flatten()
            mean = sums[big] / counts[big]
            far = members[((xf[members].double() - mean) ** 2).sum(-1).argmax()]
            a[far] = c
            counts[big] -= 1
            counts[c] = 1
            sums[big] -= xf[far].double()
            sums[c] = xf[far].double()
        cent = (sums / counts[:, None].double()).to(torch.float32)
        a, J = assign(cent)
        objective.append(J)
    return cent, torch.tensor(objective, dtype=torch.float64)


def rq_residual(x, codebooks, codes) -> torch.Tensor:
    """Final residual r_L = x - decode(codes), computed in float64 (for error reports)."""
    xt, _ = _as_tensor(x, "x")
    cb, _ = _as_tensor(codebooks, "codebooks")
    ct, _ = _as_tensor(codes, "codes")
    return xt.double() - rq_decode_reference(ct.long(), cb.double())


# ------------------------------------------------------------------------------------------------
# custom ops (device dispatch) + fake implementations for torch.compile
# ------------------------------------------------------------------------------------------------
def _dispatch(op, impl, *args):
    """Eager calls go straight to the implementation (the registered op's first eager call
    imports torch._dynamo, ~2 s, and each call pays dispatcher overhead); traced calls go
    through the registered op so torch.compile sees an opaque node with a fake kernel."""
    if torch.compiler.is_compiling():
        return op(*args)
    return impl(*args)


def _rq_encode_impl(x: torch.Tensor, codebooks: torch.Tensor, beam_size: int, threads: int) -> torch.Tensor:
    # the public wrapper already made these float32 + contiguous; direct torch.ops calls may not
    x, codebooks = x.contiguous(), codebooks.contiguous()
    if x.device.type == "cpu":
        return torch.from_numpy(_native().rq_encode(x.numpy(), codebooks.numpy(), beam_size, threads))
    _check_values(x, "x")
    _check_values(codebooks, "codebooks")
    if x.is_cuda and beam_size == 1 and _cuda_kernel_available():
        L, K, d = codebooks.shape
        N = x.shape[0]
        codes = torch.empty((N, L), dtype=torch.int64, device=x.device)
        if N == 0:
            return codes
        norms = (codebooks.double() ** 2).sum(-1).to(torch.float32).contiguous()
        with torch.cuda.device(x.device):
            stream = torch.cuda.current_stream(x.device).cuda_stream
            _native().rq_encode_cuda(x.data_ptr(), codebooks.data_ptr(), norms.data_ptr(),
                                     codes.data_ptr(), N, d, L, K, stream)
        return codes
    return rq_encode_reference(x, codebooks, beam_size)


_rq_encode_op = torch.library.custom_op("recbase::rq_encode", _rq_encode_impl, mutates_args=())


@_rq_encode_op.register_fake
def _(x, codebooks, beam_size, threads):
    return x.new_empty((x.shape[0], codebooks.shape[0]), dtype=torch.int64)


def _rq_decode_impl(codes: torch.Tensor, codebooks: torch.Tensor, threads: int) -> torch.Tensor:
    codes, codebooks = codes.contiguous(), codebooks.contiguous()
    if codes.device.type == "cpu":
        return torch.from_numpy(_native().rq_decode(codes.numpy(), codebooks.numpy(), threads))
    K = codebooks.shape[1]
    if codes.numel() and bool(((codes < 0) | (codes >= K)).any()):
        raise ValueError(f"codes: expected values in [0, {K})")
    return rq_decode_reference(codes, codebooks)


_rq_decode_op = torch.library.custom_op("recbase::rq_decode", _rq_decode_impl, mutates_args=())


@_rq_decode_op.register_fake
def _(codes, codebooks, threads):
    return codebooks.new_empty((codes.shape[0], codebooks.shape[2]))


def _kmeans_impl(x: torch.Tensor, k: int, niter: int, seed: int, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    if x.device.type == "cpu":
        cent, obj = _native().kmeans(x.numpy(), k, niter, seed, threads)
        return torch.from_numpy(cent), torch.from_numpy(obj)
    _check_values(x, "x")
    cent, obj = kmeans_reference(x, k, niter, seed)
    return cent, obj.to(x.device)


_kmeans_op = torch.library.custom_op("recbase::kmeans", _kmeans_impl, mutates_args=())


@_kmeans_op.register_fake
def _(x, k, niter, seed, threads):
    return x.new_empty((k, x.shape[1])), x.new_empty((niter + 1,), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# Public ops
# ------------------------------------------------------------------------------------------------
def rq_encode(x, codebooks, beam_size: int = 1, threads: int = 0):
    """Residual-quantization codes int64 (N, L) of x (N, d) under codebooks (L, K, d).

    Greedy per level when ``beam_size == 1`` (the fast path); otherwise beam search keeping the
    ``beam_size`` partial code paths with the smallest residual error. Floating inputs are cast to
    float32. ``threads`` (CPU): OpenMP threads, 0 = all. numpy in -> numpy out; tensors stay on
    their device.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    >>> rq_encode(x, np.stack([x[:3], x[3:6]])).shape
    (10, 2)
    """
    xt, was_numpy = _as_tensor(x, "x")
    cb, _ = _as_tensor(codebooks, "codebooks")
    xt = _float_matrix(xt, "x", 2)
    cb = _float_matrix(cb, "codebooks", 3)
    _check_codebooks(cb)
    if xt.shape[1] != cb.shape[2]:
        raise ValueError(
            f"x: expected dimension d={cb.shape[2]} to match codebooks {tuple(cb.shape)}, got x of "
            f"shape {tuple(xt.shape)}"
        )
    if xt.device != cb.device:
        raise ValueError(f"codebooks: expected device {xt.device} (that of x), got {cb.device}")
    beam_size = _check_int(beam_size, "beam_size", 1)
    threads = _check_threads(threads)
    codes = _dispatch(_rq_encode_op, _rq_encode_impl, xt, cb, beam_size, threads)
    return codes.numpy() if was_numpy else codes


def rq_decode(codes, codebooks, threads: int = 0):
    """Reconstruction (N, d) = sum_l codebooks[l, codes[:, l]]; codes must lie in [0, K).

    >>> cb = torch.randn(2, 4, 3)
    >>> rq_decode(torch.tensor([[1, 2]]), cb).allclose(cb[0, 1] + cb[1, 2])
    True
    """
    ct, was_numpy = _as_tensor(codes, "codes")
    cb, _ = _as_tensor(codebooks, "codebooks")
    if ct.dtype.is_floating_point or ct.dtype == torch.bool or ct.dtype.is_complex:
        raise TypeError(f"codes: expected an integer tensor, got dtype {ct.dtype}")
    if ct.dim() != 2:
        raise ValueError(f"codes: expected a 2-d tensor (N, levels), got shape {tuple(ct.shape)}")
    cb = _float_matrix(cb, "codebooks", 3)
    _check_codebooks(cb)
    if ct.shape[1] != cb.shape[0]:
        raise ValueError(
            f"codes: expected {cb.shape[0]} levels (columns) to match codebooks "
            f"{tuple(cb.shape)}, got codes of shape {tuple(ct.shape)}"
        )
    if ct.device != cb.device:
        raise ValueError(f"codebooks: expected device {ct.device} (that of codes), got {cb.device}")
    threads = _check_threads(threads)
    out = _dispatch(_rq_decode_op, _rq_decode_impl, ct.to(torch.int64).contiguous(), cb, threads)
    return out.numpy() if was_numpy else out


def kmeans(x, k: int, niter: int = 25, seed: int = 0, threads: int = 0):
    """Lloyd k-means: (centroids float32 (k, d), objective float64 (niter + 1,)).

    ``objective[t]`` = sum_i min_c ||x_i - C_t[c]||^2 for the centroids after t iterations; it
    never increases (up to float32 rounding of the assignment). Seeds: k-means++ on a random
    subsample of min(N, max(16 k, 4096)) rows; empty clusters are repaired by splitting the
    largest cluster. Deterministic for a given ``seed`` (independent of ``threads``).

    >>> import torch
    >>> cent, obj = kmeans(torch.randn(500, 4), 8, niter=5)
    >>> cent.shape, obj.shape
    (torch.Size([8, 4]), torch.Size([6]))
    """
    xt, was_numpy = _as_tensor(x, "x")
    xt = _float_matrix(xt, "x", 2)
    k = _check_int(k, "k", 1)
    niter = _check_int(niter, "niter", 0, MAX_KMEANS_ITERS)
    seed = _check_int(seed, "seed", 0)
    threads = _check_threads(threads)
    if xt.shape[1] < 1:
        raise ValueError(f"x: expected dimension d >= 1, got shape {tuple(xt.shape)}")
    if xt.shape[0] < k:
        raise ValueError(
            f"x: fewer vectors than codewords: k-means needs at least k={k} rows, got {xt.shape[0]}"
        )
    cent, obj = _dispatch(_kmeans_op, _kmeans_impl, xt, k, niter, seed, threads)
    if was_numpy:
        return cent.numpy(), obj.numpy()
    return cent, obj
