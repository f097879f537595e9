"""Shared fixtures of the metrics tests: the built-in digits task and its tokenizer, and
tiny LLaVA models with random weights (the built-in architecture)."""
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def task_and_tokenizer():
    from unlearn_fast.data import load_builtin_task
    from unlearn_fast.models.builtin import builtin_tokenizer

    task = load_builtin_task()
    return task, builtin_tokenizer(task)


def tiny_llava(seed: int = 0, head_scale: float = 8.0, vocab_size=None, tokenizer=None, **config_kwargs):
    """A random tiny LlavaForConditionalGeneration (eval mode, float32).  ``head_scale``
    sharpens the next-token distributions so scores and greedy choices vary."""
    from transformers import LlavaForConditionalGeneration

    from unlearn_fast.models.builtin import tiny_llava_config

    tok = tokenizer if tokenizer is not None else task_and_tokenizer()[1]
    cfg = tiny_llava_config(tok, **config_kwargs)
    if vocab_size is not None:
        cfg.text_config.vocab_size = vocab_size
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


def one_thread():
    """Generator for an autouse fixture: tiny models run fastest on one intra-op thread
    (OpenMP barriers cost more than the work on a loaded 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
