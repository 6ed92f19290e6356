"""RecBaseForCausalLM: Qwen2-style decoder (RMSNorm, SwiGLU, GQA) over concept-ID sequences.

Token layout of one sequence: optional BOS, then items, each item L concept tokens of levels
0..L-1 (id ``4 + l*K + c``; MASK may stand in for any of them, for masked-entity training). Each
token gets two positions (RecSysLLM "dynamic" positions): its item slot (BOS is slot 0 when present,
items follow) encoded by rotary embeddings, and its level inside the item encoded by a learned level
embedding (BOS has its own level slot L). The next token after a
level-l token is of level (l+1) mod L, so the output head and the loss are restricted to that level's
K codes (logits [*, K]), never the whole vocabulary.

Training runs on packed (jagged) batches: 1-D ``input_ids`` + ``cu_seqlens``; padded [B, T] inputs are
packed first. Generation uses a KV cache (history cached once per user and shared by its beams, generated
tokens cached per row) and the recbase generation protocol
(``start_generation`` / ``select_generation`` / ``step_generation``).

>>> import torch
>>> from recbase.model import RecBaseConfig, RecBaseForCausalLM
>>> cfg = RecBaseConfig.from_preset("tiny", levels=2, codebook_size=4)
>>> model = RecBaseForCausalLM(cfg).eval()
>>> ids = torch.tensor([[1, 4, 8, 5, 9]])          # BOS, item (0, 0), item (1, 1)
>>> out = model(ids, return_loss=True)
>>> out.loss.shape
torch.Size([])
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from recbase._atomic import atomic_files_into
from recbase.ops.attention import (
    concept_attention,
    concept_embedding,
    level_cross_entropy,
    level_logits,
    validate_jagged,
)

from .config import BOS_ID, MASK_ID, NUM_SPECIAL_TOKENS, PAD_ID, RecBaseConfig
from .dense import dense_kernel_scores, unit_rows

IGNORE_INDEX = -100


@dataclass
class RecBaseOutput(ModelOutput):
    """loss: mean restricted next-token CE over the targets (+ the weighted dense and rating
    losses); logits: restricted next-token logits ([B, T, K] for padded input, [N, K] for packed
    input; only when asked or when no loss is computed); next_levels: the level each logit row
    scores (same leading shape as logits); rating_predictions (models with ``rating_task``, given
    ``task_ids``): each RATE sequence's predicted normalised rating at its items' last tokens, NaN
    elsewhere (same shape as input_ids)."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    next_levels: Optional[torch.Tensor] = None
    hidden_states: Optional[torch.Tensor] = None
    dense_loss: Optional[torch.Tensor] = None
    rating_loss: Optional[torch.Tensor] = None
    rating_predictions: Optional[torch.Tensor] = None


@dataclass
class GenerationState:
    """KV cache of a generation: the history (prefix) is cached ONCE per user and shared by all of
    that user's rows (beams); only the tokens generated since the prefill are cached per row.

    prefix_keys/values[layer]: [B, T, Hkv, D] (user b valid up to prefix_lengths[b]);
    row_user: [R] user of each row; suffix_keys/values[layer]: [R, S, Hkv, D] (S tokens generated
    so far, the same for every row); last_item: [R] item slot of each row's last token;
    next_level: level of the next token (shared by all rows)."""

    prefix_keys: List[torch.Tensor]
    prefix_values: List[torch.Tensor]
    prefix_lengths: torch.Tensor
    row_user: torch.Tensor
    suffix_keys: List[torch.Tensor]
    suffix_values: List[torch.Tensor]
    last_item: torch.Tensor
    next_level: int
    history_weights: Optional[torch.Tensor] = None  # [B, M] dense-kernel weight of each history item

    @property
    def num_rows(self) -> int:
        return int(self.row_user.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens cached per row (history + generated)."""
        return self.prefix_lengths[self.row_user] + (self.suffix_keys[0].shape[1] if self.suffix_keys else 0)


class _RowGroups:
    """Rows grouped by user: row r is slot[r] of user row_user[r] in a padded [B, G, ...] layout, so
    each user's cached prefix is read once for all of its rows (no per-beam copy of the history)."""

    def __init__(self, row_user: torch.Tensor, num_users: int):
        counts = torch.bincount(row_user, minlength=num_users)
        order = torch.argsort(row_user, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        self.slot = torch.empty_like(row_user)
        self.slot[order] = torch.arange(row_user.numel(), device=row_user.device) - starts[row_user[order]]
        self.row_user = row_user
        self.num_users = num_users
        self.width = int(counts.max()) if row_user.numel() else 0

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros((self.num_users, self.width) + tuple(x.shape[1:]))
        out[self.row_user, self.slot] = x
        return out

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.row_user, self.slot]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [N, head_dim] of rotary angles position * theta^(-2i/d) (halves duplicated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] rotated by per-token angles (rotate-half convention)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # keep q/k in the projection dtype (autocast)
    return x * cos[:, None, :] + rot * sin[:, None, :]


class RecBaseAttention(nn.Module):
    def __init__(self, config: RecBaseConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hid = config.hidden_size
        self.q_proj = nn.Linear(hid, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hid, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hid, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hid, bias=False)

    def project(self, h, cos, sin):
        n = h.shape[0]
        q = apply_rotary(self.q_proj(h).view(n, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(h).view(n, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(h).view(n, self.num_kv_heads, self.head_dim)
        return q, k, v

    def forward(self, h, cos, sin, cu_seqlens, item_index, mask, backend, cache_out=None):
        q, k, v = self.project(h, cos, sin)
        if cache_out is not None:
            cache_out.append((k.detach(), v.detach()))
        o = concept_attention(q, k, v, cu_seqlens, item_index, mask=mask, backend=backend,
                              check_inputs=False)
        return self.o_proj(o.reshape(h.shape[0], -1))

    def decode(self, h, cos, sin, prefix_k, prefix_v, prefix_len, suffix_k, suffix_v, groups: "_RowGroups"):
        """One new token per row attending to its user's cached prefix, its own generated suffix and
        itself. Returns (output, new suffix keys, new suffix values)."""
        r = h.shape[0]
        g = self.num_heads // self.num_kv_heads
        q, k, v = self.project(h, cos, sin)
        suffix_k = torch.cat([suffix_k, k[:, None].to(suffix_k.dtype)], 1)  # [R, S+1, Hkv, D]
        suffix_v = torch.cat([suffix_v, v[:, None].to(suffix_v.dtype)], 1)
        qg = q.float().view(r, self.num_kv_heads, g, self.head_dim) / math.sqrt(self.head_dim)
        qp = groups.scatter(qg)  # [B, G, Hkv, g, D]
        s_pre = groups.gather(torch.einsum("bjkgd,btkd->bjkgt", qp, prefix_k.float()))  # [R, Hkv, g, T]
        t = prefix_k.shape[1]
        hidden_pad = torch.arange(t, device=h.device)[None, :] >= prefix_len[groups.row_user][:, None]
        s_pre = s_pre.masked_fill(hidden_pad[:, None, None, :], float("-inf"))
        s_suf = torch.einsum("rkgd,rskd->rkgs", qg, suffix_k.float())
        p = torch.softmax(torch.cat([s_pre, s_suf], -1), dim=-1)
        p_pre, p_suf = p[..., :t], p[..., t:]
        o = groups.gather(torch.einsum("bjkgt,btkd->bjkgd", groups.scatter(p_pre), prefix_v.float()))
        o = o + torch.einsum("rkgs,rskd->rkgd", p_suf, suffix_v.float())
        return self.o_proj(o.to(h.dtype).reshape(r, -1)), suffix_k, suffix_v


class RecBaseMLP(nn.Module):
    def __init__(self, config: RecBaseConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RecBaseDecoderLayer(nn.Module):
    def __init__(self, config: RecBaseConfig):
        super().__init__()
        self.self_attn = RecBaseAttention(config)
        self.mlp = RecBaseMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, cu_seqlens, item_index, mask, backend, cache_out=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cu_seqlens, item_index, mask, backend, cache_out)
        return h + self.mlp(self.post_attention_layernorm(h))

    def decode(self, h, cos, sin, *cache):
        a, sk, sv = self.self_attn.decode(self.input_layernorm(h), cos, sin, *cache)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), sk, sv


class RecBasePreTrainedModel(PreTrainedModel):
    config_class = RecBaseConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["RecBaseDecoderLayer"]
    supports_gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict: bool = True, **kwargs):
        """HuggingFace's ``from_pretrained``, strict by default: a missing, unexpected or
        wrongly-shaped tensor (a config that does not match its weights) raises ``ValueError``
        naming the tensors, where HuggingFace would warn and leave random weights in place.
        ``strict=False`` gives HuggingFace's behaviour."""
        want_info = kwargs.pop("output_loading_info", False)
        if strict:  # let HF report shape mismatches in the loading info, raised below as one error
            kwargs.setdefault("ignore_mismatched_sizes", True)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args,
                                              output_loading_info=True, **kwargs)
        if strict:
            def names(key):
                return sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
            problems = [f"{label} {names(key)[:5]}"
                        for key, label in (("missing_keys", "missing tensors"),
                                           ("unexpected_keys", "unexpected tensors"),
                                           ("mismatched_keys", "tensors whose shape differs from the config"),
                                           ("error_msgs", "errors"))
                        if info.get(key)]
            if problems:
                raise ValueError(f"{pretrained_model_name_or_path}: the saved weights do not match "
                                 f"config.json: {'; '.join(problems)} (strict=False loads anyway)")
        return (model, info) if want_info else model

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


def _project(project: nn.Module, vectors: torch.Tensor, mode) -> torch.Tensor:
    """project(vectors), or project(vectors @ rotation) under ``content_only(rotation)``."""
    rotation = None if mode is None else mode[0]
    if rotation is None:
        return project(vectors)
    if type(project) is nn.Linear and project.bias is None:
        # project(v R) = v (W R^T)^T: turning the [H, d] weight costs H*d*d, the [L*K, d] vectors L*K*d*d
        return F.linear(vectors, project.weight @ rotation.T)
    return project(vectors @ rotation)  # e.g. a wrapped (adapted) projection


def _with_content(free: torch.Tensor, project: nn.Module, vectors: torch.Tensor, mode) -> torch.Tensor:
    """Concept rows: free + project(vectors); under ``content_only`` project(vectors @ rotation)
    alone (``0 * free`` keeps the free rows in the graph, so DDP sees every parameter used)."""
    if mode is None:
        return free + project(vectors)
    return _project(project, vectors, mode) + 0.0 * free


class RecBaseModel(RecBasePreTrainedModel):
    """The decoder stack: concept embedding (token + level [+ item slot]) -> layers -> RMSNorm."""

    def __init__(self, config: RecBaseConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_levels = nn.Embedding(config.levels + 1, config.hidden_size)  # slot L: BOS
        self.embed_items = (nn.Embedding(config.max_items + 1, config.hidden_size)
                            if config.item_position_embedding else None)
        d = config.concept_vector_dim
        if d:  # content of each concept (e.g. its codebook vector), projected into the model
            self.register_buffer("concept_vectors", torch.zeros(config.levels * config.codebook_size, d))
            self.concept_in = nn.Linear(d, config.hidden_size, bias=False)
        else:
            self.concept_vectors, self.concept_in = None, None
        # dense item channel: an item's full text embedding, projected, on its last token
        self.item_in = (nn.Linear(config.item_vector_dim, config.hidden_size, bias=False)
                        if config.item_vector_dim else None)
        self.content_mode: tuple | None = None  # set by RecBaseForCausalLM.content_only
        # rating task: the RATE task token (BOS + a learned task vector) and the previous item's
        # rating, read on each item's first token of a RATE sequence
        if config.rating_task:
            self.rating_start = nn.Parameter(torch.zeros(config.hidden_size))
            self.rating_in = nn.Linear(1, config.hidden_size)
        else:
            self.rating_start, self.rating_in = None, None
        self.layers = nn.ModuleList(RecBaseDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def token_embedding_weight(self) -> torch.Tensor:
        """[vocab, H] input embedding of every token (free rows + projected concept content)."""
        w = self.embed_tokens.weight
        if self.concept_in is None:
            return w
        return torch.cat([w[:NUM_SPECIAL_TOKENS], _with_content(w[NUM_SPECIAL_TOKENS:], self.concept_in,
                                                               self.concept_vectors, self.content_mode)])

    def embed(self, ids, level, item, backend):
        iw = None if self.embed_items is None else self.embed_items.weight
        return concept_embedding(ids, level, self.token_embedding_weight(), self.embed_levels.weight,
                                 item_ids=item if iw is not None else None, item_weight=iw, backend=backend)

    def rotary(self, item, dtype):
        return rotary_cos_sin(item, self.config.head_dim, self.config.rope_theta, dtype)

    def forward(self, ids, cu_seqlens, item, level, backend, cache_out=None, item_vectors=None,
                rating_inputs=None):
        h = self.embed(ids, level, item, backend)
        if item_vectors is not None and self.item_in is not None:
            h = h + _project(self.item_in, item_vectors.to(h.dtype), self.content_mode).to(h.dtype)
        if rating_inputs is not None:  # (RATE task-token mask [N], previous item's rating [N], NaN = none)
            start, prev = rating_inputs
            h = h + start[:, None].to(h.dtype) * self.rating_start.to(h.dtype)
            known = ~torch.isnan(prev)
            h = h + known[:, None].to(h.dtype) * self.rating_in(prev.nan_to_num(0.0)[:, None].to(h.dtype))
        cos, sin = self.rotary(item, h.dtype)
        mask = self.config.attention_mask_type
        for layer in self.layers:
            h = layer(h, cos, sin, cu_seqlens, item, mask, backend, cache_out)
        return self.norm(h)


class RecBaseForCausalLM(RecBasePreTrainedModel):
    """Decoder + level-restricted output head. See the module docstring for the token layout."""

    def __init__(self, config: RecBaseConfig):
        super().__init__(config)
        self.model = RecBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.concept_out = (nn.Linear(config.concept_vector_dim, config.hidden_size, bias=False)
                            if config.concept_vector_dim else None)
        if config.item_vector_dim:  # dense head: attention of the last position over the history items
            self.dense_query = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
            self.dense_key = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
            self.dense_log_temperature = nn.Parameter(torch.tensor(math.log(0.1)))
        else:
            self.dense_query = self.dense_key = self.dense_log_temperature = None
        self.rating_head = nn.Linear(config.hidden_size, 1) if config.rating_task else None
        self.post_init()

    @torch.no_grad()
    def set_concept_vectors(self, vectors) -> None:
        """Attach content vectors to the concept tokens: (L', K, dim) with L' <= levels (e.g. the
        tokenizer's codebooks; levels beyond L' -- such as the disambiguation level -- get zeros)."""
        cfg = self.config
        if not cfg.concept_vector_dim:
            raise ValueError("set_concept_vectors needs a model built with concept_vector_dim > 0")
        v = torch.as_tensor(vectors, dtype=torch.float32)
        if v.dim() != 3 or v.shape[0] > cfg.levels or v.shape[1] != cfg.codebook_size \
                or v.shape[2] != cfg.concept_vector_dim:
            raise ValueError(f"vectors: expected shape (<= {cfg.levels}, {cfg.codebook_size}, "
                             f"{cfg.concept_vector_dim}), got {tuple(v.shape)}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError("vectors: contains NaN or inf")
        buf = self.model.concept_vectors
        buf.zero_()
        buf[:v.shape[0] * cfg.codebook_size] = v.reshape(-1, v.shape[2]).to(buf.device)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """HuggingFace's ``save_pretrained``, with every file written aside and moved into
        ``save_directory`` whole (config last): a crash never leaves a truncated weights file."""
        with atomic_files_into(save_directory) as tmp:
            super().save_pretrained(tmp, *args, **kwargs)

    # ------------------------------------------------------------------ layout
    @property
    def backend(self) -> str:
        return self.config.kernel_backend

    def _concept_head(self) -> torch.Tensor:
        """Output-head rows of the concept tokens, [L*K, H] (level-major)."""
        w = self.lm_head.weight[NUM_SPECIAL_TOKENS:]
        if self.concept_out is None:
            return w
        return _with_content(w, self.concept_out, self.model.concept_vectors, self.model.content_mode)

    @contextmanager
    def content_only(self, rotation: torch.Tensor | None = None):
        """Within this block each concept token is its projected content vector alone (the free
        per-token rows drop out), optionally turned by an orthogonal ``rotation`` [dim, dim].

        This is how the model reads a domain it never trained on: there a concept's free row
        holds another domain's statistics, its content is all that carries over. Training steps
        under random rotations (``TrainConfig.content_rotation_rate``) teach the model exactly
        this mode: with the content space turned at random it cannot memorise where concepts lie
        and learns how a history's concepts relate to the next one's instead.
        """
        cfg = self.config
        if not cfg.concept_vector_dim:
            raise ValueError("content_only needs a model built with concept_vector_dim > 0")
        if rotation is not None:
            d = cfg.concept_vector_dim
            rotation = torch.as_tensor(rotation)
            if rotation.shape != (d, d) or not rotation.is_floating_point():
                raise ValueError(f"rotation: expected a float ({d}, {d}) matrix, got "
                                 f"{rotation.dtype} {tuple(rotation.shape)}")
            rotation = rotation.to(self.model.concept_vectors)
        previous = self.model.content_mode
        self.model.content_mode = (rotation,)
        try:
            yield self
        finally:
            self.model.content_mode = previous

    def sequence_layout(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor):
        """Validate a packed batch and derive (item slot, level, next level) per token.

        Level of a token = its position after the optional BOS modulo L; item slot = position // L
        (+1 when the sequence starts with BOS, whose slot is 0 and level slot L). A MASK token may
        stand in for any concept token (see ``recbase.masking``)."""
        cfg = self.config
        L, K = cfg.levels, cfg.codebook_size
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        n = input_ids.shape[0]
        validate_jagged(cu_seqlens, n)
        ids = input_ids.to(torch.int64)
        cu = cu_seqlens.to(device=ids.device, dtype=torch.int64)
        lens = cu[1:] - cu[:-1]
        seq = torch.repeat_interleave(torch.arange(lens.numel(), device=ids.device), lens, output_size=n)
        pos = torch.arange(n, device=ids.device) - cu[seq]
        if n == 0:
            z = ids.new_zeros(0)
            return z, z, z, seq
        if bool(((ids < 0) | (ids >= cfg.vocab_size)).any()):
            bad = ids[(ids < 0) | (ids >= cfg.vocab_size)][0]
            raise ValueError(f"input_ids contains token {int(bad)} outside the vocabulary [0, {cfg.vocab_size})")
        is_bos = ids == BOS_ID
        if bool((is_bos & (pos > 0)).any()):
            t = int((is_bos & (pos > 0)).nonzero()[0])
            raise ValueError(f"BOS (id {BOS_ID}) may only start a sequence; found at position {int(pos[t])} "
                             f"of sequence {int(seq[t])}")
        first = torch.clamp(cu[:-1], max=max(n - 1, 0))
        has_bos = (lens > 0) & is_bos[first]
        off = pos - has_bos[seq].long()
        too_long = (lens - has_bos.long()) > cfg.max_items * L
        if bool(too_long.any()):
            b = int(too_long.nonzero()[0])
            raise ValueError(f"sequence {b} has {int(lens[b])} tokens; at most max_items*levels "
                             f"(+1 BOS) = {cfg.max_tokens} allowed")
        level = torch.where(is_bos, torch.full_like(off, L), off.clamp_min(0) % L)
        item = torch.where(is_bos, torch.zeros_like(off), off.clamp_min(0) // L + has_bos[seq].long())
        # MASK stands for a hidden concept token (masked-entity training): it takes the level of
        # its position, like the token it replaces
        concept = ~is_bos & (ids != MASK_ID)
        expected_lo = NUM_SPECIAL_TOKENS + level * K
        wrong = concept & ((ids < expected_lo) | (ids >= expected_lo + K))
        if bool(wrong.any()):
            t = int(wrong.nonzero()[0])
            tok = int(ids[t])
            what = (f"special token {tok}" if tok < NUM_SPECIAL_TOKENS
                    else f"token {tok} of level {(tok - NUM_SPECIAL_TOKENS) // K}")
            raise ValueError(f"sequence {int(seq[t])} position {int(pos[t])}: expected a level-{int(level[t])} "
                             f"concept token (ids [{int(expected_lo[t])}, {int(expected_lo[t]) + K})), got "
                             f"{what}; items must be L={L} consecutive tokens of levels 0..L-1")
        next_level = torch.where(is_bos, torch.zeros_like(level), (level + 1) % L)
        return item, level, next_level, seq

    def _pack(self, input_ids, attention_mask):
        if input_ids.dim() != 2:
            raise ValueError(f"padded input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = input_ids != PAD_ID
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        keep = attention_mask.bool()
        lens = keep.sum(1)
        # each row's tokens must be one contiguous run (left or right padding), else items break up
        t = keep.shape[1]
        first = keep.to(torch.int8).argmax(1)
        last = t - 1 - keep.flip(1).to(torch.int8).argmax(1)
        holes = (lens > 0) & (last - first + 1 != lens)
        if bool(holes.any()):
            raise ValueError(f"attention_mask row {int(holes.nonzero()[0])} is not one contiguous run of ones "
                             "(only left or right padding is supported)")
        cu = torch.zeros(input_ids.shape[0] + 1, dtype=torch.int64, device=input_ids.device)
        cu[1:] = lens.cumsum(0)
        return input_ids[keep], cu, keep

    # ------------------------------------------------------------------ training / scoring
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                return_loss: Optional[bool] = None, output_logits: Optional[bool] = None,
                output_hidden_states: bool = False, return_dict: bool = True,
                item_vectors: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None,
                ratings: Optional[torch.Tensor] = None, **kwargs) -> RecBaseOutput:
        """Next-token scoring restricted to the next level's codes.

        input_ids: padded [B, T] (+ attention_mask, default ``input_ids != PAD``) or packed [N] with
        ``cu_seqlens`` [B+1]. labels: same shape as input_ids (unshifted, -100 = ignore; default the
        inputs when ``return_loss``); the target of position t is labels[t+1] within its sequence.
        item_vectors (models with ``item_vector_dim``): the text embedding of each token's item,
        [B, T, d] or [N, d] like input_ids (read at each item's last token only). With a loss, the
        dense alignment loss is added (``dense_loss_weight``; also returned as ``dense_loss``).
        task_ids (models with ``rating_task``): [B] per sequence, 0 = next item (BOS), 1 = rating
        (RATE: the sequence must start with BOS, whose slot becomes the RATE task token); ratings:
        like input_ids, each token's item's rating normalised to [-1, 1] (read at the item's last
        token; NaN = unknown, and NaN in every next-item sequence). With a loss, ``rating_loss_weight``
        x the rating MSE over the RATE sequences' rated items is added (also ``rating_loss``).
        Returns RecBaseOutput(loss, logits, next_levels, dense_loss, rating_loss, rating_predictions).
        """
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        padded = cu_seqlens is None
        if padded:
            ids, cu, keep = self._pack(input_ids, attention_mask)
        else:
            if input_ids.dim() != 1:
                raise ValueError(f"with cu_seqlens, input_ids must be packed 1-D, got shape {tuple(input_ids.shape)}")
            if attention_mask is not None:
                raise ValueError("attention_mask is only for padded input; packed input uses cu_seqlens")
            ids, cu, keep = input_ids, cu_seqlens.to(input_ids.device), None
        item, level, next_level, seq = self.sequence_layout(ids, cu)
        ids = ids.to(torch.int64)
        cu32 = cu.to(torch.int32)
        vectors = None
        if item_vectors is not None:
            vectors = self._check_item_vectors(item_vectors, tuple(input_ids.shape))
            vectors = (vectors[keep] if padded else vectors).to(ids.device)
        rating = self._rating_layout(task_ids, ratings, ids, level, seq, cu.numel() - 1, tuple(input_ids.shape), keep)
        h = self.model(ids, cu32, item, level, self.backend, item_vectors=self._at_item_ends(vectors, ids, level),
                       rating_inputs=None if rating is None else rating[:2])
        rating_loss = rating_pred = None
        if rating is not None:
            _, _, rating_target, rating_end = rating
            head_out = self.rating_head(h[rating_end]).squeeze(-1).float()
            rating_pred = torch.full((ids.shape[0],), float("nan"), device=h.device)
            rating_pred[rating_end] = head_out

        want_loss = labels is not None or bool(return_loss)
        loss = dense_loss = None
        if want_loss:
            if labels is None:
                tgt_tokens = ids
            else:
                if labels.shape != input_ids.shape:
                    raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
                tgt_tokens = labels[keep] if padded else labels
                tgt_tokens = tgt_tokens.to(device=ids.device, dtype=torch.int64)
            target = self._targets(tgt_tokens, next_level, seq)
            losses = level_cross_entropy(h, self._concept_head(), next_level, target,
                                         self.config.levels, backend=self.backend)
            count = (target >= 0).sum()
            loss = losses.sum() / count.clamp_min(1)
            if vectors is not None:
                dense_loss = self._dense_loss(h, ids, level, seq, target, vectors)
                loss = loss + self.config.dense_loss_weight * dense_loss
            if rating is not None:
                truth = rating_target[rating_end]
                rated = ~torch.isnan(truth)
                # without a rated item the loss still touches the head (and the RATE inputs did), so
                # every rating parameter takes part in each step (DDP needs that)
                rating_loss = (((head_out[rated] - truth[rated]) ** 2).mean() if bool(rated.any())
                               else head_out.sum() * 0.0)
                loss = loss + self.config.rating_loss_weight * rating_loss
        logits = None
        if output_logits or (output_logits is None and not want_loss):
            logits = level_logits(h, self._concept_head(), next_level, self.config.levels)
            if padded:
                b, t = input_ids.shape
                full = logits.new_zeros((b, t, logits.shape[1]))
                full[keep] = logits
                logits = full
                nl = next_level.new_full((b, t), -1)
                nl[keep] = next_level
                next_level = nl
        if rating_pred is not None and padded:
            full_pred = rating_pred.new_full(tuple(input_ids.shape), float("nan"))
            full_pred[keep] = rating_pred
            rating_pred = full_pred
        out = RecBaseOutput(loss=loss, logits=logits, next_levels=next_level if logits is not None else None,
                            hidden_states=h if output_hidden_states else None, dense_loss=dense_loss,
                            rating_loss=rating_loss, rating_predictions=rating_pred)
        return out if return_dict else out.to_tuple()

    # ------------------------------------------------------------------ rating task
    def _rating_layout(self, task_ids, ratings, ids, level, seq, n_seq, shape, keep):
        """None without task_ids/ratings, else (RATE task-token mask, previous item's rating,
        rating target, rating positions) per packed token: a RATE sequence's item rating is its
        last token's target and the next item's first token's input (never its own item's)."""
        if task_ids is None and ratings is None:
            return None
        if not self.config.rating_task:
            raise ValueError("task_ids / ratings need a model built with rating_task=True")
        dev = ids.device
        task = torch.zeros(n_seq, dtype=torch.int64, device=dev)
        if task_ids is not None:
            task_ids = torch.as_tensor(task_ids)
            if task_ids.dim() != 1 or task_ids.dtype not in (torch.int32, torch.int64, torch.bool):
                raise ValueError(f"task_ids: expected a 1-D integer tensor (one task per sequence), got "
                                 f"{task_ids.dtype} {tuple(task_ids.shape)}")
            if task_ids.numel() != n_seq:
                raise ValueError(f"task_ids: expected one task per sequence ({n_seq}), got {task_ids.numel()}")
            if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) > 1):
                raise ValueError(f"task_ids: expected 0 (next item) or 1 (rating), got values in "
                                 f"[{int(task_ids.min())}, {int(task_ids.max())}]")
            task = task_ids.to(device=dev, dtype=torch.int64)
        in_rating = task[seq] == 1
        r = torch.full((ids.shape[0],), float("nan"), device=dev)
        if ratings is not None:
            ratings = torch.as_tensor(ratings)
            if not ratings.is_floating_point() or tuple(ratings.shape) != shape:
                raise ValueError(f"ratings: expected a float tensor shaped like input_ids {shape}, got "
                                 f"{ratings.dtype} {tuple(ratings.shape)}")
            r = (ratings[keep.to(ratings.device)] if len(shape) == 2 else ratings).to(device=dev, dtype=torch.float32)
            known = ~torch.isnan(r)
            if bool((known & (r.abs() > 1 + 1e-6)).any()) or bool(torch.isinf(r).any()):
                raise ValueError("ratings: normalised ratings must lie in [-1, 1] (NaN = unknown); map a "
                                 "domain's scale with recbase.recommend.normalise_ratings")
            if bool((known & ~in_rating).any()):
                raise ValueError("ratings: a next-item sequence (task 0) holds ratings; only RATE "
                                 "sequences (task_ids 1) read them")
        pos_first = torch.zeros_like(in_rating)
        if seq.numel():
            pos_first[0] = True
            pos_first[1:] = seq[1:] != seq[:-1]
        start = in_rating & pos_first
        if bool((start & (ids != BOS_ID)).any()):
            raise ValueError("task_ids: a RATE sequence must start with BOS (its slot holds the task token)")
        end = in_rating & (level == self.config.levels - 1) & (ids >= NUM_SPECIAL_TOKENS)
        target = torch.where(end, r, torch.full_like(r, float("nan")))
        prev = torch.full_like(r, float("nan"))
        e = end.nonzero().squeeze(1)
        e = e[e + 1 < ids.shape[0]]
        e = e[seq[e + 1] == seq[e]]
        prev[e + 1] = r[e]
        return start, prev, target, end

    # ------------------------------------------------------------------ dense item channel
    def _check_item_vectors(self, vectors, shape) -> torch.Tensor:
        d = self.config.item_vector_dim
        if not d:
            raise ValueError("item_vectors needs a model built with item_vector_dim > 0")
        vectors = torch.as_tensor(vectors)
        if not vectors.is_floating_point() or tuple(vectors.shape) != tuple(shape) + (d,):
            raise ValueError(f"item_vectors: expected a float tensor of shape {tuple(shape) + (d,)} "
                             f"(input_ids' shape + item_vector_dim), got {vectors.dtype} {tuple(vectors.shape)}")
        if not bool(torch.isfinite(vectors).all()):
            raise ValueError("item_vectors: contains NaN or inf")
        return vectors.float()

    def _at_item_ends(self, vectors, ids, level):
        """Item vectors kept on each item's last token only, so no token sees its own item's
        embedding before its codes are predicted."""
        if vectors is None:
            return None
        end = (level == self.config.levels - 1) & (ids >= NUM_SPECIAL_TOKENS)
        return vectors * end[:, None].to(vectors.dtype)

    def item_keys(self, ids: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """One integer per item (its concept tuple, sum_l code_l K^l), for the items ending at
        packed positions ``ends``; -1 for an item with a MASK token."""
        L, K = self.config.levels, self.config.codebook_size
        toks = ids[ends[:, None] - torch.arange(L - 1, -1, -1, device=ids.device)[None, :]]  # [P, L]
        codes = toks - NUM_SPECIAL_TOKENS - torch.arange(L, device=ids.device)[None, :] * K
        key = (codes * (K ** torch.arange(L, device=ids.device))[None, :]).sum(1)
        return torch.where((toks == MASK_ID).any(1), torch.full_like(key, -1), key)

    def dense_temperature(self) -> torch.Tensor:
        return self.dense_log_temperature.exp().clamp_min(0.02)  # a sharper kernel underflows

    def _history_weights(self, h, query_pos, query_seq, ends, end_seq) -> torch.Tensor:
        """[Q, P] softmax weights of each query position over the items that end at or before it
        in its own sequence (rows without such an item are all zero)."""
        q = self.dense_query(h[query_pos]).float()
        k = self.dense_key(h[ends]).float()
        logits = q @ k.T / math.sqrt(q.shape[1])
        allowed = (end_seq[None, :] == query_seq[:, None]) & (ends[None, :] <= query_pos[:, None])
        w = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=1)
        # rows without any item are all -inf (NaN after softmax): zero; a NaN elsewhere (a broken
        # model) stays NaN, so the Recommender refuses it instead of ranking by garbage
        w = torch.where(allowed.any(1, keepdim=True), w, torch.zeros_like(w))
        return w.masked_fill(~allowed, 0.0), allowed

    def _dense_loss(self, h, ids, level, seq, target, vectors) -> torch.Tensor:
        """In-batch softmax of the next item's dense score against every other item of the batch
        (the user's own history items excluded, as at recommendation time)."""
        if self.dense_query is None:
            raise ValueError("item_vectors given but the model has no dense head (item_vector_dim=0)")
        ends = ((level == self.config.levels - 1) & (ids >= NUM_SPECIAL_TOKENS)).nonzero().squeeze(1)
        zero = h.sum() * 0.0
        if ends.numel() < 2:
            return zero
        end_seq, keys = seq[ends], self.item_keys(ids, ends)
        nxt = torch.arange(1, ends.numel(), device=ends.device)
        trans = torch.zeros(ends.numel(), dtype=torch.bool, device=ends.device)
        trans[:-1] = (end_seq[nxt] == end_seq[:-1]) & (target[ends[:-1]] >= 0) & (keys[nxt] >= 0) & (keys[:-1] >= 0)
        if not bool(trans.any()):
            return zero
        valid_keys = keys >= 0
        cand_keys, inverse = torch.unique(keys[valid_keys], return_inverse=True)
        unit = unit_rows(vectors[ends])
        cand = unit.new_zeros((cand_keys.numel(), unit.shape[1]))
        cand[inverse] = unit[valid_keys]
        member = torch.full_like(keys, -1)
        member[valid_keys] = inverse
        rows = trans.nonzero().squeeze(1)
        weights, allowed = self._history_weights(h, ends[rows], end_seq[rows], ends, end_seq)  # [T, P]
        scores = dense_kernel_scores(weights, unit, cand, self.dense_temperature())  # [T, C]
        onehot = F.one_hot(member.clamp_min(0), cand_keys.numel()).float() * valid_keys[:, None]
        seen = allowed.float() @ onehot > 0  # a candidate the user already has
        tgt = member[rows + 1]
        keep = ~seen.gather(1, tgt[:, None]).squeeze(1)  # a repeat of a history item: no target
        if not bool(keep.any()):
            return zero
        scores = scores.masked_fill(seen, float("-inf"))
        return F.cross_entropy(scores[keep], tgt[keep])

    def _targets(self, tokens: torch.Tensor, next_level: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """Code of the next token at every position (-100 at sequence ends / ignored labels)."""
        K = self.config.codebook_size
        n = tokens.shape[0]
        target = torch.full((n,), IGNORE_INDEX, dtype=torch.int64, device=tokens.device)
        if n < 2:
            return target
        nxt = tokens[1:]
        same = seq[1:] == seq[:-1]
        ignored = nxt == IGNORE_INDEX
        code = nxt - NUM_SPECIAL_TOKENS - next_level[:-1] * K
        bad = same & ~ignored & ((code < 0) | (code >= K))
        if bool(bad.any()):
            t = int(bad.nonzero()[0]) + 1
            raise ValueError(f"label {int(tokens[t])} at packed position {t} is not a level-"
                             f"{int(next_level[t - 1])} concept token")
        target[:-1] = torch.where(same & ~ignored, code, torch.full_like(code, IGNORE_INDEX))
        return target

    # ------------------------------------------------------------------ generation protocol
    def _check_generation_ready(self):
        if self.config.attention_mask_type != "causal":
            raise NotImplementedError("KV-cache generation needs attention_mask_type='causal' (with 'item' "
                                      "masks earlier tokens of an item would see later ones)")

    def _log_probs(self, h: torch.Tensor, level: int) -> torch.Tensor:
        L, K = self.config.levels, self.config.codebook_size
        w = self._concept_head().view(L, K, -1)[level]
        return torch.log_softmax((h @ w.T).float(), dim=-1)

    @torch.no_grad()
    def start_generation(self, histories: Sequence[torch.Tensor], truncate: bool = True,
                         item_vectors: Optional[Sequence[torch.Tensor]] = None):
        """Prefill each history once. histories: list of B 1-D LongTensors (item-aligned concept
        tokens, optionally BOS first; an empty history is read as [BOS]), or a padded [B, T] tensor
        (PAD=0 entries dropped). With ``truncate`` a history longer than max_items - 1 items keeps
        its most recent items (and its BOS), leaving room for one generated item; otherwise it raises.
        item_vectors (models with a dense channel): per history a [n_items, d] tensor, the text
        embeddings of its items (truncated with it); the state then holds ``history_weights``
        [B, M], the dense kernel's weight on each of the (kept) history items, oldest first.
        Returns (state, log_probs [B, K] float32 over level-0 codes of the next item)."""
        self._check_generation_ready()
        L = self.config.levels
        if isinstance(histories, torch.Tensor):
            if histories.dim() != 2:
                raise ValueError(f"a histories tensor must be padded [B, T], got shape {tuple(histories.shape)}")
            histories = [row[row != PAD_ID] for row in histories]
        if len(histories) == 0:
            raise ValueError("histories must hold at least one history")
        dev = self.lm_head.weight.device
        if item_vectors is not None and len(item_vectors) != len(histories):
            raise ValueError(f"item_vectors: expected one [n_items, d] tensor per history ({len(histories)}), "
                             f"got {len(item_vectors)}")
        seqs, vecs = [], []
        for i, hist in enumerate(histories):
            hist = torch.as_tensor(hist)
            if hist.dim() != 1:
                raise ValueError(f"history {i} must be 1-D, got shape {tuple(hist.shape)}")
            if hist.numel() == 0:
                hist = torch.tensor([BOS_ID])
            has_bos = int(hist[0]) == BOS_ID
            if (hist.numel() - int(has_bos)) % L:
                raise ValueError(f"history {i} must be item-aligned: {hist.numel() - int(has_bos)} concept "
                                 f"tokens is not a multiple of levels={L}")
            keep_tokens = (self.config.max_items - 1) * L
            if item_vectors is not None:
                n_items = (hist.numel() - int(has_bos)) // L
                v = self._check_item_vectors(item_vectors[i], (n_items,))
                vecs.append(v[n_items - min(n_items, keep_tokens // L if truncate else n_items):])
            if truncate and hist.numel() - int(has_bos) > keep_tokens:
                tail = hist[hist.numel() - keep_tokens:] if keep_tokens else hist[:0]
                hist = torch.cat([hist[:1], tail]) if has_bos else tail
                if hist.numel() == 0:
                    hist = torch.tensor([BOS_ID])
            seqs.append(hist.to(device=dev, dtype=torch.int64))
        lens = torch.tensor([s.numel() for s in seqs], device=dev)
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int64, device=dev)
        cu[1:] = lens.cumsum(0)
        ids = torch.cat(seqs)
        item, level, _, seq = self.sequence_layout(ids, cu)
        per_token = None
        if item_vectors is not None:
            ends = ((level == L - 1) & (ids >= NUM_SPECIAL_TOKENS)).nonzero().squeeze(1)
            per_token = torch.zeros(ids.shape[0], self.config.item_vector_dim, device=dev)
            per_token[ends] = torch.cat(vecs).to(dev)
        layer_kv: list = []
        h = self.model(ids, cu.to(torch.int32), item, level, self.backend, cache_out=layer_kv,
                       item_vectors=per_token)
        last = cu[1:] - 1
        b = len(seqs)
        weights = None
        if item_vectors is not None and self.dense_query is not None:
            w, allowed = self._history_weights(h, last, torch.arange(b, device=dev), ends, seq[ends])
            counts = allowed.sum(1)
            width = int(counts.max()) if b else 0
            weights = torch.zeros(b, width, device=dev)
            slot = item[ends] - 1  # item slot 1.. after BOS
            has_bos = ids[cu[:-1]] == BOS_ID
            slot = slot + (~has_bos[seq[ends]]).long()
            weights[seq[ends], slot] = w[seq[ends], torch.arange(ends.numel(), device=dev)]
        t = int(lens.max())
        pos = torch.arange(ids.shape[0], device=dev) - cu[seq]
        keys, values, sk, sv = [], [], [], []
        for k, v in layer_kv:
            kc = k.new_zeros((b, t) + tuple(k.shape[1:]))
            vc = v.new_zeros((b, t) + tuple(v.shape[1:]))
            kc[seq, pos] = k
            vc[seq, pos] = v
            keys.append(kc)
            values.append(vc)
            sk.append(k.new_zeros((b, 0) + tuple(k.shape[1:])))
            sv.append(v.new_zeros((b, 0) + tuple(v.shape[1:])))
        state = GenerationState(keys, values, lens.clone(), torch.arange(b, device=dev), sk, sv,
                                item[last].clone(), 0, weights)
        return state, self._log_probs(h[last], 0)

    def select_generation(self, state: GenerationState, index: torch.Tensor) -> GenerationState:
        """Keep/repeat rows of the state (expand users to beams, reorder beams by parent)."""
        index = torch.as_tensor(index, device=state.row_user.device)
        if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"index must be a 1-D integer tensor, got {index.dtype} {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= state.num_rows):
            raise ValueError(f"index values must lie in [0, {state.num_rows}), got "
                             f"[{int(index.min())}, {int(index.max())}]")
        return GenerationState(state.prefix_keys, state.prefix_values, state.prefix_lengths,
                               state.row_user.index_select(0, index),
                               [k.index_select(0, index) for k in state.suffix_keys],
                               [v.index_select(0, index) for v in state.suffix_values],
                               state.last_item.index_select(0, index), state.next_level, state.history_weights)

    @torch.no_grad()
    def step_generation(self, state: GenerationState, codes: torch.Tensor, level: int):
        """Append one level-`level` code per row; return (state, log_probs [R, K] over the codes of
        level+1 (level 0 of the next item after the last level)). The input state is not modified."""
        self._check_generation_ready()
        L, K = self.config.levels, self.config.codebook_size
        if level != state.next_level:
            raise ValueError(f"level must be {state.next_level} (the next level of this state), got {level}")
        codes = torch.as_tensor(codes, device=state.row_user.device)
        if codes.shape != (state.num_rows,) or codes.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"codes must be an integer tensor of shape ({state.num_rows},), got "
                             f"{codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= K):
            raise ValueError(f"codes must lie in [0, {K}), got [{int(codes.min())}, {int(codes.max())}]")
        item = state.last_item + 1 if level == 0 else state.last_item
        if level == 0 and bool((item > self.config.max_items).any()):
            raise ValueError(f"generation would exceed max_items={self.config.max_items}")
        ids = NUM_SPECIAL_TOKENS + level * K + codes.to(torch.int64)
        lvl = torch.full_like(ids, level)
        inner = self.model
        h = inner.embed(ids, lvl, item, self.backend)
        cos, sin = inner.rotary(item, h.dtype)
        groups = _RowGroups(state.row_user, state.prefix_lengths.shape[0])
        new_k, new_v = [], []
        for i, layer in enumerate(inner.layers):
            h, sk, sv = layer.decode(h, cos, sin, state.prefix_keys[i], state.prefix_values[i],
                                     state.prefix_lengths, state.suffix_keys[i], state.suffix_values[i], groups)
            new_k.append(sk)
            new_v.append(sv)
        h = inner.norm(h)
        new = GenerationState(state.prefix_keys, state.prefix_values, state.prefix_lengths, state.row_user,
                              new_k, new_v, item, (level + 1) % L, state.history_weights)
        return new, self._log_probs(h, (level + 1) % L)
