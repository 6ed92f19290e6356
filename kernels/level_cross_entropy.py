"""Output head + cross-entropy restricted to the next level's K codes, fused.

Math: for row n with next level l and target code t,
    z_n = h_n W_l^T  (W_l = W[l*K:(l+1)*K], K logits, never the L*K vocabulary),
    loss_n = logsumexp(z_n) - z_n[t],   dz_n = (softmax(z_n) - onehot(t)) * dloss_n.
Rows are sorted by level so that each program owns BLOCK_R rows of one level; the forward streams
K in BLOCK_K chunks with an online logsumexp (no logits stored, only lse). The backward recomputes
dz chunk by chunk in Triton and leaves dh = dz W_l and dW_l = dz^T h to one GEMM per level
(row chunks bound the [rows, K] buffer).
Public entry point: :func:`level_cross_entropy_triton`; the op dispatch in ``recbase.ops.attention``
calls :func:`level_cross_entropy_fwd` / :func:`level_cross_entropy_bwd`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100
_ROW_CHUNK = 16384  # rows per backward chunk: bounds the [rows, K] gradient buffer


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logits_chunk(H, W, rows_h, r_ok, k_idx, k_ok, HID, stride_h, stride_w,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        c_ok = cols < HID
        hx = tl.load(H + rows_h[:, None] * stride_h + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        wx = tl.load(W + k_idx[:, None] * stride_w + cols[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc += tl.dot(hx, tl.trans(wx))
    return acc


@triton.jit
def _ce_fwd_kernel(
    H, W, TGT, LOSS, LSE, BLK_LEVEL, BLK_START, BLK_END, HID, KCODES,
    stride_h, stride_w,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    level = tl.load(BLK_LEVEL + pid)
    r0 = tl.load(BLK_START + pid)
    r1 = tl.load(BLK_END + pid)
    rows = r0 + tl.arange(0, BLOCK_R)
    r_ok = rows < r1
    tgt = tl.load(TGT + rows, mask=r_ok, other=-100)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    picked = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, KCODES, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < KCODES
        z = _logits_chunk(H, W, rows, r_ok, level * KCODES + kk, k_ok, HID, stride_h, stride_w,
                          BLOCK_R, BLOCK_K, BLOCK_H)
        z = tl.where(k_ok[None, :], z, float("-inf"))
        picked += tl.sum(tl.where(kk[None, :] == tgt[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(s_i)
    loss = tl.where(tgt >= 0, lse - picked, 0.0)
    tl.store(LSE + rows, lse, mask=r_ok)
    tl.store(LOSS + rows, loss, mask=r_ok)


@triton.jit
def _ce_bwd_kernel(
    H, W, TGT, LSE, DLOSS, G, BLK_LEVEL, BLK_START, BLK_END, HID, KCODES, ROW0,
    stride_h, stride_w, stride_g,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    level = tl.load(BLK_LEVEL + pid)
    r0 = tl.load(BLK_START + pid)
    r1 = tl.load(BLK_END + pid)
    rows = r0 + tl.arange(0, BLOCK_R)
    r_ok = rows < r1
    tgt = tl.load(TGT + rows, mask=r_ok, other=-100)
    lse = tl.load(LSE + rows, mask=r_ok, other=0.0)
    dl = tl.load(DLOSS + rows, mask=r_ok, other=0.0)
    dl = tl.where(tgt >= 0, dl, 0.0)
    for k0 in range(0, KCODES, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < KCODES
        z = _logits_chunk(H, W, rows, r_ok, level * KCODES + kk, k_ok, HID, stride_h, stride_w,
                          BLOCK_R, BLOCK_K, BLOCK_H)
        g = tl.exp(z - lse[:, None]) - tl.where(kk[None, :] == tgt[:, None], 1.0, 0.0)
        g = g * dl[:, None]
        tl.store(G + (rows - ROW0)[:, None] * stride_g + kk[None, :], g.to(G.dtype.element_ty),
                 mask=r_ok[:, None] & k_ok[None, :])


def _block_sizes(hid: int, k: int):
    if _interpreting():
        return 32, max(16, min(64, triton.next_power_of_2(k))), max(16, min(64, triton.next_power_of_2(hid)))
    return 64, max(16, min(128, triton.next_power_of_2(k))), max(16, min(64, triton.next_power_of_2(hid)))


def _sorted_layout(next_level: torch.Tensor, levels: int, block_r: int):
    """Rows sorted by level and a table of (level, start, end) row blocks of a single level."""
    order = torch.argsort(next_level, stable=True)
    counts = torch.bincount(next_level, minlength=levels).tolist()
    starts, lv, bs, be = 0, [], [], []
    seg = []
    for level, c in enumerate(counts):
        seg.append((starts, starts + c))
        for s in range(starts, starts + c, block_r):
            lv.append(level)
            bs.append(s)
            be.append(min(s + block_r, starts + c))
        starts += c
    dev = next_level.device
    table = [torch.tensor(x, dtype=torch.int32, device=dev) for x in (lv, bs, be)]
    return order, seg, table


def level_cross_entropy_fwd(hidden, weight, next_level, target, levels: int):
    """Returns (loss [N] float32, lse [N] float32) in the original row order."""
    n, hid = hidden.shape
    k = weight.shape[0] // levels
    loss = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return loss, lse
    br, bk, bh = _block_sizes(hid, k)
    order, _, (blv, bst, ben) = _sorted_layout(next_level, levels, br)
    hs = hidden[order].contiguous()
    ts = target[order].contiguous()
    w = weight.contiguous()
    loss_s, lse_s = torch.empty_like(loss), torch.empty_like(lse)
    _ce_fwd_kernel[(blv.numel(),)](hs, w, ts, loss_s, lse_s, blv, bst, ben, hid, k,
                                   hs.stride(0), w.stride(0), BLOCK_R=br, BLOCK_K=bk, BLOCK_H=bh)
    loss[order] = loss_s
    lse[order] = lse_s
    return loss, lse


def level_cross_entropy_bwd(dloss, hidden, weight, next_level, target, lse, levels: int):
    """Returns (dhidden, dweight) in the input dtypes."""
    n, hid = hidden.shape
    k = weight.shape[0] // levels
    dh = torch.zeros_like(hidden)
    dw = torch.zeros_like(weight)
    if n == 0:
        return dh, dw
    br, bk, bh = _block_sizes(hid, k)
    order, segs, _ = _sorted_layout(next_level, levels, br)
    hs = hidden[order].contiguous()
    ts = target[order].contiguous()
    ls = lse[order].to(torch.float32).contiguous()
    ds = dloss[order].to(torch.float32).contiguous()
    w = weight.contiguous()
    w3 = w.view(levels, k, hid)
    dw3 = torch.zeros((levels, k, hid), dtype=torch.float32, device=hidden.device)
    dhs = torch.empty((n, hid), dtype=torch.float32, device=hidden.device)
    gdtype = torch.float32 if hidden.dtype in (torch.float32, torch.float64) else hidden.dtype
    for level, (s0, s1) in enumerate(segs):
        for c0 in range(s0, s1, _ROW_CHUNK):
            c1 = min(c0 + _ROW_CHUNK, s1)
            lv = torch.full((triton.cdiv(c1 - c0, br),), level, dtype=torch.int32, device=hidden.device)
            bst = torch.arange(c0, c1, br, dtype=torch.int32, device=hidden.device)
            ben = torch.clamp(bst + br, max=c1)
            g = torch.empty((c1 - c0, k), dtype=gdtype, device=hidden.device)
            _ce_bwd_kernel[(lv.numel(),)](hs, w, ts, ls, ds, g, lv, bst, ben, hid, k, c0,
                                          hs.stride(0), w.stride(0), g.stride(0),
                                          BLOCK_R=br, BLOCK_K=bk, BLOCK_H=bh)
            dhs[c0:c1] = (g @ w3[level].to(gdtype)).float()
            dw3[level] += (g.T @ hs[c0:c1].to(gdtype)).float()
    dh[order] = dhs.to(hidden.dtype)
    return dh, dw3.view_as(weight).to(weight.dtype)


class LevelCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, next_level, target, levels):
        loss, lse = level_cross_entropy_fwd(hidden, weight, next_level, target, levels)
        ctx.save_for_backward(hidden, weight, next_level, target, lse)
        ctx.levels = levels
        return loss

    @staticmethod
    def backward(ctx, dloss):
        hidden, weight, next_level, target, lse = ctx.saved_tensors
        dh, dw = level_cross_entropy_bwd(dloss, hidden, weight, next_level, target, lse, ctx.levels)
        return dh, dw, None, None, None


def level_cross_entropy_triton(hidden, weight, next_level, target, levels: int):
    """Per-row restricted CE via Triton (no validation; see ``recbase.ops.level_cross_entropy``)."""
    return LevelCrossEntropyFunction.apply(hidden, weight, next_level, target, levels)
