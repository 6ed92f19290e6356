"""Jagged concept attention (FlashAttention-2 style) with the mask computed from indices.

Math, per sequence s (tokens cu[s]..cu[s+1]) and head h (kv head h // (H / Hkv)):
    O[q] = sum_k softmax_k(scale * Q[q].K[k] | allowed(q, k)) V[k],  LSE[q] = log sum_k exp(...)
    allowed = k <= q ("causal")  or  item[k] <= item[q] ("item": an item's tokens see each other).
Both masks allow a prefix of keys per query (item index is non-decreasing), so a query block only
loops over key tiles [0, hi) and fully masked tiles are never loaded. Backward recomputes P from
LSE: dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q.
dK/dV programs own one kv-head key tile and loop over the q heads of their GQA group (no atomics).

Public entry point: :func:`concept_attention_triton` (autograd Function); the op dispatch in
``recbase.ops.attention`` calls :func:`concept_attention_fwd` / :func:`concept_attention_bwd`.
Runs on CUDA (fp16/bf16/fp32) and in Triton's interpreter (``TRITON_INTERPRET=1``, fp32, CPU).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2_bucket(x: int) -> int:
    """Autotune key bucket: next power of two (>= 16)."""
    return max(16, triton.next_power_of_2(max(int(x), 1)))


def _configs(two_d: bool = True):
    out = []
    for bm, bn in ((64, 64), (128, 64), (64, 32), (128, 128), (32, 32)):
        for warps in (4, 8):
            for stages in (2, 3):
                out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return out


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, CU, ITEM, KV_END,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    stride_ln, stride_lh,
    sm_scale, H, GROUPS, MAX_SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ITEM_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUPS
    start = tl.load(CU + b)
    seqlen = tl.load(CU + b + 1) - start
    m0 = pid_m * BLOCK_M
    if m0 < seqlen:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        m_valid = offs_m < seqlen
        d_valid = offs_d < HEAD_DIM
        q = tl.load(Q + (start + offs_m)[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
                    mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        last = tl.minimum(m0 + BLOCK_M, seqlen) - 1
        if ITEM_MASK:
            item_q = tl.load(ITEM + start + offs_m, mask=m_valid, other=-1)
            hi = tl.load(KV_END + start + last)
        else:
            hi = last + 1
        qk_scale = sm_scale * 1.4426950408889634
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, hi, BLOCK_N):
            offs_k = n0 + offs_n
            n_valid = offs_k < hi
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(K + (start + offs_k)[:, None] * stride_kn + hk * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(V + (start + offs_k)[:, None] * stride_vn + hk * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            if ITEM_MASK:
                item_k = tl.load(ITEM + start + offs_k, mask=n_valid, other=2147483647)
                allowed = item_k[None, :] <= item_q[:, None]
            else:
                allowed = offs_k[None, :] <= offs_m[:, None]
            allowed = allowed & n_valid[None, :] & m_valid[:, None]
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        acc = acc / l_safe[:, None]
        tl.store(O + (start + offs_m)[:, None] * stride_on + h * stride_oh + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
        tl.store(LSE + (start + offs_m) * stride_ln + h * stride_lh, lse, mask=m_valid)


# ----------------------------------------------------------------------------- backward: dK, dV
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU, ITEM, ITEM_START,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_ln, stride_lh, stride_dkn, stride_dkh, stride_dvn, stride_dvh,
    sm_scale, HKV, GROUPS, MAX_SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ITEM_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    start = tl.load(CU + b)
    seqlen = tl.load(CU + b + 1) - start
    n0 = pid_n * BLOCK_N
    if n0 < seqlen:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_mb = tl.arange(0, BLOCK_M)
        n_valid = offs_n < seqlen
        d_valid = offs_d < HEAD_DIM
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + (start + offs_n)[:, None] * stride_kn + hk * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + (start + offs_n)[:, None] * stride_vn + hk * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        # first query that can see any key of this tile: queries before it are fully masked
        if ITEM_MASK:
            item_k = tl.load(ITEM + start + offs_n, mask=n_valid, other=2147483647)
            lo = tl.load(ITEM_START + start + n0)
        else:
            lo = n0
        lo = (lo // BLOCK_M) * BLOCK_M
        qk_scale = sm_scale * 1.4426950408889634
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, GROUPS):
            h = hk * GROUPS + g
            for m0 in range(lo, seqlen, BLOCK_M):
                offs_m = m0 + offs_mb
                m_valid = offs_m < seqlen
                q_mask = m_valid[:, None] & d_valid[None, :]
                q = tl.load(Q + (start + offs_m)[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
                            mask=q_mask, other=0.0)
                do = tl.load(DO + (start + offs_m)[:, None] * stride_don + h * stride_doh + offs_d[None, :],
                             mask=q_mask, other=0.0)
                lse = tl.load(LSE + (start + offs_m) * stride_ln + h * stride_lh, mask=m_valid, other=0.0)
                delta = tl.load(DELTA + (start + offs_m) * stride_ln + h * stride_lh, mask=m_valid, other=0.0)
                st = tl.dot(k, tl.trans(q)) * qk_scale  # [BLOCK_N, BLOCK_M]
                if ITEM_MASK:
                    item_q = tl.load(ITEM + start + offs_m, mask=m_valid, other=-1)
                    allowed = item_k[:, None] <= item_q[None, :]
                else:
                    allowed = offs_n[:, None] <= offs_m[None, :]
                allowed = allowed & n_valid[:, None] & m_valid[None, :]
                pt = tl.where(allowed, tl.exp2(st - lse[None, :] * 1.4426950408889634), 0.0)
                dv += tl.dot(pt.to(do.dtype), do)
                dpt = tl.dot(v, tl.trans(do))
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(q.dtype), q)
        tl.store(DK + (start + offs_n)[:, None] * stride_dkn + hk * stride_dkh + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + (start + offs_n)[:, None] * stride_dvn + hk * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------- backward: dQ
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU, ITEM, KV_END,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_ln, stride_lh, stride_dqn, stride_dqh,
    sm_scale, H, GROUPS, MAX_SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ITEM_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUPS
    start = tl.load(CU + b)
    seqlen = tl.load(CU + b + 1) - start
    m0 = pid_m * BLOCK_M
    if m0 < seqlen:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_nb = tl.arange(0, BLOCK_N)
        m_valid = offs_m < seqlen
        d_valid = offs_d < HEAD_DIM
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(Q + (start + offs_m)[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
                    mask=q_mask, other=0.0)
        do = tl.load(DO + (start + offs_m)[:, None] * stride_don + h * stride_doh + offs_d[None, :],
                     mask=q_mask, other=0.0)
        lse = tl.load(LSE + (start + offs_m) * stride_ln + h * stride_lh, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + (start + offs_m) * stride_ln + h * stride_lh, mask=m_valid, other=0.0)
        last = tl.minimum(m0 + BLOCK_M, seqlen) - 1
        if ITEM_MASK:
            item_q = tl.load(ITEM + start + offs_m, mask=m_valid, other=-1)
            hi = tl.load(KV_END + start + last)
        else:
            hi = last + 1
        qk_scale = sm_scale * 1.4426950408889634
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, hi, BLOCK_N):
            offs_k = n0 + offs_nb
            n_valid = offs_k < hi
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(K + (start + offs_k)[:, None] * stride_kn + hk * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(V + (start + offs_k)[:, None] * stride_vn + hk * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            if ITEM_MASK:
                item_k = tl.load(ITEM + start + offs_k, mask=n_valid, other=2147483647)
                allowed = item_k[None, :] <= item_q[:, None]
            else:
                allowed = offs_k[None, :] <= offs_m[:, None]
            allowed = allowed & n_valid[None, :] & m_valid[:, None]
            p = tl.where(allowed, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DQ + (start + offs_m)[:, None] * stride_dqn + h * stride_dqh + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


_KEY = ["MAX_SEQ_BUCKET", "HEAD_DIM", "ITEM_MASK", "GROUPS"]
_fwd_tuned = triton.autotune(configs=_configs(), key=_KEY)(_fwd_kernel)
_dkdv_tuned = triton.autotune(configs=_configs(), key=_KEY)(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(configs=_configs(), key=_KEY)(_bwd_dq_kernel)

# Interpreter: one fixed tile size (every launch is slow there; autotuning would multiply them).
# Tests may lower it (module attribute) to exercise multi-tile loops and skipped tiles.
_INTERP_BLOCK = 32


def _kernel(tuned, raw):
    if _interpreting():
        return raw, {"BLOCK_M": _INTERP_BLOCK, "BLOCK_N": _INTERP_BLOCK}
    return tuned, {}


# ----------------------------------------------------------------------------- host side
def _item_runs(cu: torch.Tensor, item: torch.Tensor, n: int):
    """Per token: in-sequence start and end (exclusive) of the run of tokens of its item."""
    cu = cu.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens, output_size=n)
    it = item.to(torch.int64)
    is_start = torch.ones(n, dtype=torch.bool, device=item.device)
    is_start[1:] = (seq[1:] != seq[:-1]) | (it[1:] != it[:-1])
    is_end = torch.ones(n, dtype=torch.bool, device=item.device)
    is_end[:-1] = is_start[1:]
    run = torch.cumsum(is_start.to(torch.int64), 0) - 1
    starts = is_start.nonzero().squeeze(1)
    ends = is_end.nonzero().squeeze(1) + 1
    base = cu[seq]
    return (starts[run] - base).to(torch.int32), (ends[run] - base).to(torch.int32)


def _prep(q, k, v, cu_seqlens, item_index):
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cu = cu_seqlens.to(torch.int32).contiguous()
    item = item_index.to(torch.int32).contiguous()
    lens = (cu[1:] - cu[:-1])
    max_seqlen = int(lens.max()) if lens.numel() else 0
    return q, k, v, cu, item, max_seqlen


def concept_attention_fwd(q, k, v, cu_seqlens, item_index, mask: str, scale: float):
    """Forward launch: returns (out [N,H,D] in q.dtype, lse [N,H] float32)."""
    q, k, v, cu, item, max_seqlen = _prep(q, k, v, cu_seqlens, item_index)
    n, h, d = q.shape
    hkv = k.shape[1]
    b = cu.numel() - 1
    out = torch.empty_like(q)
    lse = torch.empty((n, h), dtype=torch.float32, device=q.device)
    if n == 0 or max_seqlen == 0:
        return out.zero_(), lse.zero_()
    item_mask = mask == "item"
    kv_end = _item_runs(cu, item, n)[1] if item_mask else item
    kern, fixed = _kernel(_fwd_tuned, _fwd_kernel)
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), b * h)  # noqa: E731
    kern[grid](
        q, k, v, out, lse, cu, item, kv_end,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        float(scale), h, h // hkv, _pow2_bucket(max_seqlen),
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), ITEM_MASK=item_mask, **fixed,
    )
    return out, lse


def concept_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, item_index, mask: str, scale: float):
    """Backward launches: returns (dq, dk, dv) in the input dtypes."""
    q, k, v, cu, item, max_seqlen = _prep(q, k, v, cu_seqlens, item_index)
    dout = dout.contiguous()
    n, h, d = q.shape
    hkv = k.shape[1]
    b = cu.numel() - 1
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if n == 0 or max_seqlen == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.to(torch.float32).contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # rowsum(dO * O), [N, H]
    item_mask = mask == "item"
    if item_mask:
        item_start, kv_end = _item_runs(cu, item, n)
    else:
        item_start = kv_end = item
    common = dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), ITEM_MASK=item_mask)
    bucket = _pow2_bucket(max_seqlen)
    kern, fixed = _kernel(_dkdv_tuned, _bwd_dkdv_kernel)
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]), b * hkv)  # noqa: E731
    kern[grid](
        q, k, v, dout, lse, delta, dk, dv, cu, item, item_start,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), lse.stride(0), lse.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        float(scale), hkv, h // hkv, bucket, **common, **fixed,
    )
    kern, fixed = _kernel(_dq_tuned, _bwd_dq_kernel)
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), b * h)  # noqa: E731
    kern[grid](
        q, k, v, dout, lse, delta, dq, cu, item, kv_end,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), lse.stride(0), lse.stride(1),
        dq.stride(0), dq.stride(1),
        float(scale), h, h // hkv, bucket, **common, **fixed,
    )
    return dq, dk, dv


class ConceptAttentionFunction(torch.autograd.Function):
    """Autograd wrapper over the Triton launches (no input validation; see
    ``recbase.ops.concept_attention`` for the validated, dispatching public op)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, item_index, mask, scale):
        out, lse = concept_attention_fwd(q, k, v, cu_seqlens, item_index, mask, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, item_index)
        ctx.mask, ctx.scale = mask, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu, item = ctx.saved_tensors
        dq, dk, dv = concept_attention_bwd(dout, q, k, v, out, lse, cu, item, ctx.mask, ctx.scale)
        return dq, dk, dv, None, None, None, None


def concept_attention_triton(q, k, v, cu_seqlens, item_index, mask: str = "causal", scale=None):
    """Triton jagged attention (q: [N,H,D], k/v: [N,Hkv,D]); mask "causal" or "item"."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return ConceptAttentionFunction.apply(q, k, v, cu_seqlens, item_index, mask, float(scale))
