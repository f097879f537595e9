"""Tiny random models of the real transformers classes for the methods/models tests,
built once per test session (lru_cache) from the built-in task's tokenizer."""
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def task_and_tokenizer():
    from unlearn_fast.data import load_builtin_task
    from unlearn_fast.models.builtin import builtin_tokenizer

    task = load_builtin_task()
    return task, builtin_tokenizer(task)


def tiny_llava(seed: int = 0):
    from transformers import LlavaForConditionalGeneration

    from unlearn_fast.models.builtin import tiny_llava_config

    _, tok = task_and_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_llava_config(tok, text_hidden=32, text_layers=1, vision_hidden=16, vision_layers=1)
    return LlavaForConditionalGeneration(cfg).eval()


def tiny_clip(seed: int = 0):
    from transformers import CLIPModel

    from unlearn_fast.models.builtin import tiny_clip_config

    _, tok = task_and_tokenizer()
    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(tok, hidden=16, layers=1, projection_dim=8)).eval()


def tiny_qwen2vl(seed: int = 0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from unlearn_fast.data.tokenizer import IMAGE, VISION_END, VISION_START, token_id

    _, tok = task_and_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=token_id(tok, IMAGE), vision_start_token_id=token_id(tok, VISION_START),
        vision_end_token_id=token_id(tok, VISION_END))
    return Qwen2VLForConditionalGeneration(cfg).eval()
