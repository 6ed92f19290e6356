"""Fused concept-token embedding: one pass over the output instead of two or three.

Math: out[n] = T[token[n]] + Lv[level[n]] (+ I[item[n]]).
Backward: dT[v] = sum_{n: token[n]=v} dout[n] (likewise dI) by fp32 atomics; the level table has
only L+1 rows, so each program first reduces its rows per level and issues one atomic per level
(no hot-spot contention).
Public entry point: :func:`concept_embedding_triton` (autograd Function); the op dispatch in
``recbase.ops.attention`` calls :func:`concept_embedding_fwd` / :func:`concept_embedding_bwd`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _emb_fwd_kernel(
    TOK, LVL, ITEM, TW, LW, IW, OUT, N, HID,
    stride_tw, stride_lw, stride_iw, stride_out,
    HAS_ITEM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    r_ok = rows < N
    mask = r_ok[:, None] & (cols < HID)[None, :]
    tok = tl.load(TOK + rows, mask=r_ok, other=0)
    lvl = tl.load(LVL + rows, mask=r_ok, other=0)
    acc = tl.load(TW + tok[:, None] * stride_tw + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(LW + lvl[:, None] * stride_lw + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ITEM:
        it = tl.load(ITEM + rows, mask=r_ok, other=0)
        acc += tl.load(IW + it[:, None] * stride_iw + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_out + cols[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _emb_bwd_kernel(
    DOUT, TOK, LVL, ITEM, DTW, DLW, DIW, N, HID,
    stride_dout, stride_dtw, stride_dlw, stride_diw,
    NUM_LEVELS: tl.constexpr, HAS_ITEM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    r_ok = rows < N
    c_ok = cols < HID
    mask = r_ok[:, None] & c_ok[None, :]
    g = tl.load(DOUT + rows[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tok = tl.load(TOK + rows, mask=r_ok, other=0)
    tl.atomic_add(DTW + tok[:, None] * stride_dtw + cols[None, :], g, mask=mask)
    if HAS_ITEM:
        it = tl.load(ITEM + rows, mask=r_ok, other=0)
        tl.atomic_add(DIW + it[:, None] * stride_diw + cols[None, :], g, mask=mask)
    lvl = tl.load(LVL + rows, mask=r_ok, other=-1)
    for lv in tl.static_range(NUM_LEVELS):
        part = tl.sum(tl.where((lvl == lv)[:, None], g, 0.0), axis=0)
        tl.atomic_add(DLW + lv * stride_dlw + cols, part, mask=c_ok)


def _blocks(hid: int):
    if _interpreting():
        return 64, max(16, triton.next_power_of_2(hid))
    return 32, min(256, max(16, triton.next_power_of_2(hid)))


def concept_embedding_fwd(token_ids, level_ids, item_ids, token_weight, level_weight, item_weight):
    n, hid = token_ids.shape[0], token_weight.shape[1]
    tw, lw = token_weight.contiguous(), level_weight.contiguous()
    iw = item_weight.contiguous() if item_weight is not None else tw
    out = torch.empty((n, hid), dtype=token_weight.dtype, device=token_weight.device)
    if n == 0:
        return out
    has_item = item_ids is not None
    it = item_ids.contiguous() if has_item else token_ids
    br, bh = _blocks(hid)
    grid = (triton.cdiv(n, br), triton.cdiv(hid, bh))
    _emb_fwd_kernel[grid](token_ids.contiguous(), level_ids.contiguous(), it, tw, lw, iw, out, n, hid,
                          tw.stride(0), lw.stride(0), iw.stride(0), out.stride(0),
                          HAS_ITEM=has_item, BLOCK_R=br, BLOCK_H=bh)
    return out


def concept_embedding_bwd(dout, token_ids, level_ids, item_ids, num_tokens, num_levels, num_items):
    n, hid = dout.shape
    dev = dout.device
    dtw = torch.zeros((num_tokens, hid), dtype=torch.float32, device=dev)
    dlw = torch.zeros((num_levels, hid), dtype=torch.float32, device=dev)
    diw = torch.zeros((num_items, hid), dtype=torch.float32, device=dev)
    if n:
        has_item = item_ids is not None
        br, bh = _blocks(hid)
        grid = (triton.cdiv(n, br), triton.cdiv(hid, bh))
        dout = dout.contiguous()
        _emb_bwd_kernel[grid](dout, token_ids.contiguous(), level_ids.contiguous(),
                              item_ids.contiguous() if has_item else token_ids,
                              dtw, dlw, diw if has_item else dtw, n, hid,
                              dout.stride(0), dtw.stride(0), dlw.stride(0), (diw if has_item else dtw).stride(0),
                              NUM_LEVELS=num_levels, HAS_ITEM=has_item, BLOCK_R=br, BLOCK_H=bh)
    return dtw.to(dout.dtype), dlw.to(dout.dtype), diw.to(dout.dtype)


class ConceptEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_ids, level_ids, item_ids, token_weight, level_weight, item_weight):
        ctx.save_for_backward(token_ids, level_ids, item_ids)
        ctx.sizes = (token_weight.shape[0], level_weight.shape[0], 0 if item_weight is None else item_weight.shape[0])
        return concept_embedding_fwd(token_ids, level_ids, item_ids, token_weight, level_weight, item_weight)

    @staticmethod
    def backward(ctx, dout):
        token_ids, level_ids, item_ids = ctx.saved_tensors
        dtw, dlw, diw = concept_embedding_bwd(dout, token_ids, level_ids, item_ids, *ctx.sizes)
        return None, None, None, dtw, dlw, (diw if ctx.sizes[2] else None)


def concept_embedding_triton(token_ids, level_ids, token_weight, level_weight, item_ids=None, item_weight=None):
    """Triton fused embedding (no validation; see ``recbase.ops.concept_embedding``)."""
    return ConceptEmbeddingFunction.apply(token_ids, level_ids, item_ids, token_weight, level_weight, item_weight)
