"""Pretraining on concept-ID sequences of many domains.

Sequences (one per user: BOS then the concept tokens of the user's items) are packed into
jagged batches with no padding (``cu_seqlens``), trained with AdamW, linear warm-up + cosine
decay, gradient clipping and bf16 autocast on GPU. Each epoch ends with a validation loss on
the held-out next item; training stops early when it stops improving.

Checkpoints are atomic (temp file + rename) and hold everything needed to continue exactly:
model, optimizer, scheduler, RNG state, epoch and position within the epoch. The batch order
of an epoch is a pure function of ``(seed, epoch)``, so a run that is killed and restarted
ends with the same model as one that ran through.

Data parallel: run under ``torchrun`` (and ``torch.distributed.init_process_group``); each rank
trains on its shard of every packed batch and the loss is scaled by the rank's share of the
batch's target tokens, so the averaged gradient equals the single-process gradient of the whole
batch. By default every rank holds a full replica (DDP); ``TrainConfig(fsdp=True)`` shards the
parameters, gradients and AdamW state over the ranks instead (FSDP2, for models too large to
replicate, e.g. the ``large`` preset) -- the same step. Checkpoints then hold the gathered, whole
state (written by rank 0), and a sharded run resumes only a sharded run's checkpoint.

Fine-tuning: the same ``Trainer`` trains a LoRA-wrapped model (``recbase.finetune.lora_model``);
the optimizer only receives parameters that require gradients. With ``TrainConfig.mask_rate > 0``
the masked-entity objective (``recbase.masking``) is added to the next-token objective.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from recbase._atomic import atomic_file
from recbase.masking import mask_entities
from recbase.model.config import BOS_ID as BOS
from recbase.model.modeling import IGNORE_INDEX as IGNORE  # one "not a target" label everywhere
_MASK_STREAM = 0x6D61736B  # separates the masking RNG streams from other uses of the seed
_SHUFFLE_STREAM = 0x73687566  # and the item-order shuffling stream
_ROTATION_STREAM = 0x726F74  # and the content-rotation stream
_TASK_STREAM = 0x7461736B  # and the per-sequence task draws of a task mixture
TASKS = ("sequential", "rating")  # what a training sequence can ask for (RecBaseConfig.rating_task)


def random_rotation(dim: int, rng: np.random.Generator) -> torch.Tensor:
    """A Haar-random orthogonal [dim, dim] float32 matrix (QR of a Gaussian, signs fixed)."""
    # QR in torch, not numpy: numpy's BLAS threads keep spinning after the call and took the
    # cores from the training step that followed (a rotated step ran 1.5x slower on 2 cores)
    q, r = torch.linalg.qr(torch.from_numpy(rng.standard_normal((dim, dim))))
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


class ItemVectors:
    """The text embedding of every catalog item, found by its concept tokens: what the dense
    item channel (``RecBaseConfig.item_vector_dim``) reads while training.

    tokens: (N, L) concept token ids of the items (``ItemTokenizer.tokens(codes)``; the rows of
    several domains' catalogs may be stacked, IDs are unique across one tokenizer's catalogs);
    embeddings: (N, d) float, row i = item i.
    """

    def __init__(self, tokens, embeddings, codebook_size: int):
        tokens = np.asarray(tokens)
        emb = np.asarray(embeddings)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"item_vectors tokens: expected an (N, L) integer array, got {tokens.dtype} {tokens.shape}")
        if emb.ndim != 2 or emb.shape[0] != tokens.shape[0] or not np.issubdtype(emb.dtype, np.floating):
            raise ValueError(f"item_vectors embeddings: expected a float ({tokens.shape[0]}, d) array (one row per "
                             f"item of tokens), got {emb.dtype} {emb.shape}")
        if not np.isfinite(emb).all():
            raise ValueError("item_vectors embeddings: contains NaN or inf")
        K, L = int(codebook_size), tokens.shape[1]
        codes = tokens.astype(np.int64) - 4 - np.arange(L)[None, :] * K
        if len(codes) and (codes.min() < 0 or codes.max() >= K):
            raise ValueError(f"item_vectors tokens: not concept tokens of {L} levels x {K} codes")
        keys = (codes * K ** np.arange(L, dtype=np.int64)[None, :]).sum(1)
        order = np.argsort(keys, kind="stable")
        if len(keys) > 1 and (np.diff(keys[order]) == 0).any():
            raise ValueError("item_vectors tokens: two items share a concept ID (IDs must be unique)")
        self.keys = torch.from_numpy(keys[order])
        self.embeddings = torch.from_numpy(emb[order].astype(np.float32))
        self.dim = emb.shape[1]

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """[P, d] embeddings of the items with these keys (``RecBaseForCausalLM.item_keys``)."""
        pos = torch.searchsorted(self.keys, keys.cpu()).clamp_max(max(len(self.keys) - 1, 0))
        if len(self.keys) == 0 or bool((self.keys[pos] != keys.cpu()).any()):
            raise ValueError("a training sequence holds an item that is not in item_vectors")
        return self.embeddings[pos]

    def per_token(self, model, ids: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        """[N, d] item vectors of a packed batch (each item's vector on its last token)."""
        _, level, _, _ = model.sequence_layout(ids, cu)
        ends = ((level == model.config.levels - 1) & (ids >= 4)).nonzero().squeeze(1)
        out = torch.zeros(ids.shape[0], self.dim)
        out[ends.cpu()] = self.lookup(model.item_keys(ids, ends))
        return out


def _core_model(model):
    """The RecBaseForCausalLM inside a LoRA (peft) wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class TrainConfig:
    epochs: int = 10
    tokens_per_batch: int = 16384
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    patience: int = 2
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at epoch ends
    time_budget_s: float | None = None  # stop (after validating) once training took this long
    device: str = "cpu"
    progress: bool = True
    # masked-entity objective (recbase.masking): each step also trains on a copy of every sequence
    # of its batch with whole items masked at this rate (a step then holds up to twice
    # tokens_per_batch tokens; the loss is the mean over both kinds of targets). 0 = off.
    mask_rate: float = 0.0
    # zero-shot transfer (needs a model with concept_vector_dim > 0): this fraction of steps is
    # trained under ``model.content_only`` with a random rotation of the concept vectors, a pure
    # function of (seed, step). The model then cannot rely on where concepts lie, only on how a
    # history's concepts relate to the next item's -- which carries over to an unseen domain.
    content_rotation_rate: float = 0.0
    # unordered histories: this fraction of training sequences (drawn per step and sequence, a pure
    # function of (seed, step, index)) has its items read in a random order, so the model also
    # learns what to predict when order carries nothing (a domain whose order is unknown). 0 = off.
    shuffle_rate: float = 0.0
    # under torchrun with more than one process: shard parameters, gradients and optimizer state
    # over the ranks (FSDP2 ``fully_shard``, each decoder layer and the whole model) instead of a
    # full replica per rank (DDP). For models too large to replicate; the same step either way.
    fsdp: bool = False
    # the task mixture (RecSysLLM multi-task training): each training sequence is drawn, per step
    # and sequence (a pure function of seed, step, index), as a next-item sequence or -- with
    # probability tasks["rating"] / sum -- as a RATE sequence that also reads and predicts its
    # items' ratings (needs ``Trainer(ratings=...)`` and a model with ``rating_task``).
    tasks: dict = field(default_factory=lambda: {"sequential": 1.0})
    extra: dict = field(default_factory=dict)

    def rating_share(self) -> float:
        """The share of training sequences read as rating sequences (validated)."""
        t = self.tasks
        if not isinstance(t, dict) or not t or set(t) - set(TASKS):
            raise ValueError(f"tasks: expected a mixture {{task: weight}} over {list(TASKS)}, got {t!r}")
        if any(not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0 for w in t.values()) or not sum(t.values()) > 0:
            raise ValueError(f"tasks: weights must be finite, >= 0 and not all 0, got {t!r}")
        return float(t.get("rating", 0.0)) / float(sum(t.values()))


def pack_batches(lengths: Sequence[int], tokens_per_batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Greedy packing of a seeded permutation into batches of at most ``tokens_per_batch`` tokens."""
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > tokens_per_batch:
        raise ValueError(
            f"tokens_per_batch={tokens_per_batch} is smaller than the longest sequence "
            f"({int(lengths.max())} tokens)"
        )
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    batches, cur, used = [], [], 0
    for i in order:
        if used + lengths[i] > tokens_per_batch and cur:
            batches.append(np.array(cur))
            cur, used = [], 0
        cur.append(i)
        used += lengths[i]
    if cur:
        batches.append(np.array(cur))
    return batches


def collate(seqs: Sequence[torch.Tensor], target_items_only: int = 0, labels: Sequence | None = None):
    """Pack sequences: (input_ids [T], cu_seqlens [B+1] int32, labels [T]).

    ``labels`` equal the inputs (the model shifts inside each sequence) unless given (one per
    sequence, same lengths); with ``target_items_only = L`` only the last item's L tokens are
    scored (validation).
    """
    ids = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in seqs])
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    if labels is None:
        labels = ids.clone()
    else:
        if [len(x) for x in labels] != lens.tolist():
            raise ValueError("labels: need one label sequence per input sequence, of the same length")
        labels = torch.cat([torch.as_tensor(x, dtype=torch.long) for x in labels])
    if target_items_only:
        mask = torch.ones_like(ids, dtype=torch.bool)
        for end in cu[1:].tolist():
            mask[end - target_items_only:end] = False
        labels[mask] = IGNORE
    return ids, cu, labels


def item_windows(seq: np.ndarray, size: int) -> list[np.ndarray]:
    """Cut an item sequence from its end into windows of ``size`` items overlapping by one
    item, so every transition is a training target exactly once per epoch."""
    if not isinstance(size, (int, np.integer)) or size < 2:  # size 1 would never advance
        raise ValueError(f"window size (max_items) must be an int >= 2 (one history item and its next), got {size!r}")
    out, end = [], len(seq)
    while end > 1:
        start = max(0, end - size)
        out.append(seq[start:end])
        end = start + 1
    return out[::-1]


def pretraining_sequences(split, item_tokens: np.ndarray, bos: int, max_items: int,
                          recent: int | None = None, valid_users=None):
    """Token sequences (BOS + concept tokens of the items) from a leave-one-out split.

    train: the ``recent`` last training items of every user (all if None) cut into windows of
    ``max_items``; valid: for each of ``valid_users`` (all if None), the last ``max_items - 1``
    history items followed by the validation item, which the validation loss scores.
    """
    def tokens(items):
        return np.concatenate([[bos], item_tokens[np.asarray(items, dtype=np.int64)].reshape(-1)])

    train = [tokens(w) for s in split.train_sequences
             for w in item_windows(s[-recent:] if recent else s, max_items)]
    users = range(split.num_users) if valid_users is None else valid_users
    valid = [tokens(np.r_[split.valid_histories[u][-(max_items - 1):], split.valid_targets[u]])
             for u in users if len(split.valid_histories[u])]
    return train, valid


def recent_pass(model, split, item_tokens: np.ndarray, bos: int, max_items: int, valid: Sequence, *,
                epochs: int = 1, lr: float = 5e-4, tokens_per_batch: int = 2048, seed: int = 1,
                device: str = "cpu", progress: bool = True, output_dir=None,
                item_vectors: "ItemVectors | None" = None, valid_groups: dict | None = None) -> dict:
    """The closing pass of pretraining: ``epochs`` passes over every user's most recent window
    (its last ``max_items`` training items; ``split`` and ``item_tokens`` may be lists, one per domain) with the concepts read normally -- no rotated
    content-only steps -- at a low learning rate, warm-up 10 steps + cosine. Returns the
    ``Trainer`` state (``history`` holds the validation loss on ``valid``).

    Why: pretraining spreads its steps over older windows and, for zero-shot transfer, reads half
    of them by rotated content alone; the next item depends most on the latest ones. On the
    demo's ML-1M validation users one pass (184 steps, ~33 s on 2 cores) raised NDCG@10 from
    0.108 to 0.123 while the zero-shot books numbers stayed within noise (docs/results.md).
    """
    if not isinstance(epochs, (int, np.integer)) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"recent_pass: epochs must be an int >= 1, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"recent_pass: lr must be > 0, got {lr!r}")
    # several domains: a list of splits with their item tokens, every domain's latest windows
    splits, tokens = (split, item_tokens) if isinstance(split, (list, tuple)) else ([split], [item_tokens])
    if len(splits) != len(tokens):
        raise ValueError(f"recent_pass: {len(splits)} splits but {len(tokens)} item token tables")
    train = [seq for sp, tk in zip(splits, tokens)
             for seq in pretraining_sequences(sp, tk, bos, max_items, recent=max_items, valid_users=[])[0]]
    cfg = TrainConfig(epochs=epochs, tokens_per_batch=tokens_per_batch, lr=lr, warmup_steps=10, seed=seed,
                      device=device, progress=progress)
    return Trainer(model, train, valid, cfg, output_dir=output_dir, item_vectors=item_vectors,
                   valid_groups=valid_groups).fit()


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


class Trainer:
    """Pretrains (or, wrapped by ``recbase.finetune.lora_model``, fine-tunes) a
    ``RecBaseForCausalLM`` on packed concept-ID sequences.

    ``train`` and ``valid`` are lists of 1-D token-id sequences; in ``valid`` the last
    ``levels`` tokens of each sequence are the held-out item that the validation loss scores.
    ``item_vectors`` (:class:`ItemVectors`) feeds a model's dense item channel and adds its
    alignment loss (``RecBaseConfig.dense_loss_weight``); under DDP/FSDP that loss is each rank's
    own in-batch mean, weighted by its share of the concept targets.
    """

    def __init__(self, model, train: Sequence, valid: Sequence, config: TrainConfig,
                 output_dir: str | os.PathLike | None = None, item_vectors: ItemVectors | None = None,
                 valid_groups: dict | None = None, ratings: Sequence | None = None):
        if len(train) == 0:
            raise ValueError("train: no training sequences")
        self.rating_share = config.rating_share()
        self.ratings = self._check_ratings(model, train, ratings, config)
        # name -> indices into ``valid`` (e.g. one group per domain): each epoch's log record then
        # also holds ``valid_loss_by_group`` (the early-stopping loss stays the one over all of valid)
        self.valid_groups = {}
        for name, idx in (valid_groups or {}).items():
            idx = np.asarray(idx, dtype=np.int64).reshape(-1)
            if len(idx) and (idx.min() < 0 or idx.max() >= len(valid)):
                raise ValueError(f"valid_groups[{name!r}]: indices must lie in [0, {len(valid)}), got "
                                 f"[{int(idx.min())}, {int(idx.max())}]")
            self.valid_groups[str(name)] = idx
        if not 0.0 <= config.mask_rate <= 1.0:
            raise ValueError(f"mask_rate must be in [0, 1], got {config.mask_rate!r}")
        if not 0.0 <= config.content_rotation_rate <= 1.0:
            raise ValueError(f"content_rotation_rate must be in [0, 1], got {config.content_rotation_rate!r}")
        if not 0.0 <= config.shuffle_rate <= 1.0:
            raise ValueError(f"shuffle_rate must be in [0, 1], got {config.shuffle_rate!r}")
        if config.content_rotation_rate and not getattr(model.config, "concept_vector_dim", 0):
            raise ValueError("content_rotation_rate > 0 needs a model with concept vectors "
                             "(RecBaseConfig(concept_vector_dim=...) and model.set_concept_vectors)")
        if item_vectors is not None:
            dim = getattr(_core_model(model).config, "item_vector_dim", 0)
            if not isinstance(item_vectors, ItemVectors):
                raise TypeError(f"item_vectors: expected recbase.train.ItemVectors, got {type(item_vectors).__name__}")
            if item_vectors.dim != dim:
                raise ValueError(f"item_vectors: embeddings of width {item_vectors.dim}, but the model's "
                                 f"item_vector_dim is {dim}")
            if config.mask_rate:
                raise ValueError("mask_rate > 0 with item_vectors is not supported: a masked item has no "
                                 "identity to look its vector up by")
        self.item_vectors = item_vectors
        self.model = model
        self.cfg = config
        self.train_seqs = [torch.as_tensor(s, dtype=torch.long) for s in train]
        self.valid_seqs = [torch.as_tensor(s, dtype=torch.long) for s in valid]
        # targets of each training sequence: every token but the first (labels = inputs)
        self.train_targets = np.array([max(len(s) - 1, 0) for s in self.train_seqs], dtype=np.int64)
        self.levels = int(model.config.levels)
        self.output_dir = Path(output_dir) if output_dir else None
        self.device = torch.device(config.device)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.model.to(self.device)
        self.fsdp = bool(config.fsdp) and self.world > 1
        if self.fsdp:  # before the optimizer: sharding replaces the parameters by DTensor shards
            from torch.distributed.fsdp import fully_shard
            for layer in _core_model(model).model.layers:
                fully_shard(layer)
            fully_shard(model)
        # frozen parameters (the base weights under LoRA) stay out of the optimizer
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model has no parameter that requires gradients")
        decay = [p for p in trainable if p.ndim >= 2]
        no_decay = [p for p in trainable if p.ndim < 2]
        # fused: one kernel over all tensors instead of a dozen small ops per tensor (unfused,
        # AdamW took ~5 ms of a ~140 ms 2,048-token CPU step)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr,
            fused=True if self.device.type in ("cpu", "cuda") and not self.fsdp else None)
        self.ddp = None
        if self.world > 1 and not self.fsdp:
            self.ddp = torch.nn.parallel.DistributedDataParallel(model)
        lengths = [len(s) for s in self.train_seqs]
        self.steps_per_epoch = len(pack_batches(lengths, config.tokens_per_batch, config.seed, 0))
        self.total_steps = self.steps_per_epoch * config.epochs
        self.state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": float("inf"),
                      "bad_epochs": 0, "history": [], "done": False}
        self._fingerprint = self.fingerprint()

    @staticmethod
    def _check_ratings(model, train, ratings, config):
        """Per training sequence, its items' normalised ratings as a per-token float tensor (NaN on
        BOS and unrated items), or None when no sequence is drawn as a rating sequence."""
        share = config.rating_share()
        if ratings is None:
            if share:
                raise ValueError(f"tasks {config.tasks}: a rating share needs Trainer(ratings=...), one array of "
                                 "normalised item ratings per training sequence")
            return None
        if not share:
            raise ValueError("ratings given, but TrainConfig.tasks has no 'rating' share: they would never be read")
        if not getattr(_core_model(model).config, "rating_task", False):
            raise ValueError("tasks with a 'rating' share need a model built with RecBaseConfig(rating_task=True)")
        if config.mask_rate or config.shuffle_rate:
            raise ValueError("the rating task with mask_rate or shuffle_rate > 0 is not supported (a masked or "
                             "moved item would carry its rating elsewhere)")
        if len(ratings) != len(train):
            raise ValueError(f"ratings: expected one array per training sequence ({len(train)}), got {len(ratings)}")
        L = int(_core_model(model).config.levels)
        out = []
        for i, (seq, r) in enumerate(zip(train, ratings)):
            r = np.asarray(r, dtype=np.float64).reshape(-1)
            n_tokens = len(seq)
            if n_tokens == 0 or int(seq[0]) != BOS or (n_tokens - 1) != L * len(r):
                raise ValueError(f"ratings[{i}]: expected one rating per item of training sequence {i} "
                                 f"({(n_tokens - 1) / L:g} items after BOS), got {len(r)}")
            if np.isinf(r).any() or (np.abs(r[~np.isnan(r)]) > 1 + 1e-6).any():
                raise ValueError(f"ratings[{i}]: normalised ratings must lie in [-1, 1] (NaN = unknown)")
            out.append(torch.as_tensor(np.r_[np.nan, np.repeat(r, L)], dtype=torch.float32))
        return out

    def is_rating_example(self, index: int, step: int) -> bool:
        """Whether training sequence ``index`` is read as a rating sequence at step ``step``: a pure
        function of (seed, step, index), so every rank and a resumed run agree."""
        if not self.rating_share:
            return False
        rng = np.random.default_rng([self.cfg.seed, _TASK_STREAM, step, int(index)])
        return bool(rng.random() < self.rating_share)

    # -- checkpoints ----------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What this run is: hashes of the training and validation data (and item vectors), the
        training settings that change the result, and the model's config. A checkpoint keeps it;
        resuming a checkpoint of another run is refused (``load_checkpoint``)."""
        import hashlib

        def digest(seqs) -> str:
            h = hashlib.sha256()
            for x in seqs:
                a = np.ascontiguousarray(x.cpu().numpy() if torch.is_tensor(x) else np.asarray(x), dtype=np.int64)
                h.update(len(a).to_bytes(8, "little"))
                h.update(a.tobytes())
            return h.hexdigest()[:16]

        settings = {k: v for k, v in asdict(self.cfg).items() if k not in ("progress", "device", "checkpoint_every")}
        out = {"train_data": digest(self.train_seqs), "valid_data": digest(self.valid_seqs),
               "settings": json.dumps(settings, sort_keys=True, default=str),
               "model_config": json.dumps(_core_model(self.model).config.to_dict(), sort_keys=True, default=str)}
        if self.ratings is not None:
            out["ratings"] = hashlib.sha256(b"".join(r.numpy().tobytes() for r in self.ratings)).hexdigest()[:16]
        if self.item_vectors is not None:
            out["item_vectors"] = hashlib.sha256(self.item_vectors.embeddings.numpy().tobytes()
                                                 + self.item_vectors.keys.numpy().tobytes()).hexdigest()[:16]
        return out

    @property
    def checkpoint_path(self) -> Path | None:
        return self.output_dir / "checkpoint.pt" if self.output_dir else None

    def full_state_dict(self) -> dict:
        """The model's whole state dict. Under FSDP a collective (every rank must call it) that
        gathers the shards into a copy: rank 0 gets the tensors (on CPU), the other ranks an empty
        dict. Otherwise ``model.state_dict()``: the live tensors, as torch gives them."""
        if not self.fsdp:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`full_state_dict` (under FSDP rank 0's copy is sent to every rank)."""
        if not self.fsdp:
            self.model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=True))

    def _optimizer_state(self) -> dict:
        if not self.fsdp:
            return self.opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(self.model, self.opt,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_optimizer_state(self, state: dict) -> None:
        if not self.fsdp:
            self.opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.model, self.opt, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        model, optimizer = self.full_state_dict(), self._optimizer_state()  # collectives under FSDP
        if self.rank == 0:
            _atomic_torch_save({
                "model": model, "optimizer": optimizer, "fsdp": self.fsdp,
                "state": self.state, "rng": torch.get_rng_state(), "config": asdict(self.cfg),
                "fingerprint": self._fingerprint,
            }, self.checkpoint_path)
        if self.world > 1:  # when it returns, every rank can read the checkpoint rank 0 wrote
            dist.barrier()

    def load_checkpoint(self) -> bool:
        path = self.checkpoint_path
        if path is None or not path.exists():
            return False

        def corrupt(exc):
            return ValueError(f"checkpoint {path} is corrupt or does not match the model: {exc}")

        try:
            # weights_only: a checkpoint is tensors and plain containers; never unpickle code
            ck = torch.load(path, map_location="cpu" if self.fsdp else self.device, weights_only=True)
            written_sharded = bool(ck.get("fsdp", False))
        except Exception as exc:  # a truncated or foreign file must not be half-loaded silently
            raise corrupt(exc) from exc
        theirs = ck.get("fingerprint")
        if theirs != self._fingerprint:
            what = ("it has no fingerprint (written by an older recbase)" if not isinstance(theirs, dict) else
                    "these differ: " + ", ".join(sorted(k for k in set(theirs) | set(self._fingerprint)
                                                        if theirs.get(k) != self._fingerprint.get(k))))
            raise ValueError(f"checkpoint {path} belongs to another run ({what}); refusing to resume it. "
                             f"To start fresh, delete {path} (and best.pt beside it) or use another output folder.")
        if written_sharded != self.fsdp:
            # the optimizer state of a sharded run is keyed by parameter name, a plain run's by index
            raise ValueError(f"checkpoint {path} was written with fsdp={written_sharded}: resume it with "
                             f"fsdp={written_sharded} (this run has fsdp={self.fsdp})")
        try:
            self.load_full_state_dict(ck["model"])
            self._load_optimizer_state(ck["optimizer"])
        except Exception as exc:
            raise corrupt(exc) from exc
        self.state = ck["state"]
        torch.set_rng_state(ck["rng"])
        return True

    # -- steps ----------------------------------------------------------------------------------
    def _loss(self, seqs, target_items_only=0, train=True, labels=None, rating_of=None):
        """Summed loss and target count of a batch; ``rating_of``: per sequence its per-token
        ratings (a rating sequence) or None (a next-item sequence)."""
        ids, cu, labels = collate(seqs, target_items_only, labels)
        ids, cu, labels = ids.to(self.device), cu.to(self.device), labels.to(self.device)
        model = self.ddp if (train and self.ddp is not None) else self.model
        extra = {}
        if rating_of is not None:  # even without a RATE sequence in it, so the rating parameters take part
            extra["task_ids"] = torch.tensor([r is not None for r in rating_of], dtype=torch.int64, device=self.device)
            extra["ratings"] = torch.cat([torch.full((len(s),), float("nan")) if r is None else r
                                          for s, r in zip(seqs, rating_of)]).to(self.device)
        if self.item_vectors is not None:
            extra["item_vectors"] = self.item_vectors.per_token(_core_model(self.model), ids, cu).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = model(input_ids=ids, cu_seqlens=cu, labels=labels, **extra)
        n_targets = self._num_targets(cu, labels)
        return out.loss.float() * n_targets, n_targets  # the model's loss is a mean over targets

    @staticmethod
    def _num_targets(cu, labels) -> int:
        # the first token of each sequence is never a target (nothing precedes it)
        valid = labels != IGNORE
        valid[cu[:-1].long()] = False
        return int(valid.sum())

    def _shard(self, batch: np.ndarray) -> np.ndarray:
        return batch[self.rank::self.world]

    def masked_example(self, index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of training sequence ``index`` with whole items masked at step
        ``step``: a pure function of (seed, step, index), so every rank and a resumed run agree."""
        rng = np.random.default_rng([self.cfg.seed, _MASK_STREAM, step, int(index)])
        return mask_entities(self.train_seqs[index], self.levels, self.cfg.mask_rate, rng)

    def shuffled_example(self, index: int, step: int) -> torch.Tensor:
        """Training sequence ``index`` at step ``step``, its items (after BOS) in a random order
        with probability ``shuffle_rate``: a pure function of (seed, step, index)."""
        seq = self.train_seqs[index]
        rate = self.cfg.shuffle_rate
        if not rate:
            return seq
        rng = np.random.default_rng([self.cfg.seed, _SHUFFLE_STREAM, step, int(index)])
        n = (len(seq) - 1) // self.levels
        if rng.random() >= rate or n < 2 or 1 + n * self.levels != len(seq):
            return seq
        order = torch.as_tensor(rng.permutation(n))
        items = seq[1:].view(n, self.levels)[order].reshape(-1)
        return torch.cat([seq[:1], items])

    def step_rotation(self, step: int) -> torch.Tensor | None:
        """The content rotation of step ``step`` (None: a plain step); a pure function of
        (seed, step), so every rank and a resumed run agree."""
        rate = self.cfg.content_rotation_rate
        if not rate:
            return None
        rng = np.random.default_rng([self.cfg.seed, _ROTATION_STREAM, step])
        if rng.random() >= rate:
            return None
        return random_rotation(_core_model(self.model).config.concept_vector_dim, rng)

    def train_step(self, batch: np.ndarray) -> float:
        rotation = self.step_rotation(self.state["global_step"])
        if rotation is None:
            return self._train_step(batch)
        with _core_model(self.model).content_only(rotation):
            return self._train_step(batch)

    def _train_step(self, batch: np.ndarray) -> float:
        self.model.train()
        lr = self.cfg.lr * _lr_factor(self.state["global_step"], self.total_steps, self.cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        shard = self._shard(batch)
        local = [self.shuffled_example(i, self.state["global_step"]) for i in shard]
        total_targets = int(self.train_targets[batch].sum())
        labels = None
        if self.cfg.mask_rate:
            # masked copies of the batch's sequences, scored next to the plain ones
            masked = {int(i): self.masked_example(i, self.state["global_step"]) for i in batch}
            total_targets += sum(self._num_targets(*collate([x], labels=[y])[1:]) for x, y in masked.values())
            labels = list(local) + [masked[int(i)][1] for i in shard]
            local = local + [masked[int(i)][0] for i in shard]
        rating_of = None
        if self.ratings is not None:
            step = self.state["global_step"]
            rating_of = [self.ratings[int(i)] if self.is_rating_example(i, step) else None for i in shard]
        if local:
            loss_sum, _ = self._loss(local, labels=labels, rating_of=rating_of)
        else:  # more ranks than sequences in this batch: a zero-weighted forward keeps this rank's
            # DDP / FSDP collectives in step with the others and contributes a zero gradient
            loss_sum = self._loss([self.train_seqs[int(batch[0])]])[0] * 0.0
        # DDP averages gradients over ranks; scaling by world/total makes that the global mean.
        loss = loss_sum * (self.world / max(total_targets, 1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip, foreach=True)
        self.opt.step()
        self.state["global_step"] += 1
        return float(loss_sum.detach()) / max(total_targets, 1) * self.world

    @torch.no_grad()
    def validate(self, batch_tokens: int | None = None, indices=None) -> float:
        """Mean loss over the last item of each validation sequence (of ``indices`` only, if given)."""
        self.model.eval()
        seqs = self.valid_seqs if indices is None else [self.valid_seqs[int(i)] for i in indices]
        if not seqs:
            return float("nan")
        lengths = [len(s) for s in seqs]
        total, count = 0.0, 0
        for b in pack_batches(lengths, batch_tokens or self.cfg.tokens_per_batch, 0, 0):
            loss_sum, n = self._loss([seqs[i] for i in b], self.levels, train=False)
            total += float(loss_sum)
            count += n
        return total / max(count, 1)

    # -- loop -----------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.load_checkpoint()
        lengths = [len(s) for s in self.train_seqs]
        bar = tqdm(total=self.total_steps, initial=self.state["global_step"], desc="pretrain",
                   disable=not cfg.progress or self.rank != 0)
        started = time.perf_counter()
        while not self.state["done"] and self.state["epoch"] < cfg.epochs:
            epoch = self.state["epoch"]
            batches = pack_batches(lengths, cfg.tokens_per_batch, cfg.seed, epoch)
            running = []
            for i in range(self.state["step_in_epoch"], len(batches)):
                running.append(self.train_step(batches[i]))
                self.state["step_in_epoch"] = i + 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{np.mean(running[-20:]):.4f}")
                if cfg.checkpoint_every and self.state["global_step"] % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if cfg.time_budget_s is not None and time.perf_counter() - started > cfg.time_budget_s:
                    self.state["done"] = True  # out of time: validate this model and stop
                    break
            val = self.validate()
            record = {"epoch": epoch, "steps": self.state["global_step"], "train_loss": float(np.mean(running)) if running else None,
                      "valid_loss": val}
            if self.valid_groups:
                record["valid_loss_by_group"] = {n: self.validate(indices=i) for n, i in self.valid_groups.items()}
            self.state["history"].append(record)
            if val < self.state["best"] - 1e-4:
                self.state["best"], self.state["bad_epochs"] = val, 0
                self._save_best()
            else:
                self.state["bad_epochs"] += 1
                self.state["done"] |= self.state["bad_epochs"] >= cfg.patience
            self.state["epoch"] += 1
            self.state["step_in_epoch"] = 0
            self.save_checkpoint()
            self._log(record)
        bar.close()
        self._restore_best()
        return self.state

    def _save_best(self) -> None:
        state = self.full_state_dict()  # a collective under FSDP
        if self.output_dir and self.rank == 0:
            _atomic_torch_save(state, self.output_dir / "best.pt")
        elif not self.output_dir:
            self._best_in_memory = {k: v.detach().clone() for k, v in state.items()}

    def _restore_best(self) -> None:
        if self.output_dir and (self.output_dir / "best.pt").exists():
            self.load_full_state_dict(torch.load(self.output_dir / "best.pt", weights_only=True,
                                                 map_location="cpu" if self.fsdp else self.device))
        elif getattr(self, "_best_in_memory", None) is not None:
            self.load_full_state_dict(self._best_in_memory)

    def _log(self, record: dict) -> None:
        if self.output_dir and self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
