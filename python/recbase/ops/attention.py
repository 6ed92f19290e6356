"""Ops of the RecBase model: jagged concept attention, fused concept embedding, level-restricted
cross-entropy. One dispatch point per op, each registered with ``torch.library.custom_op``
(namespace ``recbase``) plus a fake implementation and autograd, so ``torch.compile`` works.

Backends (argument ``backend``):
  * ``"auto"``      Triton on CUDA tensors (when Triton is installed), PyTorch reference elsewhere;
  * ``"reference"`` PyTorch reference (any device);
  * ``"triton"``    Triton kernels; needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``
                    set before Triton is imported (Triton's interpreter, for tests).

Jagged layout: a batch of B sequences is packed along dim 0 (``total_tokens``) and described by
``cu_seqlens`` (int32/int64 [B+1], 0 = cu[0] <= cu[1] <= ... <= cu[B] = total_tokens).
``item_index[t]`` is the item slot of token t inside its sequence (non-decreasing within a
sequence). Masks (key k visible from query q of the same sequence):
  * ``"causal"``: k <= q;
  * ``"item"``:   item_index[k] <= item_index[q] (tokens of one item see each other, earlier
                  items are strictly causal).

Example:
    >>> import torch
    >>> from recbase.ops import concept_attention
    >>> q = k = v = torch.randn(5, 2, 16)
    >>> cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    >>> item = torch.tensor([0, 0, 0, 0, 1])
    >>> concept_attention(q, k, v, cu, item, mask="item").shape
    torch.Size([5, 2, 16])
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "concept_attention",
    "concept_attention_reference",
    "concept_embedding",
    "concept_embedding_reference",
    "level_cross_entropy",
    "level_cross_entropy_reference",
    "level_logits",
    "validate_jagged",
]

_MASKS = ("causal", "item")
_BACKENDS = {"auto": 0, "reference": 1, "triton": 2}


# --------------------------------------------------------------------------- dispatch helpers
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _backend_code(backend: str) -> int:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
    return _BACKENDS[backend]


def _use_triton(t: torch.Tensor, code: int) -> bool:
    """The single decision point: Triton or the PyTorch reference."""
    if code == 1:
        return False
    supported = t.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if code == 0:
        return t.is_cuda and supported and _triton_installed()
    # explicit Triton request
    if not supported:
        raise TypeError(f"backend='triton' supports float16/bfloat16/float32, got {t.dtype}")
    if not _triton_installed():
        raise RuntimeError("backend='triton' requested but Triton is not installed")
    if t.is_cuda:
        return True
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    raise ValueError(
        "backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
        f"Triton is imported (got device {t.device})"
    )


def _no_autocast(t: torch.Tensor):
    """Reference implementations compute in their own dtypes; an outer autocast must not recast."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def validate_jagged(cu_seqlens: torch.Tensor, total_tokens: int, name: str = "cu_seqlens") -> None:
    """Check a jagged-batch offsets vector: 1-D integer, starts at 0, non-decreasing, ends at
    ``total_tokens``. Raises ValueError/TypeError naming the problem."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with B+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if int(cu[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(cu[0])}")
    if int(cu[-1]) != total_tokens:
        raise ValueError(f"{name} must end at total_tokens={total_tokens}, got {int(cu[-1])}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()[:16]}")


# --------------------------------------------------------------------------- attention reference
def _seq_layout(cu: torch.Tensor, n: int):
    """seq id and in-sequence position of every packed token, max length."""
    cu = cu.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens, output_size=n)
    pos = torch.arange(n, device=cu.device) - cu[seq]
    return seq, pos, lens


class _Padding:
    """Layout of packed rows [N, ...] in a padded [B, T, ...] batch. ``rows`` = seq * T + pos,
    each packed row's row in the flattened [B*T, ...] batch."""

    def __init__(self, cu: torch.Tensor, n: int):
        self.seq, self.pos, self.lens = _seq_layout(cu, n)
        self.b, self.t = cu.numel() - 1, int(self.lens.max())
        self.rows = self.seq * self.t + self.pos

    def pad(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        out = x.new_full((self.b * self.t,) + tuple(x.shape[1:]), fill)
        out.index_copy_(0, self.rows, x)  # one flat copy, then views: no two-index scatter
        return out.view((self.b, self.t) + tuple(x.shape[1:]))

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] (a view of contiguous [B*T, ...] memory: no copy) -> packed [N, ...]."""
        return x.reshape((-1,) + tuple(x.shape[2:])).index_select(0, self.rows)


def _padded_scores(q, k, cu, item, mask, scale):
    """Padded [B,H,T,T] masked scores (accumulation dtype) + layout for scattering back."""
    n, h, d = q.shape
    hkv = k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    pad = _Padding(cu, n)
    t = pad.t
    qp = pad.pad(q.to(acc))  # [B,T,H,D]
    kp = pad.pad(k.to(acc)).repeat_interleave(h // hkv, dim=2)
    ar = torch.arange(t, device=q.device)
    valid = ar[None, :] < pad.lens[:, None]  # [B,T]
    if mask == "causal":
        allowed = ar[None, :, None] >= ar[None, None, :]  # [1,Tq,Tk]
    else:
        ip = pad.pad(item.to(torch.int64), fill=-1)
        allowed = ip[:, None, :] <= ip[:, :, None]
    allowed = allowed & valid[:, None, :]
    # padded query rows attend to themselves only (keeps them finite; they are dropped)
    allowed = allowed | (~valid[:, :, None] & torch.eye(t, dtype=torch.bool, device=q.device))
    scores = torch.einsum("bqhd,bkhd->bhqk", qp, kp) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores, qp, kp, pad, acc


def _flash_cpu_ok(q: torch.Tensor) -> bool:
    """ATen's fused CPU flash attention (with an additive mask; returns the logsumexp)."""
    return q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _padded_group(q, k, v, cu, item, mask):
    """[B,H,T,D] padded q/k/v (kv heads repeated for GQA), additive [B,1,T,T] mask (None for
    "causal": top-left causal masking), layout. Padded keys are never visible to real queries
    (causal: they come after them; item: their item slot is +huge); padded query rows are dropped."""
    n, h, _ = q.shape
    g = h // k.shape[1]
    pad = _Padding(cu, n)
    add = None
    if mask == "item":
        ip = pad.pad(item.to(torch.int64), fill=torch.iinfo(torch.int64).max)
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        add = torch.where(ip[:, None, :] <= ip[:, :, None], zero, zero - float("inf"))[:, None]

    def heads(x, rep):  # a [B,H,T,D] view of [B,T,H,D] memory: the fused kernels take the strides
        x = pad.pad(x)
        return (x.repeat_interleave(rep, dim=2) if rep > 1 else x).transpose(1, 2)

    return heads(q, 1), heads(k, g), heads(v, g), add, pad


def _attention_reference_fwd_group(q, k, v, cu, item, mask: str, scale: float):
    """Padded-batch attention with an explicit mask. Returns (out [N,H,D], lse [N,H])."""
    n, h, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if n == 0 or cu.numel() < 2:
        return q.new_zeros(q.shape), torch.zeros(n, h, dtype=acc, device=q.device)
    if _flash_cpu_ok(q):
        qp, kp, vp, add, pad = _padded_group(q, k, v, cu, item, mask)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qp, kp, vp, 0.0, add is None, attn_mask=add, scale=scale)
        return pad.unpad(o.transpose(1, 2)).to(q.dtype), pad.unpad(lse.transpose(1, 2)).to(acc)
    scores, _, _, pad, acc = _padded_scores(q, k, cu, item, mask, scale)
    vp = pad.pad(v.to(acc)).repeat_interleave(h // k.shape[1], dim=2)
    lse = torch.logsumexp(scores, dim=-1)  # [B,H,T]
    p = torch.exp(scores - lse[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", p, vp)
    return out[pad.seq, pad.pos].to(q.dtype), lse.transpose(1, 2)[pad.seq, pad.pos]


def _attention_reference_bwd_group(dout, q, k, v, cu, item, mask: str, scale: float, out=None, lse=None):
    """Backward of the padded reference (dS = P * (dP - rowsum(dO * O))). ``out``/``lse`` of
    the forward ([N,H,D], [N,H]), when given, spare the fused CPU path a forward recomputation."""
    n, h, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    if n == 0 or cu.numel() < 2:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if _flash_cpu_ok(q):
        qp, kp, vp, add, pad = _padded_group(q, k, v, cu, item, mask)
        if out is not None and lse is not None:
            o = pad.pad(out.to(q.dtype)).transpose(1, 2)
            # padded query rows: lse = +inf makes their probabilities exactly 0
            lse = pad.pad(lse.to(_lse_dtype(q)), fill=float("inf")).transpose(1, 2)
        else:
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qp, kp, vp, 0.0, add is None, attn_mask=add, scale=scale)
        dop = pad.pad(dout.to(q.dtype)).transpose(1, 2)
        dqp, dkp, dvp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dop, qp, kp, vp, o, lse, 0.0, add is None, attn_mask=add, scale=scale)
        dq = pad.unpad(dqp.transpose(1, 2))
        dk = pad.unpad(dkp.transpose(1, 2)).reshape(n, hkv, g, d).sum(2)
        dv = pad.unpad(dvp.transpose(1, 2)).reshape(n, hkv, g, d).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    scores, qp, kp, pad, acc = _padded_scores(q, k, cu, item, mask, scale)
    vp = pad.pad(v.to(acc)).repeat_interleave(g, dim=2)
    dop = pad.pad(dout.to(acc))
    p = torch.softmax(scores, dim=-1)  # [B,H,Tq,Tk]
    dvp = torch.einsum("bhqk,bqhd->bkhd", p, dop)
    dp = torch.einsum("bqhd,bkhd->bhqk", dop, vp)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
    dqp = torch.einsum("bhqk,bkhd->bqhd", ds, kp)
    dkp = torch.einsum("bhqk,bqhd->bkhd", ds, qp)
    dq = dqp[pad.seq, pad.pos]
    dk = dkp[pad.seq, pad.pos].view(n, hkv, g, d).sum(2)
    dv = dvp[pad.seq, pad.pos].view(n, hkv, g, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# Padded scores of a group of sequences hold at most this many elements (bounds CPU memory).
_REFERENCE_SCORE_BUDGET = 1 << 24


def _reference_groups(cu: torch.Tensor, heads: int):
    """Consecutive sequence ranges [s, e) whose padded score tensors fit the budget."""
    lens = (cu[1:] - cu[:-1]).tolist()
    groups, s, tmax = [], 0, 0
    for b, n in enumerate(lens):
        t = max(tmax, n)
        if b > s and (b - s + 1) * t * t * heads > _REFERENCE_SCORE_BUDGET:
            groups.append((s, b))
            s, tmax = b, n
        else:
            tmax = t
    groups.append((s, len(lens)))
    return groups


def _attention_reference_fwd(q, k, v, cu, item, mask: str, scale: float):
    """Reference forward (out [N,H,D], lse [N,H]) over budget-sized groups of sequences."""
    groups = _reference_groups(cu, q.shape[1]) if cu.numel() > 1 else [(0, 0)]
    if len(groups) == 1:
        return _attention_reference_fwd_group(q, k, v, cu, item, mask, scale)
    outs, lses = [], []
    for s, e in groups:
        a, b = int(cu[s]), int(cu[e])
        o, l = _attention_reference_fwd_group(q[a:b], k[a:b], v[a:b], cu[s:e + 1] - cu[s], item[a:b], mask, scale)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def _attention_reference_bwd(dout, q, k, v, cu, item, mask: str, scale: float, out=None, lse=None):
    """Reference backward (dq, dk, dv) over budget-sized groups of sequences."""
    groups = _reference_groups(cu, q.shape[1]) if cu.numel() > 1 else [(0, 0)]
    if len(groups) == 1:
        return _attention_reference_bwd_group(dout, q, k, v, cu, item, mask, scale, out, lse)
    parts = []
    for s, e in groups:
        a, b = int(cu[s]), int(cu[e])
        parts.append(_attention_reference_bwd_group(
            dout[a:b], q[a:b], k[a:b], v[a:b], cu[s:e + 1] - cu[s], item[a:b], mask, scale,
            None if out is None else out[a:b], None if lse is None else lse[a:b]))
    return tuple(torch.cat(x) for x in zip(*parts))


def _check_op_args(mask: str, backend: int) -> None:
    """What a direct ``torch.ops.recbase.*`` call could get wrong that the wrappers check."""
    if mask not in _MASKS:
        raise ValueError(f"mask must be one of {_MASKS}, got {mask!r}")
    if backend not in _BACKENDS.values():
        raise ValueError(f"backend code must be one of {sorted(_BACKENDS.values())} ({_BACKENDS}), got {backend!r}")


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("recbase::concept_attention", mutates_args=())
def _concept_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    item_index: torch.Tensor, mask: str, scale: float, backend: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_op_args(mask, backend)
    if _use_triton(q, backend):
        from recbase.kernels.concept_attention import concept_attention_fwd

        return concept_attention_fwd(q, k, v, cu_seqlens, item_index, mask, scale)
    with _no_autocast(q):
        return _attention_reference_fwd(q, k, v, cu_seqlens, item_index, mask, scale)


@_concept_attention_op.register_fake
def _(q, k, v, cu_seqlens, item_index, mask, scale, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=_lse_dtype(q))


@torch.library.custom_op("recbase::concept_attention_backward", mutates_args=())
def _concept_attention_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: torch.Tensor, item_index: torch.Tensor, mask: str, scale: float,
    backend: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_op_args(mask, backend)
    if _use_triton(q, backend):
        from recbase.kernels.concept_attention import concept_attention_bwd

        return concept_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, item_index, mask, scale)
    with _no_autocast(q):
        return _attention_reference_bwd(dout, q, k, v, cu_seqlens, item_index, mask, scale, out, lse)


@_concept_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, item_index, mask, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attn_setup(ctx, inputs, output):
    q, k, v, cu, item, mask, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu, item)
    ctx.mask, ctx.scale, ctx.backend = mask, scale, backend


def _attn_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu, item = ctx.saved_tensors
    dq, dk, dv = _concept_attention_bwd_op(
        dout.contiguous(), q, k, v, out, lse, cu, item, ctx.mask, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, None, None, None


_concept_attention_op.register_autograd(_attn_backward, setup_context=_attn_setup)


def _check_attention_inputs(q, k, v, cu_seqlens, item_index, mask, check_values):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name} must be (total_tokens, heads, head_dim), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"k (total_tokens, kv_heads, head_dim)={tuple(k.shape)} does not match q={tuple(q.shape)}"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"kv heads ({k.shape[1]}) must divide q heads ({q.shape[1]})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask not in _MASKS:
        raise ValueError(f"mask must be one of {_MASKS}, got {mask!r}")
    if not isinstance(item_index, torch.Tensor) or item_index.dtype not in (torch.int32, torch.int64):
        raise TypeError("item_index must be an int32/int64 tensor")
    if item_index.shape != (q.shape[0],):
        raise ValueError(f"item_index must have shape ({q.shape[0]},), got {tuple(item_index.shape)}")
    for name, x in (("k", k), ("v", v), ("cu_seqlens", cu_seqlens), ("item_index", item_index)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if check_values:
        validate_jagged(cu_seqlens, q.shape[0])
        seq, _, _ = _seq_layout(cu_seqlens, q.shape[0])
        it = item_index.to(torch.int64)
        same = seq[1:] == seq[:-1]
        if bool(((it[1:] < it[:-1]) & same).any()):
            raise ValueError("item_index must be non-decreasing within each sequence")
        if q.shape[0] and bool((it < 0).any()):
            raise ValueError("item_index must be >= 0")


def concept_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    item_index: torch.Tensor, mask: str = "causal", scale: Optional[float] = None,
    backend: str = "auto", check_inputs: bool = True,
) -> torch.Tensor:
    """Attention over jagged sequences with an index-computed mask (see module docstring).

    q: (total_tokens, H, D); k, v: (total_tokens, Hkv, D) with Hkv dividing H (GQA).
    Returns (total_tokens, H, D). ``check_inputs=False`` skips the value checks that synchronise
    with the device (monotone cu_seqlens / item_index).
    """
    _check_attention_inputs(q, k, v, cu_seqlens, item_index, mask, check_inputs)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, _ = _concept_attention_op(
        q, k, v, cu_seqlens, item_index, mask, float(scale), _backend_code(backend)
    )
    return out


def concept_attention_reference(q, k, v, cu_seqlens, item_index, mask="causal", scale=None):
    """Plain differentiable PyTorch attention (padded batch + boolean mask), no custom op."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _attention_reference_fwd(q, k, v, cu_seqlens, item_index, mask, float(scale))[0]


# --------------------------------------------------------------------------- concept embedding
def concept_embedding_reference(token_ids, level_ids, token_weight, level_weight,
                                item_ids=None, item_weight=None):
    """token_weight[token_ids] + level_weight[level_ids] (+ item_weight[item_ids])."""
    out = F.embedding(token_ids, token_weight) + F.embedding(level_ids, level_weight)
    if item_weight is not None:
        out = out + F.embedding(item_ids, item_weight)
    return out


@torch.library.custom_op("recbase::concept_embedding", mutates_args=())
def _concept_embedding_op(
    token_ids: torch.Tensor, level_ids: torch.Tensor, item_ids: Optional[torch.Tensor],
    token_weight: torch.Tensor, level_weight: torch.Tensor, item_weight: Optional[torch.Tensor],
    backend: int,
) -> torch.Tensor:
    if _use_triton(token_weight, backend):
        from recbase.kernels.concept_embedding import concept_embedding_fwd

        return concept_embedding_fwd(token_ids, level_ids, item_ids, token_weight, level_weight, item_weight)
    with _no_autocast(token_weight):
        return concept_embedding_reference(token_ids, level_ids, token_weight, level_weight, item_ids, item_weight)


@_concept_embedding_op.register_fake
def _(token_ids, level_ids, item_ids, token_weight, level_weight, item_weight, backend):
    return token_weight.new_empty((token_ids.shape[0], token_weight.shape[1]))


@torch.library.custom_op("recbase::concept_embedding_backward", mutates_args=())
def _concept_embedding_bwd_op(
    dout: torch.Tensor, token_ids: torch.Tensor, level_ids: torch.Tensor,
    item_ids: Optional[torch.Tensor], num_tokens: int, num_levels: int, num_items: int, backend: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(dout, backend):
        from recbase.kernels.concept_embedding import concept_embedding_bwd

        return concept_embedding_bwd(dout, token_ids, level_ids, item_ids, num_tokens, num_levels, num_items)
    h = dout.shape[1]
    acc = torch.float64 if dout.dtype == torch.float64 else torch.float32
    g = dout.to(acc)
    dtok = torch.zeros(num_tokens, h, dtype=acc, device=dout.device).index_add_(0, token_ids, g)
    dlvl = torch.zeros(num_levels, h, dtype=acc, device=dout.device).index_add_(0, level_ids, g)
    ditem = torch.zeros(num_items, h, dtype=acc, device=dout.device)
    if item_ids is not None:
        ditem.index_add_(0, item_ids, g)
    return dtok.to(dout.dtype), dlvl.to(dout.dtype), ditem.to(dout.dtype)


@_concept_embedding_bwd_op.register_fake
def _(dout, token_ids, level_ids, item_ids, num_tokens, num_levels, num_items, backend):
    h = dout.shape[1]
    return dout.new_empty((num_tokens, h)), dout.new_empty((num_levels, h)), dout.new_empty((num_items, h))


def _emb_setup(ctx, inputs, output):
    token_ids, level_ids, item_ids, tw, lw, iw, backend = inputs
    ctx.save_for_backward(token_ids, level_ids, item_ids)
    ctx.sizes = (tw.shape[0], lw.shape[0], 0 if iw is None else iw.shape[0])
    ctx.backend = backend


def _emb_backward(ctx, dout):
    token_ids, level_ids, item_ids = ctx.saved_tensors
    dtok, dlvl, ditem = _concept_embedding_bwd_op(
        dout.contiguous(), token_ids, level_ids, item_ids, *ctx.sizes, ctx.backend
    )
    return None, None, None, dtok, dlvl, (ditem if ctx.sizes[2] else None), None


_concept_embedding_op.register_autograd(_emb_backward, setup_context=_emb_setup)


def concept_embedding(token_ids, level_ids, token_weight, level_weight, item_ids=None,
                      item_weight=None, backend: str = "auto") -> torch.Tensor:
    """Fused concept-token embedding: token + level (+ item-position) embedding in one pass.

    token_ids, level_ids, item_ids: int64 [N]; weights [V, H], [Lv, H], [M, H] -> [N, H].
    Indices out of range raise ValueError.

    >>> import torch
    >>> tw, lw = torch.randn(10, 4), torch.randn(3, 4)
    >>> concept_embedding(torch.tensor([5, 6]), torch.tensor([0, 1]), tw, lw).shape
    torch.Size([2, 4])
    """
    if (item_ids is None) != (item_weight is None):
        raise ValueError("item_ids and item_weight must be given together")
    for name, ids, w in (("token_ids", token_ids, token_weight), ("level_ids", level_ids, level_weight),
                         ("item_ids", item_ids, item_weight)):
        if ids is None:
            continue
        if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int32/int64 tensor, got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[0] != token_ids.shape[0]:
            raise ValueError(f"{name} has {ids.shape[0]} entries, token_ids has {token_ids.shape[0]}")
        if w.dim() != 2 or w.shape[1] != token_weight.shape[1]:
            raise ValueError(f"weight for {name} must be [rows, {token_weight.shape[1]}], got {tuple(w.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= w.shape[0]):
            raise ValueError(f"{name} must lie in [0, {w.shape[0]}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
    ids = [x if x is None else x.to(torch.int64) for x in (token_ids, level_ids, item_ids)]
    return _concept_embedding_op(ids[0], ids[1], ids[2], token_weight, level_weight, item_weight,
                                 _backend_code(backend))


# --------------------------------------------------------------------------- level cross-entropy
def _check_level_inputs(hidden, weight, next_level, target, levels) -> None:
    """Shapes, dtypes and value ranges of the level-restricted head's inputs (``target`` may be None)."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor) or hidden.dim() != 2 \
            or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [L*K, H] expected, got {tuple(getattr(hidden, 'shape', ()))} "
                         f"and {tuple(getattr(weight, 'shape', ()))}")
    if not isinstance(levels, int) or levels <= 0 or weight.shape[0] % levels:
        raise ValueError(f"weight rows ({weight.shape[0]}) must be levels*K with levels={levels!r}")
    k = weight.shape[0] // levels
    n = hidden.shape[0]
    for name, x in (("next_level", next_level), ("target", target)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int32, torch.int64) or x.shape != (n,):
            raise ValueError(f"{name} must be an int tensor of shape ({n},), got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if n:
        if int(next_level.min()) < 0 or int(next_level.max()) >= levels:
            raise ValueError(f"next_level must lie in [0, {levels}), got "
                             f"[{int(next_level.min())}, {int(next_level.max())}]")
        if target is not None:
            bad = (target != -100) & ((target < 0) | (target >= k))
            if bool(bad.any()):
                raise ValueError(f"target must be a code in [0, {k}) or -100, got {int(target[bad][0])}")


def level_logits(hidden: torch.Tensor, weight: torch.Tensor, next_level: torch.Tensor, levels: int) -> torch.Tensor:
    """Restricted logits [N, K]: row n scored only against its next level's K codes,
    ``hidden[n] @ weight[next_level[n]*K : (next_level[n]+1)*K].T`` (weight: [L*K, H]).
    A ``next_level`` outside [0, levels) raises (its row would have no level to be scored on)."""
    _check_level_inputs(hidden, weight, next_level, None, levels)
    k = weight.shape[0] // levels
    w3 = weight.view(levels, k, weight.shape[1])
    out = hidden.new_empty((hidden.shape[0], k))
    for lvl in range(levels):
        rows = (next_level == lvl).nonzero().squeeze(1)
        if rows.numel():
            out[rows] = (hidden[rows] @ w3[lvl].T).to(out.dtype)
    return out


def level_cross_entropy_reference(hidden, weight, next_level, target, levels: int):
    """Per-row loss (0 where target == -100) of the next-level-restricted softmax, float32/64."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = level_logits(hidden, weight, next_level, levels).to(acc)
    loss = F.cross_entropy(logits, target.clamp_min(0), reduction="none")
    return torch.where(target >= 0, loss, torch.zeros_like(loss))


@torch.library.custom_op("recbase::level_cross_entropy", mutates_args=())
def _level_ce_op(hidden: torch.Tensor, weight: torch.Tensor, next_level: torch.Tensor,
                 target: torch.Tensor, levels: int, backend: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_level_inputs(hidden, weight, next_level, target, levels)  # direct torch.ops calls too
    if backend not in _BACKENDS.values():
        raise ValueError(f"backend code must be one of {sorted(_BACKENDS.values())}, got {backend!r}")
    if _use_triton(hidden, backend):
        from recbase.kernels.level_cross_entropy import level_cross_entropy_fwd

        return level_cross_entropy_fwd(hidden, weight, next_level, target, levels)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    with _no_autocast(hidden):
        logits = level_logits(hidden, weight, next_level, levels).to(acc)
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, target.clamp_min(0)[:, None]).squeeze(1)
    loss = torch.where(target >= 0, lse - picked, torch.zeros_like(lse))
    return loss, lse


@_level_ce_op.register_fake
def _(hidden, weight, next_level, target, levels, backend):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n = hidden.shape[0]
    return hidden.new_empty((n,), dtype=acc), hidden.new_empty((n,), dtype=acc)


@torch.library.custom_op("recbase::level_cross_entropy_backward", mutates_args=())
def _level_ce_bwd_op(dloss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                     next_level: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                     levels: int, backend: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(hidden, backend):
        from recbase.kernels.level_cross_entropy import level_cross_entropy_bwd

        return level_cross_entropy_bwd(dloss, hidden, weight, next_level, target, lse, levels)
    with _no_autocast(hidden):
        return _level_ce_reference_bwd(dloss, hidden, weight, next_level, target, lse, levels)


def _level_ce_reference_bwd(dloss, hidden, weight, next_level, target, lse, levels):
    acc = lse.dtype
    k = weight.shape[0] // levels
    logits = level_logits(hidden, weight, next_level, levels).to(acc)
    g = torch.exp(logits - lse[:, None])
    valid = target >= 0
    g[valid, target[valid]] -= 1.0
    g = g * torch.where(valid, dloss, torch.zeros_like(dloss)).to(acc)[:, None]
    w3 = weight.view(levels, k, -1)
    dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    dw = torch.zeros((levels, k, weight.shape[1]), dtype=acc, device=hidden.device)
    for lvl in range(levels):
        rows = (next_level == lvl).nonzero().squeeze(1)
        if rows.numel():
            dh[rows] = g[rows] @ w3[lvl].to(acc)
            dw[lvl] = g[rows].T @ hidden[rows].to(acc)
    return dh.to(hidden.dtype), dw.view_as(weight).to(weight.dtype)


@_level_ce_bwd_op.register_fake
def _(dloss, hidden, weight, next_level, target, lse, levels, backend):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _ce_setup(ctx, inputs, output):
    hidden, weight, next_level, target, levels, backend = inputs
    ctx.save_for_backward(hidden, weight, next_level, target, output[1])
    ctx.levels, ctx.backend = levels, backend


def _ce_backward(ctx, dloss, dlse):
    hidden, weight, next_level, target, lse = ctx.saved_tensors
    dh, dw = _level_ce_bwd_op(dloss.contiguous(), hidden, weight, next_level, target, lse,
                              ctx.levels, ctx.backend)
    return dh, dw, None, None, None, None


_level_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup)


def level_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, next_level: torch.Tensor,
                        target: torch.Tensor, levels: int, backend: str = "auto") -> torch.Tensor:
    """Per-row cross-entropy of the next token restricted to its level's K codes.

    hidden [N, H]; weight [L*K, H] (output-head rows of the concept tokens, level-major);
    next_level int64 [N] in [0, L); target int64 [N]: code in [0, K) or -100 (ignored, loss 0).
    Returns float32 (float64 for float64 input) losses [N]; never builds [N, L*K] logits.

    >>> import torch
    >>> h, w = torch.randn(3, 8), torch.randn(2 * 5, 8)
    >>> level_cross_entropy(h, w, torch.tensor([0, 1, 0]), torch.tensor([4, -100, 0]), levels=2).shape
    torch.Size([3])
    """
    _check_level_inputs(hidden, weight, next_level, target, levels)
    return _level_ce_op(hidden, weight, next_level.to(torch.int64), target.to(torch.int64),
                        int(levels), _backend_code(backend))[0]
