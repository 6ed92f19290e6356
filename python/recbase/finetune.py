"""LoRA fine-tuning of a pretrained RecBase model on a new domain (RecSysLLM), with ``peft``.

Each targeted ``nn.Linear`` W (d_out x d_in) becomes W + (alpha / r) * B @ A with A (r x d_in) and
B (d_out x r) trainable and W frozen; B starts at zero, so the adapted model starts equal to the
base model. RecSysLLM found rank 8 best; the default targets are every attention (q/k/v/o) and MLP
(gate/up/down) projection. The output head is not a target: the model reads ``lm_head.weight``
directly (restricted to the next level's codes), which a LoRA wrapper would silently bypass.

The wrapped model trains with :class:`recbase.train.Trainer` unchanged (the optimizer only receives
parameters that require gradients), ``merge_lora`` folds the adapters back into a plain
``RecBaseForCausalLM``, and ``save_lora`` / ``load_lora`` store only the adapters (safetensors).

Needs ``peft`` (``pip install "recbase[lora]"``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from recbase._atomic import atomic_dir
from recbase.model import RecBaseForCausalLM

# The nn.Linear projections of every RecBaseDecoderLayer (RecBaseAttention + RecBaseMLP).
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES


def _peft():
    try:
        import peft
    except ImportError as exc:  # an optional dependency: say how to get it
        raise ImportError('LoRA fine-tuning needs peft: pip install "recbase[lora]"') from exc
    return peft


def _check_base(model, name: str) -> None:
    if not isinstance(model, RecBaseForCausalLM):
        raise TypeError(f"{name} must be a RecBaseForCausalLM, got {type(model).__name__}")
    if hasattr(model, "peft_config"):
        raise ValueError(f"{name} already carries LoRA adapters; pass the plain base model")


def lora_model(model: RecBaseForCausalLM, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules: Sequence[str] | None = None):
    """Wrap ``model`` with LoRA adapters; only the adapters are trainable.

    rank: LoRA rank r >= 1; alpha: scale numerator (update = alpha/r * B @ A); dropout: on the
    adapter input, in [0, 1); target_modules: names from ``DEFAULT_TARGET_MODULES`` (all by default).
    The base model is modified in place (its projections are wrapped) and returned inside a
    ``peft.PeftModel``, which forwards calls and attributes (``config``, ``start_generation``, ...)
    to it. Returns the ``PeftModel``.
    """
    _check_base(model, "model")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if target_modules is None:
        targets = list(DEFAULT_TARGET_MODULES)
    else:
        if isinstance(target_modules, str):  # a lone name would otherwise be read as a regex by peft
            target_modules = [target_modules]
        targets = list(target_modules)
        unknown = sorted(set(targets) - set(DEFAULT_TARGET_MODULES))
        if unknown or not targets:
            raise ValueError(f"target_modules must be a non-empty subset of {list(DEFAULT_TARGET_MODULES)}, "
                             f"got {targets!r} (unknown: {unknown})")
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             bias="none")
    return peft.get_peft_model(model, config)


def _check_peft(peft_model) -> None:
    peft = _peft()
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"peft_model must be a peft.PeftModel (from lora_model), got {type(peft_model).__name__}")


def merge_lora(peft_model) -> RecBaseForCausalLM:
    """Fold the adapters into the base weights (W + alpha/r * B @ A) and return the plain
    ``RecBaseForCausalLM``. Its outputs equal the adapted model's (up to float rounding). Like
    ``peft``'s ``merge_and_unload`` this works in place: ``peft_model`` is not usable afterwards."""
    _check_peft(peft_model)
    return peft_model.merge_and_unload()


def save_lora(peft_model, path: str | os.PathLike) -> None:
    """Write only the adapters (``adapter_model.safetensors`` + ``adapter_config.json``) to the
    folder ``path``, atomically: a crash leaves the previous folder or the new one, never a mix. A
    non-empty folder that holds no adapters is refused (nothing of the user's is deleted)."""
    _check_peft(peft_model)
    with atomic_dir(path, marker="adapter_config.json") as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)


def load_lora(base_model: RecBaseForCausalLM, path: str | os.PathLike, trainable: bool = False):
    """Attach the adapters saved by ``save_lora`` at ``path`` to ``base_model`` (modified in place,
    as in ``lora_model``). With ``trainable`` the adapters keep training; otherwise they are frozen
    for inference. Returns the ``PeftModel``."""
    _check_base(base_model, "base_model")
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} holds no LoRA adapters (adapter_config.json missing); "
                                "write them with save_lora")
    return _peft().PeftModel.from_pretrained(base_model, str(path), is_trainable=trainable)
