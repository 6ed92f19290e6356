"""Entity-aware masking (RecSysLLM): hide whole items behind MASK tokens and predict them.

    x~ = x with all L tokens of each item i in M replaced by MASK   (M: whole items, never BOS)
    loss = - sum_{i in M} sum_{l < L} log p(x_{i,l} | x~ before (i, l))   (the model's shifted next-token head)
    so item i's L codes are scored at the token before i and at i's first L-1 MASKs, from the items before i.

What this is, honestly: RecBase is a left-to-right model, so this is not BERT/GLM-style infilling.
With ``attention_mask_type="causal"`` (and also "item", whose extra within-item view shows only
MASKs) a masked item is never seen by its own predictions and items after it are never seen either:
each code of the item is predicted from the earlier items alone, without teacher forcing on the
item's earlier codes. The objective therefore trains whole-item prediction from history (the
paper's entity-level view) and robustness to MASKs in the history; it adds no right context.
:class:`recbase.train.Trainer` with ``TrainConfig(mask_rate > 0)`` adds a masked copy of every
training sequence to its batch (see ``TrainConfig``).
"""
from __future__ import annotations

import numpy as np
import torch

from recbase.model.config import BOS_ID, MASK_ID
from recbase.model.modeling import IGNORE_INDEX


def num_masked_items(num_items: int, rate: float, rng: np.random.Generator) -> int:
    """How many of ``num_items`` items to mask: rate * num_items rounded up or down at random
    (up with probability of its fractional part, so the expectation is exactly rate * num_items),
    but at least one item when there is one."""
    if num_items == 0:
        return 0
    count = int(np.floor(rate * num_items + rng.random()))
    return min(max(count, 1), num_items)


def mask_entities(seq_tokens, levels: int, rate: float, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask whole items of one sequence.

    seq_tokens: 1-D token ids, an optional BOS then items of ``levels`` tokens each; rate in (0, 1]:
    the expected fraction of items masked (see ``num_masked_items``; at least one item is masked);
    rng: a ``numpy.random.Generator`` or a seed (equal seeds give equal masks).
    Returns (input_ids, labels), int64 tensors of the same length: input_ids has every token of the
    chosen items replaced by MASK; labels holds the original tokens there and -100 elsewhere.
    """
    tokens = torch.as_tensor(seq_tokens)
    if tokens.dim() != 1 or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_tokens must be a 1-D integer sequence, got {tokens.dtype} of shape "
                         f"{tuple(tokens.shape)}")
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
        raise ValueError(f"levels must be an integer >= 1, got {levels!r}")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate must be in (0, 1], got {rate!r}")
    tokens = tokens.to(torch.int64)
    has_bos = tokens.numel() > 0 and int(tokens[0]) == BOS_ID
    body = tokens.numel() - int(has_bos)
    if body % levels:
        raise ValueError(f"seq_tokens must be an optional BOS then whole items: {body} tokens after the "
                         f"BOS is not a multiple of levels={levels}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    num_items = body // levels
    chosen = rng.choice(num_items, size=num_masked_items(num_items, rate, rng), replace=False)
    positions = int(has_bos) + torch.as_tensor(chosen, dtype=torch.int64)[:, None] * levels + torch.arange(levels)
    positions = positions.reshape(-1)
    input_ids = tokens.clone()
    input_ids[positions] = MASK_ID
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[positions] = tokens[positions]
    return input_ids, labels
