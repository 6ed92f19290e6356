"""The RecBase model: config presets and a Qwen2-style causal LM over concept IDs."""
from .config import PRESETS, RecBaseConfig
from .modeling import GenerationState, RecBaseForCausalLM, RecBaseModel, RecBaseOutput

__all__ = ["PRESETS", "RecBaseConfig", "RecBaseForCausalLM", "RecBaseModel", "RecBaseOutput", "GenerationState"]
