"""The RecBase model: config presets and a Qwen2-style causal LM over concept IDs.

Registered with transformers' Auto classes (model_type "recbase"), so
``AutoModelForCausalLM.from_pretrained(path)`` loads a saved RecBase model.
"""
from .config import PRESETS, RecBaseConfig
from .modeling import GenerationState, RecBaseForCausalLM, RecBaseModel, RecBaseOutput

__all__ = ["PRESETS", "RecBaseConfig", "RecBaseForCausalLM", "RecBaseModel", "RecBaseOutput", "GenerationState"]


def _register_auto_classes() -> None:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        AutoConfig.register("recbase", RecBaseConfig, exist_ok=True)
        AutoModelForCausalLM.register(RecBaseConfig, RecBaseForCausalLM, exist_ok=True)
    except (ImportError, TypeError, ValueError):  # older transformers without exist_ok: best effort
        pass


_register_auto_classes()
