"""Model adapters (:func:`get_adapter`), LoRA + frozen reference (:mod:`.lora`) and the
built-in base models (:func:`load_builtin_llava`, :func:`load_builtin_clip`)."""
from unlearn_fast.models.adapters import (CLIPAdapter, LlavaAdapter, ModelAdapter, Qwen2VLAdapter,
                                          UnsupportedModelError, get_adapter, unwrap)
from unlearn_fast.models.builtin import cache_dir, load_builtin_clip, load_builtin_llava
from unlearn_fast.models.lora import Reference, apply_lora, lora_target_modules

__all__ = ["get_adapter", "ModelAdapter", "LlavaAdapter", "Qwen2VLAdapter", "CLIPAdapter", "UnsupportedModelError",
           "unwrap", "apply_lora", "lora_target_modules", "Reference", "load_builtin_llava", "load_builtin_clip",
           "cache_dir"]
