"""Trie-constrained beam step: one dispatch point (PyTorch reference / C++ CPU / CUDA).

``constrained_beam_step(log_probs, beam_scores, states, offsets, codes, num_beams)``

For user ``b``, beam ``w`` with trie state ``s = states[b, w] >= 0`` and each child node ``v`` of
``s`` (``offsets[s] <= v < offsets[s+1]``), candidate score is
``beam_scores[b, w] + log_probs[b*W + w, codes[v]]``. The best ``num_beams`` candidates per user
are kept, ordered by (score desc, ``w*K + code`` asc). Only valid children are ever candidates:
a beam without children contributes nothing (it dies), never an unconstrained expansion.
Missing slots are padded with score ``-inf`` and parent/token/state ``-1``.

Returns ``(scores [B, num_beams] float32, parent [B, num_beams] int64 (beam index within the
user), token [B, num_beams] int64 (code of this level), state [B, num_beams] int64 (child node))``.

Example:
    >>> import torch
    >>> from recbase import ConceptTrie
    >>> from recbase.ops import constrained_beam_step
    >>> trie = ConceptTrie(torch.tensor([[0, 1], [0, 2], [3, 0]]), codebook_size=4)
    >>> t = trie.tensors()
    >>> lp = torch.log_softmax(torch.tensor([[0.0, 5.0, 1.0, 4.0]]), -1)
    >>> s, parent, token, state = constrained_beam_step(
    ...     lp, torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), t.offsets, t.codes, 3)
    >>> token.tolist(), state.tolist()   # code 1 is not a child of the root: never chosen
    ([[3, 0, -1]], [[2, 1, -1]])
"""
from __future__ import annotations

import torch

__all__ = ["constrained_beam_step", "constrained_beam_step_reference"]


def _check_args(log_probs, beam_scores, states, offsets, codes, num_beams) -> None:
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams: expected an int >= 1, got {num_beams!r}")
    for name, t, nd in (("log_probs", log_probs, 2), ("beam_scores", beam_scores, 2),
                        ("states", states, 2), ("offsets", offsets, 1), ("codes", codes, 1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != nd:
            raise ValueError(f"{name}: expected a {nd}-d tensor, got shape {tuple(t.shape)}")
    for name, t in (("states", states), ("offsets", offsets), ("codes", codes)):
        if t.dtype != torch.long:
            raise TypeError(f"{name}: expected dtype torch.int64, got {t.dtype}")
    if not log_probs.is_floating_point() or not beam_scores.is_floating_point():
        raise TypeError("log_probs/beam_scores: expected floating point tensors")
    B, W = beam_scores.shape
    if states.shape != beam_scores.shape:
        raise ValueError(f"states: expected shape {tuple(beam_scores.shape)} (like beam_scores), "
                         f"got {tuple(states.shape)}")
    if log_probs.shape[0] != B * W:
        raise ValueError(f"log_probs: expected {B * W} rows (batch {B} x beams {W}), "
                         f"got shape {tuple(log_probs.shape)}")
    if offsets.shape[0] != codes.shape[0] + 1:
        raise ValueError(f"offsets: expected length len(codes) + 1 = {codes.shape[0] + 1}, "
                         f"got {offsets.shape[0]}")
    devs = {t.device for t in (log_probs, beam_scores, states, offsets, codes)}
    if len(devs) != 1:
        raise ValueError(f"constrained_beam_step: all tensors must be on one device, got {devs}")


def constrained_beam_step_reference(log_probs, beam_scores, states, offsets, codes, num_beams):
    """Vectorised PyTorch version (CSR gather + stable sort); runs on any device."""
    _check_args(log_probs, beam_scores, states, offsets, codes, num_beams)
    B, W = beam_scores.shape
    K = log_probs.shape[1]
    n = codes.shape[0]
    dev = log_probs.device
    if ((states < -1) | (states >= n)).any():
        raise ValueError(f"states: node ids must lie in [-1, num_nodes={n}): states from another trie?")
    live = states >= 0
    s = states.clamp(min=0)
    start = offsets[s]
    count = torch.where(live, offsets[s + 1] - start, torch.zeros_like(start))
    C = int(count.max()) if count.numel() else 0
    neg_inf = torch.tensor(float("-inf"), device=dev)
    if C == 0:
        return (torch.full((B, num_beams), float("-inf"), device=dev),
                *(torch.full((B, num_beams), -1, dtype=torch.long, device=dev) for _ in range(3)))
    j = torch.arange(C, device=dev)
    valid = j < count.unsqueeze(-1)  # [B, W, C]
    node = torch.where(valid, start.unsqueeze(-1) + j, torch.zeros_like(j))
    code = codes[node]
    if (valid & ((code < 0) | (code >= K))).any():
        raise ValueError(f"codes: child codes outside [0, K={K}) (log_probs width)")
    code = torch.where(valid, code, torch.zeros_like(code))
    lp = log_probs.float().reshape(B, W, K).gather(2, code)
    score = beam_scores.float().unsqueeze(-1) + lp
    score = torch.where(torch.isnan(score), neg_inf, score)
    score = torch.where(valid, score, neg_inf).reshape(B, W * C)
    valid = valid.reshape(B, W * C)
    # Stable sorts: by score desc, then valid first; ties keep (w, code) order.
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort((~valid).gather(1, order).to(torch.uint8), dim=1,
                                       stable=True).indices)
    take = min(num_beams, W * C)
    sel = order[:, :take]
    sel_valid = valid.gather(1, sel)
    out_score = torch.where(sel_valid, score.gather(1, sel), neg_inf)
    minus1 = torch.full_like(sel, -1)
    parent = torch.where(sel_valid, sel // C, minus1)
    token = torch.where(sel_valid, code.reshape(B, W * C).gather(1, sel), minus1)
    nxt = torch.where(sel_valid, node.reshape(B, W * C).gather(1, sel), minus1)
    if take < num_beams:
        pad = num_beams - take
        out_score = torch.cat([out_score, neg_inf.expand(B, pad)], 1)
        parent, token, nxt = (torch.cat([x, torch.full((B, pad), -1, dtype=torch.long, device=dev)], 1)
                              for x in (parent, token, nxt))
    return out_score.contiguous(), parent.contiguous(), token.contiguous(), nxt.contiguous()


def _step_cpu(log_probs, beam_scores, states, offsets, codes, num_beams):
    from recbase._native import C

    outs = C.constrained_beam_step(
        log_probs.detach().to(torch.float32).contiguous().numpy(),
        beam_scores.detach().to(torch.float32).contiguous().numpy(),
        states.detach().contiguous().numpy(), offsets.detach().contiguous().numpy(),
        codes.detach().contiguous().numpy(), num_beams)
    return tuple(torch.from_numpy(o) for o in outs)


def _step_cuda(log_probs, beam_scores, states, offsets, codes, num_beams):
    from recbase._native import C

    if not getattr(C, "cuda_compiled", False):
        return constrained_beam_step_reference(log_probs, beam_scores, states, offsets, codes,
                                               num_beams)
    B, W = beam_scores.shape
    K = log_probs.shape[1]
    lp = log_probs.detach().to(torch.float32).contiguous()
    sc = beam_scores.detach().to(torch.float32).contiguous()
    st, off, cd = states.contiguous(), offsets.contiguous(), codes.contiguous()
    dev = log_probs.device
    out_scores = torch.empty((B, num_beams), dtype=torch.float32, device=dev)
    out_parent, out_token, out_state = (torch.empty((B, num_beams), dtype=torch.long, device=dev)
                                        for _ in range(3))
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        # The kernel treats out-of-range states/codes as dead instead of reading out of bounds.
        C.constrained_beam_step_cuda(
            lp.data_ptr(), sc.data_ptr(), st.data_ptr(), off.data_ptr(), cd.data_ptr(),
            cd.shape[0], B, W, K, num_beams, out_scores.data_ptr(), out_parent.data_ptr(),
            out_token.data_ptr(), out_state.data_ptr(), stream)
    return out_scores, out_parent, out_token, out_state


def _dispatch(log_probs, beam_scores, states, offsets, codes, num_beams):
    """The one dispatch point: C++ on CPU, CUDA kernel (or reference) on CUDA, else reference."""
    if log_probs.device.type == "cpu":
        return _step_cpu(log_probs, beam_scores, states, offsets, codes, num_beams)
    if log_probs.device.type == "cuda":
        return _step_cuda(log_probs, beam_scores, states, offsets, codes, num_beams)
    return constrained_beam_step_reference(log_probs, beam_scores, states, offsets, codes, num_beams)


@torch.library.custom_op("recbase::constrained_beam_step", mutates_args=())
def _constrained_beam_step_op(log_probs: torch.Tensor, beam_scores: torch.Tensor,
                              states: torch.Tensor, offsets: torch.Tensor, codes: torch.Tensor,
                              num_beams: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                       torch.Tensor]:
    return _dispatch(log_probs, beam_scores, states, offsets, codes, num_beams)


@_constrained_beam_step_op.register_fake
def _(log_probs, beam_scores, states, offsets, codes, num_beams):
    B = beam_scores.shape[0]
    f = log_probs.new_empty((B, num_beams), dtype=torch.float32)
    i = [states.new_empty((B, num_beams), dtype=torch.long) for _ in range(3)]
    return f, i[0], i[1], i[2]


def constrained_beam_step(log_probs: torch.Tensor, beam_scores: torch.Tensor,
                          states: torch.Tensor, offsets: torch.Tensor, codes: torch.Tensor,
                          num_beams: int):
    """One trie-constrained beam step (see module docstring); dispatches by device.

    Eager calls go straight to the dispatch function (the op has no gradient, and the
    torch.library wrapper costs ~70 us per call); traced/compiled calls use the registered op.
    """
    if torch.compiler.is_compiling():
        return torch.ops.recbase.constrained_beam_step(log_probs, beam_scores, states, offsets,
                                                       codes, num_beams)
    _check_args(log_probs, beam_scores, states, offsets, codes, num_beams)
    with torch.no_grad():
        return _dispatch(log_probs, beam_scores, states, offsets, codes, num_beams)
