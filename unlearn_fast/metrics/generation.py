"""Batched greedy generation for evaluation.

Prompts are collated by the adapter with ``with_answer=False, padding_side="left"``
(image tokens expanded, pixel values attached), batched by length, and decoded greedily
with the model's KV cache through ``transformers``' ``generate`` (which takes care of
the position ids under left padding, of LLaVA's pixel values on the first step only and
of Qwen2-VL's 3-D rotary positions).  Only the last position's logits are computed per
step.  A row stops at an end-of-sequence id, at a stop string, or after
``max_new_tokens``; finished rows are padded while the others go on.

Batched output equals one-example-at-a-time output (tested): left padding plus the
attention mask keep every row's computation independent of the others.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from unlearn_fast.metrics._model import (eval_mode, example_length, forward_inputs, length_sorted_batches, progress,
                                         to_model)
from unlearn_fast.metrics.distributed import is_sharded_model, sharded_map, world


def _eos_list(eos_token_id) -> List[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, (list, tuple)):
        return [int(i) for i in eos_token_id]
    if isinstance(eos_token_id, torch.Tensor):
        return [int(i) for i in eos_token_id.reshape(-1)]
    return [int(eos_token_id)]


class _StopOnStrings:
    """Stopping criterion: a row is done once its generated text contains a stop string."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_len: int):
        self.tokenizer, self.stop_strings, self.prompt_len = tokenizer, tuple(stop_strings), prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        done = [any(s in t for s in self.stop_strings) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_greedy(model, adapter, batch: dict, *, max_new_tokens: int = 32, eos_token_id=None,
                    pad_token_id: Optional[int] = None, stop_strings: Sequence[str] = (), tokenizer=None
                    ) -> List[List[int]]:
    """Greedy continuation of every prompt in a left-padded ``batch`` (from
    ``adapter.collate(..., with_answer=False, padding_side="left")``).

    Returns one list of generated token ids per row, cut before the first
    end-of-sequence id (``eos_token_id``: an id or a list; default: the model's
    generation config).  ``stop_strings`` (needs ``tokenizer``) stop a row once its
    generated text contains one of them (the ids up to that point are kept; cut the
    text with :func:`cut_at_stop`)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs tokenizer= to decode the generated text")
    mask = batch.get("attention_mask")
    if mask is not None and mask.shape[0] and not bool(mask[:, -1].all()):
        raise ValueError("batch is right-padded; collate prompts with padding_side='left' for generation")
    batch = to_model(batch, model)
    inputs = forward_inputs(model, batch, adapter)
    gen_cfg = getattr(model, "generation_config", None)
    eos = _eos_list(eos_token_id if eos_token_id is not None else getattr(gen_cfg, "eos_token_id", None))
    if pad_token_id is None:
        pad_token_id = getattr(gen_cfg, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    prompt_len = inputs["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_token_id,
                  eos_token_id=eos or None, use_cache=True, temperature=None, top_p=None, top_k=None)
    if world()[1] > 1 and is_sharded_model(model):
        # FSDP: every rank decodes until every rank's rows are done (finished ranks keep
        # calling forward, results unused): the forwards are collectives
        kwargs["synced_gpus"] = True
    if stop_strings:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnStrings(tokenizer, stop_strings, prompt_len)])
    with eval_mode(model):
        out = model.generate(**inputs, **kwargs)
    new = out[:, prompt_len:].tolist()
    result = []
    for row in new:
        cut = len(row)
        for j, t in enumerate(row):
            if t in eos:
                cut = j
                break
        result.append(row[:cut])
    return result


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stop_strings:
        j = text.find(s)
        if j >= 0:
            cut = min(cut, j)
    return text[:cut]


def generate_answers(model, adapter, examples: Sequence, *, tokenizer, batch_size: int = 16,
                     max_new_tokens: int = 32, eos_token_id=None, stop_strings: Sequence[str] = (),
                     shard: Union[bool, str] = "auto", progress_bar=None) -> List[str]:
    """Greedy answers (decoded, special tokens skipped, stripped, cut at the first stop
    string) to every example's prompt, in input order.  Examples are batched by prompt
    length; with an initialised process group they are sharded over the ranks."""
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    examples = list(examples)

    def run(local: List) -> List[str]:
        out: List[Optional[str]] = [None] * len(local)
        batches = length_sorted_batches(local, [example_length(e, with_answer=False) for e in local], batch_size)
        for idx in progress(batches, len(batches), "generate", progress_bar):
            batch = adapter.collate([local[i] for i in idx], tokenizer, with_answer=False, padding_side="left")
            ids = generate_greedy(model, adapter, batch, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                  pad_token_id=getattr(tokenizer, "pad_token_id", None), stop_strings=stop_strings,
                                  tokenizer=tokenizer)
            for i, row in zip(idx, ids):
                out[i] = cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop_strings).strip()
        return out

    return sharded_map(run, examples, shard)
