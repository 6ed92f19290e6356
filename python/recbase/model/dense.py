"""The dense item channel's score: a mixture of von Mises-Fisher kernels on the history.

The model predicts the next item's text embedding as a density, not a point: a mixture of
kernels centred on the history items' (unit) embeddings h_j, with weights w_j from the model:

    p(c) ∝ sum_j w_j exp(cos(h_j, c) / tau)      score(c) = log sum_j w_j exp(cos(h_j, c) / tau)

Large tau gives a linear score, cos(sum_j w_j h_j, c) up to a constant (a pointer, text-kNN when
w is uniform); small tau the nearest history item. It depends on the embeddings only through
inner products, so turning every embedding of a domain by one orthogonal matrix leaves it
unchanged: what the model learned on one domain reads any other.
"""
from __future__ import annotations

import torch

_FLOOR = 1e-30  # exp((cos - 1) / tau) underflows only below tau ~ 0.015; the floor keeps log finite


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def dense_kernel_scores(weights: torch.Tensor, history: torch.Tensor, candidates: torch.Tensor,
                        temperature: torch.Tensor | float) -> torch.Tensor:
    """score[p, c] = log sum_j weights[p, j] exp(cos(history[j], candidates[c]) / temperature).

    weights: [P, J] non-negative (rows summing to 1; an all-zero row scores every candidate
    log(floor)); history: [J, d] and candidates: [C, d], unit rows. Returns [P, C] float32.
    Computed as log(W @ exp((S - 1) / tau)) + 1 / tau (cos <= 1, so nothing overflows).
    """
    sim = history.float() @ candidates.float().T
    tau = torch.as_tensor(temperature, dtype=torch.float32, device=sim.device)
    kernel = torch.exp((sim - 1.0) / tau)
    return torch.log(weights.float() @ kernel + _FLOOR) + 1.0 / tau


def dense_user_scores(weights: torch.Tensor, history: torch.Tensor, candidates: torch.Tensor,
                      temperature: torch.Tensor | float) -> torch.Tensor:
    """Per user: score[b, c] = log sum_m weights[b, m] exp(cos(history[b, m], candidates[c]) / tau).

    weights: [B, M] (zero on padding); history: [B, M, d] unit rows; candidates: [C, d] unit rows.
    The same as :func:`dense_kernel_scores` with a block-diagonal weight matrix, at B x M x C
    instead of B x (B*M) x C operations for the mixing. Returns [B, C] float32.
    """
    b, m, d = history.shape
    sim = (history.reshape(b * m, d).float() @ candidates.float().T).view(b, m, -1)
    tau = torch.as_tensor(temperature, dtype=torch.float32, device=sim.device)
    kernel = torch.exp((sim - 1.0) / tau)
    return torch.log((weights.float()[:, :, None] * kernel).sum(1) + _FLOOR) + 1.0 / tau


def dense_top_n(weights: torch.Tensor, history: torch.Tensor, catalog: torch.Tensor, temperature: float,
                n: int, banned: list | None = None, block: int = 16384, excluded: torch.Tensor | None = None):
    """Exact top-``n`` catalog items by :func:`dense_user_scores` for B users, in blocks of the
    catalog (memory B x M x block, not B x M x N) with a running partial sort.

    weights: [B, M]; history: [B, M, d] unit rows; catalog: [N, d] unit rows; banned[b]: item
    indices never returned for user b (its history); excluded: [N] bool, items never returned
    for anyone (taken out of the catalog).
    Returns (items [B, n] int64, scores [B, n] float32), best first; -1 / -inf pad.
    """
    b, num = weights.shape[0], catalog.shape[0]
    n_eff = min(n, num)
    best_s = torch.full((b, 0), float("-inf"))
    best_i = torch.zeros((b, 0), dtype=torch.int64)
    banned_t = [torch.as_tensor(x, dtype=torch.int64) for x in banned] if banned is not None else None
    for start in range(0, num, block):
        s = dense_user_scores(weights, history, catalog[start:start + block], temperature).cpu()
        if excluded is not None:
            s[:, excluded[start:start + s.shape[1]].cpu()] = float("-inf")
        if banned_t is not None:
            for u, items in enumerate(banned_t):
                items = items[(items >= start) & (items < start + s.shape[1])] - start
                s[u, items] = float("-inf")
        top = torch.topk(s, min(n_eff, s.shape[1]), dim=1)
        best_s = torch.cat([best_s, top.values], 1)
        best_i = torch.cat([best_i, top.indices + start], 1)
        keep = torch.topk(best_s, min(n_eff, best_s.shape[1]), dim=1)
        best_s, best_i = keep.values, best_i.gather(1, keep.indices)
    items = torch.full((b, n), -1, dtype=torch.int64)
    scores = torch.full((b, n), float("-inf"))
    items[:, :best_i.shape[1]] = torch.where(torch.isfinite(best_s), best_i, -1)
    scores[:, :best_s.shape[1]] = best_s
    return items, scores


def principal_frame(embeddings) -> torch.Tensor:
    """[d, d] float64 orthogonal matrix whose columns are the principal axes of a domain's
    (centred) item embeddings, largest variance first, each signed so that the third moment of
    the projections is positive. A function of the embeddings' geometry alone: for E -> E Q
    (Q orthogonal) it returns Q^T V, so ``frame_alignment`` below is unchanged."""
    e = torch.as_tensor(embeddings, dtype=torch.float64)
    e = e - e.mean(0, keepdim=True)
    _, vecs = torch.linalg.eigh(e.T @ e)
    vecs = vecs.flip(1)
    skew = ((e @ vecs) ** 3).sum(0)
    return vecs * torch.where(skew < 0, -1.0, 1.0)[None, :]


def frame_alignment(target_embeddings, source_embeddings) -> torch.Tensor:
    """Rotation R = V_target V_source^T mapping a new domain's principal axes onto the source
    domains' (subspace alignment): ``x @ R`` reads a target vector in the source's frame. Turning
    every target embedding and codebook by one orthogonal Q leaves ``x @ R`` unchanged."""
    return principal_frame(target_embeddings) @ principal_frame(source_embeddings).T
