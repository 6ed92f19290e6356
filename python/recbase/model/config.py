"""RecBaseConfig: a Qwen2-style decoder over concept-ID sequences (RecBase, arXiv 2509.03131).

Vocabulary: 4 specials (PAD=0, BOS=1, EOS=2, MASK=3) then L levels x K codes; token of
(level l, code c) is ``4 + l*K + c``; ``vocab_size = 4 + L*K``. Positions are two-level
("dynamic", RecSysLLM): rotary over the item slot + a learned embedding of the level inside the item.

>>> from recbase.model import RecBaseConfig
>>> cfg = RecBaseConfig.from_preset("tiny", levels=3, codebook_size=8)
>>> cfg.vocab_size
28
"""
from __future__ import annotations

from transformers import PretrainedConfig

NUM_SPECIAL_TOKENS = 4
PAD_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3

# Sizes: tiny (tests), small (CPU demo, minutes), base (the paper's 0.3B), large (the paper's 1.5B).
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, levels=3, codebook_size=16, max_items=64),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, levels=4, codebook_size=256, max_items=200),
    "base": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, levels=4, codebook_size=1024, max_items=512),
    "large": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, levels=4, codebook_size=1024, max_items=512),
}


class RecBaseConfig(PretrainedConfig):
    """Configuration of :class:`RecBaseForCausalLM`.

    Args:
        levels (L), codebook_size (K): concept-ID shape; vocab_size is derived (4 + L*K).
        max_items: longest sequence in items (tokens <= max_items*L + 1 with BOS).
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads (GQA, divides heads), head_dim (default hidden/heads): Qwen2 shapes.
        rope_theta: rotary base (rotary runs over item slots, not tokens).
        attention_mask_type: "causal" (token-causal, for next-token training/generation) or
            "item" (tokens of one item see each other; for scoring/encoding only: under next-token
            training a token would see the very tokens it predicts, and KV-cache generation needs
            "causal").
        item_position_embedding: add a learned item-slot embedding (besides rotary).
        kernel_backend: "auto" (Triton on CUDA), "reference" or "triton".
        concept_vector_dim: width of a content vector per concept token (0 = none). The model
            then holds a buffer ``concept_vectors`` [L*K, dim] (``set_concept_vectors``, e.g. the
            tokenizer's codebooks) and adds a learned projection of it to every concept token's
            input embedding and output-head row, so concepts it never trained on (a new domain's)
            still mean something to it.
        item_vector_dim: width of the dense item channel (0 = none; when both are set it must equal
            ``concept_vector_dim``, so one rotation turns both). Each item is then also read through
            its full text embedding (projected, added to the item's last token), and a dense head
            predicts the next item as a mixture of von Mises-Fisher kernels centred on the history
            items' embeddings, with weights from the model (``dense_kernel_scores``); trained by
            ``dense_loss_weight`` x an in-batch softmax over the next items (LIGER-style alignment).
        dense_loss_weight: weight of the dense alignment loss next to the next-concept CE.
        fusion_weights: weight w of the dense score in hybrid scoring, ``(1 - w) * generative +
            w * dense``, per reading: ``{"seen": w, "unseen": w}`` (domains read normally / by content
            alone); chosen on the source domains' validation items (``recbase.recommend.choose_fusion``).
        rating_task: a second task besides next-item prediction (RecSysLLM / P5 rating prediction).
            A sequence's task token says which it asks for: BOS for the next item, RATE (BOS's
            embedding plus a learned task vector) for ratings. In a RATE sequence each item's first
            token also reads the previous item's rating, and a regression head on each item's last
            token predicts that item's rating (normalised to [-1, 1] by its domain's scale), trained
            by ``rating_loss_weight`` x the mean squared error next to the next-concept CE.
        rating_scales: ``{domain: [lowest, highest]}`` of the ratings the model trained on (what
            a predicted rating is mapped back to).
    """

    model_type = "recbase"

    def __init__(self, levels: int = 4, codebook_size: int = 256, max_items: int = 200,
                 hidden_size: int = 256, intermediate_size: int = 704, num_hidden_layers: int = 4,
                 num_attention_heads: int = 4, num_key_value_heads: int | None = None,
                 head_dim: int | None = None, rms_norm_eps: float = 1e-6, rope_theta: float = 10000.0,
                 initializer_range: float = 0.02, attention_mask_type: str = "causal",
                 item_position_embedding: bool = False, kernel_backend: str = "auto",
                 concept_vector_dim: int = 0, item_vector_dim: int = 0, dense_loss_weight: float = 1.0,
                 fusion_weights: dict | None = None, rating_task: bool = False, rating_loss_weight: float = 1.0,
                 rating_scales: dict | None = None, vocab_size: int | None = None, **kwargs):
        if levels < 1 or codebook_size < 1 or max_items < 1:
            raise ValueError(f"levels, codebook_size, max_items must be >= 1, got "
                             f"{levels}, {codebook_size}, {max_items}")
        expected_vocab = NUM_SPECIAL_TOKENS + levels * codebook_size
        if vocab_size is not None and vocab_size != expected_vocab:
            raise ValueError(f"vocab_size must be 4 + levels*codebook_size = {expected_vocab}, got {vocab_size}")
        num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_key_value_heads ({num_key_value_heads}) must divide "
                             f"num_attention_heads ({num_attention_heads})")
        if head_dim is None:
            if hidden_size % num_attention_heads:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                                 f"({num_attention_heads}) or head_dim given")
            head_dim = hidden_size // num_attention_heads
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        if attention_mask_type not in ("causal", "item"):
            raise ValueError(f"attention_mask_type must be 'causal' or 'item', got {attention_mask_type!r}")
        if int(concept_vector_dim) < 0:
            raise ValueError(f"concept_vector_dim must be >= 0, got {concept_vector_dim}")
        if int(item_vector_dim) < 0:
            raise ValueError(f"item_vector_dim must be >= 0, got {item_vector_dim}")
        if item_vector_dim and concept_vector_dim and int(item_vector_dim) != int(concept_vector_dim):
            raise ValueError(f"item_vector_dim ({item_vector_dim}) must equal concept_vector_dim "
                             f"({concept_vector_dim}): one rotation turns concept content and item vectors")
        if not dense_loss_weight >= 0:
            raise ValueError(f"dense_loss_weight must be >= 0, got {dense_loss_weight!r}")
        fusion_weights = dict(fusion_weights or {})
        for key, w in fusion_weights.items():
            if key not in ("seen", "unseen") or not 0.0 <= float(w) <= 1.0:
                raise ValueError(f"fusion_weights: expected {{'seen'|'unseen': w in [0, 1]}}, got {key!r}: {w!r}")
        if not rating_loss_weight >= 0:
            raise ValueError(f"rating_loss_weight must be >= 0, got {rating_loss_weight!r}")
        rating_scales = {str(k): [float(x) for x in v] for k, v in dict(rating_scales or {}).items()}
        for key, scale in rating_scales.items():
            if len(scale) != 2 or not scale[0] < scale[1]:
                raise ValueError(f"rating_scales[{key!r}]: expected [lowest, highest] with lowest < highest, "
                                 f"got {scale}")
        if kernel_backend not in ("auto", "reference", "triton"):
            raise ValueError(f"kernel_backend must be 'auto', 'reference' or 'triton', got {kernel_backend!r}")
        self.levels = int(levels)
        self.codebook_size = int(codebook_size)
        self.max_items = int(max_items)
        self.vocab_size = expected_vocab
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.attention_mask_type = attention_mask_type
        self.item_position_embedding = bool(item_position_embedding)
        self.kernel_backend = kernel_backend
        self.concept_vector_dim = int(concept_vector_dim)
        self.item_vector_dim = int(item_vector_dim)
        self.dense_loss_weight = float(dense_loss_weight)
        self.fusion_weights = {k: float(v) for k, v in fusion_weights.items()}
        self.rating_task = bool(rating_task)
        self.rating_loss_weight = float(rating_loss_weight)
        self.rating_scales = rating_scales
        kwargs.setdefault("pad_token_id", PAD_ID)
        kwargs.setdefault("bos_token_id", BOS_ID)
        kwargs.setdefault("eos_token_id", EOS_ID)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def max_tokens(self) -> int:
        """Longest accepted sequence: max_items items of L tokens plus an optional BOS."""
        return self.max_items * self.levels + 1

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "RecBaseConfig":
        """A preset ("tiny", "small", "base", "large") with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
